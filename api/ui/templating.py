"""The dashboard's Jinja2 set-up: autoescaped templates from ``api/templates``, root-relative
links to named routes, and the filters that format numbers, durations and dates as the pages'
JS formats their live updates."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def route_path(request: Request, name: str, /, **params: Any) -> str:
    """Root-relative link to a named route: works behind a proxy whatever its scheme or host
    (``request.url_for`` would bake in the scheme and host the proxy forwarded)."""
    root: str = request.scope.get("root_path", "")
    return root + str(request.app.url_path_for(name, **params))


@jinja2.pass_context
def _path(ctx: jinja2.runtime.Context, name: str, /, **params: Any) -> str:
    return route_path(ctx["request"], name, **params)


def percent(fraction: float | None) -> str:
    """Whole percent, rounded half up as JS's Math.round does, so live updates match."""
    return "—" if fraction is None else f"{math.floor(fraction * 100 + 0.5)}%"


def duration(seconds: float | None) -> str:
    """An ETA as people read it; the page's JS formats live updates the same way."""
    if seconds is None:
        return "—"
    total = max(0, math.floor(seconds + 0.5))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: Any, digits: int = 4) -> str:
    """A metric that may be absent or not a number (metrics are free-form JSON)."""
    if not is_number(value):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.StrictUndefined,  # a typo in a template fails a test, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["path"] = _path
    env.filters.update(percent=percent, duration=duration, when=when, number=number)
    return env


templates = Jinja2Templates(env=_environment())


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def not_found(request: Request, what: str) -> HTMLResponse:
    """An HTML 404 (the app's handlers answer JSON, which a browser shows as raw text)."""
    return page(request, "message.html", 404, title="Not found", message=what)
