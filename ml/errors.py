"""The errors a user can cause, as one small hierarchy that every layer raises and each front end
translates once: the API's handler (api/errors.py) answers ``status`` with the message, the CLI
(``ml.cli``) prints ``error: <message>`` and exits 2. Anything else is a bug and keeps its
traceback. Torch-free and dependency-free, so the service and the API import it freely.

The three kinds subclass the built-in they replace (ValueError, LookupError), so code that
caught those still catches them."""

from __future__ import annotations

from typing import ClassVar


class UserError(Exception):
    """Bad input or a request the current state does not allow; the message says what was wrong
    and what is allowed. ``status`` is the HTTP status the API answers with."""

    status: ClassVar[int] = 400


class Invalid(UserError, ValueError):
    """The input itself is wrong (a value out of range, an unknown name, a malformed file)."""

    status = 422


class NotFound(UserError, LookupError):
    """What the input names does not exist (a model, a class, a file, a job)."""

    status = 404


class Conflict(UserError):
    """The input is fine but the current state refuses it (the job is still running, the name
    is taken, the batch was already sent)."""

    status = 409
