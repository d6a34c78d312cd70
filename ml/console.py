"""Progress of a long CLI command on the terminal: a header line as each stage starts and one
bar over the whole command, so a user sees within seconds what it is doing and how far it got
(``protomed evaluate`` runs for twenty minutes on a CPU)."""

from __future__ import annotations

from types import TracebackType

from tqdm.auto import tqdm

STEPS = 1000  # the bar's resolution: progress arrives as a fraction of the whole


class StagePrinter:
    """A ``(stage, fraction)`` progress callback (``ml.evaluation.evaluate.Progress``): prints
    ``[name] stage ...`` when the stage changes and moves the bar to ``fraction``."""

    def __init__(self, name: str) -> None:
        self.name, self.stage = name, ""
        self.bar = tqdm(
            total=STEPS,
            desc=name,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    def __call__(self, stage: str, fraction: float) -> None:
        if stage != self.stage:
            self.stage = stage
            self.bar.write(f"[{self.name}] {stage} ...")
        self.bar.n = max(self.bar.n, min(STEPS, round(fraction * STEPS)))
        self.bar.refresh()

    def __enter__(self) -> StagePrinter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bar.close()
