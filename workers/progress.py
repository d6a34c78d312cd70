"""A job's overall progress and ETA from its stages (embed, prototypes, train, upload, ...).

Each stage has a weight, its rough share of the job's time, and reports ``(done, total)`` in its
own units (images, epochs, steps). The overall fraction is the finished stages' weights plus the
current stage's weight times its fraction, and never goes back.

The ETA uses only measured rates, never a guess of the machine's speed:

* the current stage's remaining time is its elapsed time times ``(total - done) / (done -
  done at its first update)`` (a resumed training run starts half done: only this run's steps
  measure the rate);
* each later stage's time is its weight times the seconds per unit of weight measured so far
  (all elapsed time divided by all weight done, the current stage's share included).

So the ETA counts every stage still to come (upload and the rest after training, the prototype
stage included), and it is not optimistic by construction: it is the measured
rate extrapolated, and until something has been measured it is ``None`` rather than a guess.
Torch-free; the clock is injectable so tests do not depend on how fast the machine is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

Report = Callable[[float, float | None], None]


class StagedProgress:
    """Turns per-stage ``update(stage, done, total)`` calls into ``report(fraction, eta_s)``."""

    def __init__(
        self,
        weights: Mapping[str, float],
        report: Report,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"stage weights must be >= 0 and sum to > 0, got {dict(weights)}")
        total = sum(weights.values())
        self.weights = {name: w / total for name, w in weights.items()}
        self.order = list(self.weights)
        self._report, self._clock = report, clock
        self._index = -1  # the current stage's position in ``order``
        self._stage_start = 0.0
        self._start_part = 0.0  # the current stage's fraction at its first update (resume)
        self._done_time = 0.0  # seconds spent in finished stages
        self._done_weight = 0.0  # their weight, skipped stages included (the fraction)
        self._measured_weight = 0.0  # ...without skipped stages (the rate)
        self.fraction = 0.0
        self.eta_s: float | None = None

    def update(self, stage: str, done: float, total: float) -> None:
        """The stage ``stage`` has done ``done`` of ``total`` units. Stages before it (in the
        order given) count as finished; an update of an earlier stage than the current one is
        ignored, so the fraction never goes back."""
        if stage not in self.weights:
            raise ValueError(f"unknown stage {stage!r}; stages are {self.order}")
        index, now = self.order.index(stage), self._clock()
        if index < self._index:
            return
        if index > self._index:
            if self._index >= 0:  # the current stage is finished
                self._done_time += now - self._stage_start
                finished = self.weights[self.order[self._index]]
                self._done_weight += finished
                self._measured_weight += finished * (1 - self._start_part)
            # skipped stages (nothing to do, e.g. a codebook already learned) take no time
            self._done_weight += sum(self.weights[s] for s in self.order[self._index + 1 : index])
            self._index, self._stage_start = index, now
            self._start_part = self._part(done, total)
        part = self._part(done, total)
        weight = self.weights[stage]
        self.fraction = max(self.fraction, min(1.0, self._done_weight + weight * part))
        self.eta_s = self._eta(stage, part, now - self._stage_start)
        self._report(self.fraction, self.eta_s)

    @staticmethod
    def _part(done: float, total: float) -> float:
        return min(max(done / total, 0.0), 1.0) if total > 0 else 1.0

    def _eta(self, stage: str, part: float, elapsed: float) -> float | None:
        later = sum(self.weights[s] for s in self.order[self.order.index(stage) + 1 :])
        measured = max(part - self._start_part, 0.0)
        weight_done = self._measured_weight + self.weights[stage] * measured
        time_done = self._done_time + elapsed
        if weight_done <= 0 or time_done <= 0:
            return None
        per_weight = time_done / weight_done
        if measured > 0:
            current = elapsed * (1 - part) / measured
        else:  # nothing measured in this stage yet: the rate of the stages before it
            if self._done_time <= 0:
                return None
            current = self.weights[stage] * per_weight
        return current + later * per_weight
