"""The one way tests wait: poll a condition until it holds. Timeouts are hang guards, never a
proof; a test must not pass or fail by how fast the machine is, only by what it observes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float = 120,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.3,
    ignore: tuple[type[BaseException], ...] = (),
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that. On timeout raise
    ``TimeoutError`` naming ``what``, the last value seen (or the last ignored exception) and
    ``details()`` (a log tail, say), so a failure says where it stuck. Exceptions the predicate
    raises propagate (a process that died is a failure at once), except those in ``ignore``
    (a server that is still starting)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    said = what() if callable(what) else what
    extra = f"\n{details()}" if details is not None else ""
    raise TimeoutError(f"{said}: still not so after {timeout} s; last value: {last!r}{extra}")
