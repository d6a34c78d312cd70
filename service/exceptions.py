"""Exceptions shared by the API and the workers (no web framework imported here)."""

from __future__ import annotations

RETRY_AFTER_S = 5  # what a 503 tells clients to wait before retrying


class ServiceUnavailable(Exception):
    """A dependency (database, broker, storage) did not answer; ``component`` names it.

    The API answers 503 with Retry-After; a request failing this way has changed nothing."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"{component} unavailable: {reason}")
        self.component = component
        self.reason = reason
