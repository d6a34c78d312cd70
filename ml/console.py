"""Progress of a long command on the terminal, made in one place (:func:`progress_bar`): every
bar is labelled with what it counts ("train baseline", "sample prototype"), and off a terminal
(a pipe, a log file) it becomes a few plain lines instead of one cursor-coded redraw per update,
which turned a demo's log into thousands of lines. :class:`StagePrinter` adds a header line as
each stage of a long command starts, so a user sees within seconds what it is doing and how far
it got (``protomed evaluate`` runs for twenty minutes on a CPU)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

from tqdm.auto import tqdm

STEPS = 1000  # the StagePrinter bar's resolution: progress arrives as a fraction of the whole
LINES = 10  # off a terminal, a bar writes a line at each tenth of its total (and at its end)
T = TypeVar("T")


class LineProgress(Generic[T]):
    """The part of tqdm's interface the bars here use, written as whole lines: one when each
    tenth of ``total`` is passed and one at the end (at most ``LINES + 1``, however many
    updates), counted in updates, not seconds, so a log's length does not depend on speed."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        desc: str,
        total: float | None = None,
        initial: float = 0,
        unit: str = "it",
        file: IO[str],
    ) -> None:
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.total, self.n, self.postfix = total, initial, ""
        self._t0, self._printed, self._shown_n = time.monotonic(), -1, -1.0
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "LineProgress wraps no iterable"
        for item in self.iterable:
            yield item
            self.update(1)

    def _tenth(self) -> int:
        return int(LINES * self.n / self.total) if self.total else 0

    def _line(self) -> None:
        of = f"/{self.total:g}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self.postfix}" if self.postfix else ""
        took = time.monotonic() - self._t0
        self.file.write(f"{self.desc}: {self.n:g}{of} {self.unit}{pct}{post} [{took:.0f} s]\n")
        self.file.flush()
        self._shown_n = self.n

    def update(self, n: float = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        if self.total and self._tenth() > self._printed:
            self._printed = self._tenth()
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        if not self._closed and self.n != self._shown_n:
            self._line()
        self._closed = True

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _is_terminal(file: IO[str]) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: float | None = None,
    initial: float = 0,
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    **tqdm_options: Any,
) -> Any:
    """A labelled bar on ``file`` (default stderr): tqdm's on a terminal, a
    :class:`LineProgress` elsewhere. Typed ``Any``: callers use the interface the two share
    (``update``, ``n``, ``total``, ``refresh``, ``set_postfix``, ``write``, ``close``, ``with``,
    iteration)."""
    out = file if file is not None else sys.stderr
    if disable or _is_terminal(out):
        return tqdm(
            iterable,
            desc=desc,
            total=total,
            initial=initial,
            unit=unit,
            disable=disable,
            file=out,
            **tqdm_options,
        )
    return LineProgress(iterable, desc=desc, total=total, initial=initial, unit=unit, file=out)


class StagePrinter:
    """A ``(stage, fraction)`` progress callback (``ml.evaluation.evaluate.Progress``): prints
    ``[name] stage ...`` when the stage changes and moves the bar to ``fraction``."""

    def __init__(self, name: str, file: IO[str] | None = None) -> None:
        self.name, self.stage = name, ""
        self.bar = progress_bar(
            desc=name,
            total=STEPS,
            file=file,
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
