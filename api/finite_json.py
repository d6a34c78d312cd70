"""JSON bodies with NaN, Infinity or numbers too large for a double (``1e400``) are refused.

JSON has no such numbers, but Python's ``json`` (what Starlette parses bodies with) reads
``NaN`` and ``Infinity`` and turns ``1e400`` into infinity. Let through, they reach fields
typed ``Any`` (training overrides, the webhook's ignored fields), the database's JSON columns
and every later answer, which then cannot be written as JSON (a 500). One app-wide dependency
checks every JSON body after parsing, before any route dependency or handler runs, so a route
added later is covered without doing anything; the 422 has FastAPI's validation shape and
names where the number is. Validation errors are also made JSON-safe (:func:`json_safe`), for
the NaN a query string can still carry.
"""

from __future__ import annotations

import email.message
import json
import math
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from fastapi.routing import APIRoute

NON_FINITE_MSG = (
    "Input should be a finite number: JSON has no NaN or Infinity, and this number is outside "
    "the range of a double (about +-1.8e308)"
)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name ('nan', 'inf', '-inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def non_finite(value: Any, loc: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Where in a parsed JSON document a non-finite number is (every place, in order)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield loc
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(v, (*loc, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from non_finite(v, (*loc, i))


def _parses_json(request: Request) -> bool:
    """Whether FastAPI reads this request's body as JSON: a route with a non-form body, sent
    without a content type or with ``application/json`` or ``application/*+json``."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None:
        return False
    if isinstance(route.body_field.field_info, Form):
        return False
    content_type = request.headers.get("content-type")
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def refuse_non_finite(request: Request) -> None:
    """An app-wide dependency: 422 naming every place a JSON body holds a non-finite number.
    FastAPI has already read (and cached) the body, so this reads nothing more."""
    if not _parses_json(request):
        return
    body = await request.body()
    if not body:
        return
    try:
        document = json.loads(body)
    except ValueError:  # FastAPI answered malformed JSON before any dependency ran
        return
    errors = [
        {"type": "finite_number", "loc": ("body", *loc), "msg": NON_FINITE_MSG, "input": None}
        for loc in non_finite(document)
    ]
    if errors:
        raise RequestValidationError(errors)
