"""The worker's side of a job's life: the running job's context (progress, heartbeat thread,
stop requests) and the shutdown flag. Every write to the job row is a transition of
``service.job_state`` (claim, heartbeat, re-queue, finish, reap), which checks that this run
still owns the job.

The database is the source of truth, not the broker. A worker *claims* a job with one conditional
UPDATE (queued, or running with a stale heartbeat), so redelivered or duplicated messages never
run a job twice. While it runs, a heartbeat thread refreshes ``heartbeat_at`` and picks up cancel
requests, the time limit, and the loss of the job (reaped and claimed by another run): the job
then stops at its next progress report without writing anything more. If a worker dies
(SIGKILL, lost machine) its heartbeat stops; the reaper re-queues the job (up to
``max_attempts`` runs) or marks it failed, so nothing stays ``running`` forever.

A job's *place* in its queue is its id (submission order). A task message is a token: the worker
that receives it claims the first queued job of the message's queue (``claim_next``), not
necessarily the one the message names. So a job re-queued after an interruption keeps its id and
runs before every job submitted after it, whatever order the broker delivers messages in; each
re-queue publishes one more token, so there is always a message for every queued job.

A worker that is shutting down (:data:`SHUTTING_DOWN`, set by Celery's ``worker_shutting_down``
signal, and in prefork children by the SIGUSR2 the main process passes on: ``workers.tasks``)
claims nothing and publishes the task's token again; its running job stops at its next progress
report (the trainer checkpoints first) and goes back to ``queued`` at once
(:func:`requeue_interrupted`), without using up an attempt. A worker process that died without
that (killed) is released by its supervisor at once (``release_worker``), or else by the
reaper. Torch-free: light workers import it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from service.config import Settings
from service.job_state import NotOwned, Run, heartbeat, owned_session, requeue
from workers.progress import StagedProgress

log = logging.getLogger(__name__)
# Set (from the worker's signal handler) when this worker process has been asked to stop.
SHUTTING_DOWN = threading.Event()
INTERRUPTED = "interrupted: the worker is shutting down"
LOST = "lost ownership"


class JobStopped(Exception):
    """Raised inside a job when it must stop: cancelled by a user, over its time limit,
    interrupted because its worker is shutting down (then it is re-queued, not failed), or
    lost (reaped and claimed by another run: then nothing more is written)."""

    def __init__(
        self, reason: str, *, cancelled: bool, interrupted: bool = False, lost: bool = False
    ) -> None:
        super().__init__(reason)
        self.cancelled, self.interrupted, self.lost = cancelled, interrupted, lost


def requeue_interrupted(run: Run, reason: str) -> bool:
    """Put a job this run holds back in the queue at once, at its place (same row, same id);
    the run does not count as an attempt. The caller publishes a token when it returns True."""
    return requeue(run, reason, counts_as_attempt=False, note_progress=True) == "requeued"


class JobContext:
    """What a running job uses to report progress and learn that it must stop.

    The time limit counts from the run's ``started_at`` in the database (set by the claim) and
    is checked by the heartbeat, as well as on this process's own clock: the row is the record
    of when the run began, and a test can age it to make the limit pass at a moment it chooses
    (a job known to be mid-training) instead of racing a short limit against the machine."""

    def __init__(self, run: Run, settings: Settings, time_limit_s: float) -> None:
        self.run, self.job_id, self.settings = run, run.job_id, settings
        self.deadline = time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self._progress: tuple[float, float | None] | None = None
        self._cancel = threading.Event()
        self._over_time = threading.Event()
        self._lost = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._beat_loop, name=f"heartbeat-{run.job_id}", daemon=True
        )

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def report(self, fraction: float, eta_s: float | None = None) -> None:
        """Record progress (written by the heartbeat thread); raise if the job must stop."""
        with self._lock:
            self._progress = (min(max(fraction, 0.0), 1.0), eta_s)
        self.check()

    def stages(self, weights: dict[str, float]) -> StagedProgress:
        """Progress and ETA of a job made of weighted stages (``workers.progress``)."""
        return StagedProgress(weights, self.report)

    def check(self) -> None:
        if self._lost.is_set():
            raise JobStopped(LOST, cancelled=False, lost=True)
        if self._cancel.is_set():
            raise JobStopped("cancelled by request", cancelled=True)
        if SHUTTING_DOWN.is_set():
            raise JobStopped(INTERRUPTED, cancelled=False, interrupted=True)
        if self._over_time.is_set() or time.monotonic() > self.deadline:
            raise JobStopped(f"time limit of {self.time_limit_s:.0f} s exceeded", cancelled=False)

    def beat(self) -> None:
        """One heartbeat (the thread's, or a test's): write progress if this run still owns the
        job, and note what it learnt for the next :meth:`check`."""
        with self._lock:
            progress, self._progress = self._progress, None
        got = heartbeat(self.run, self.time_limit_s, progress)
        if not got.owned:
            self._lost.set()
        if got.cancel_requested:
            self._cancel.set()
        if got.over_time:
            self._over_time.set()

    @contextmanager
    def owned_session(self) -> Iterator[Session]:
        """A transaction that commits only while this run owns the job (for what the job writes
        besides its own row); raises JobStopped("lost ownership"), writing nothing, otherwise."""
        try:
            with owned_session(self.run) as session:
                yield session
        except NotOwned as exc:
            self._lost.set()
            raise JobStopped(LOST, cancelled=False, lost=True) from exc

    def _beat_loop(self) -> None:
        interval = min(self.settings.heartbeat_s, 1.0)  # progress every second at most
        last_beat = 0.0
        while not self._done.wait(interval) and not self._lost.is_set():
            if self._progress is None and time.monotonic() - last_beat < self.settings.heartbeat_s:
                continue
            try:
                self.beat()
                last_beat = time.monotonic()
            except Exception as exc:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
