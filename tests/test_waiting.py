"""The tests' one waiting helper: it returns what it waited for, a timeout says what it was
waiting for and what it saw last, and a failure inside the condition is not waited out."""

from __future__ import annotations

import pytest
from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, {}, {"status": "succeeded"}])
    assert wait_until(lambda: next(values), interval=0) == {"status": "succeeded"}


def test_timeout_names_the_condition_the_last_value_and_the_details() -> None:
    with pytest.raises(TimeoutError) as err:
        wait_until(lambda: [], timeout=0, what="job 7 succeeded", details=lambda: "log tail")
    assert str(err.value) == "job 7 succeeded: still not so after 0 s; last value: []\nlog tail"


def test_ignored_errors_are_retried_and_shown_others_end_the_wait() -> None:
    def refused() -> bool:
        raise ConnectionError("refused")

    with pytest.raises(TimeoutError, match="last value: ConnectionError"):
        wait_until(refused, timeout=0, ignore=(ConnectionError,))
    with pytest.raises(ConnectionError):
        wait_until(refused, timeout=60)
