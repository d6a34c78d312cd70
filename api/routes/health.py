"""Liveness (``/health``: the process answers) and readiness (``/ready``: its dependencies do)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.errors import RETRY_AFTER_S
from service.db.session import get_engine
from service.queue import ping_broker
from service.storage import get_storage

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


def _check(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # report, never raise: readiness must always answer
        return f"error: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc!r}"
    return "ok"


def _database() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/ready", responses={503: {"description": "A dependency is down."}})
def ready() -> JSONResponse:
    """200 when the database, broker and storage all answer; else 503 naming the failures."""
    checks = {
        "database": _check(_database),
        "broker": _check(ping_broker),
        "storage": _check(lambda: get_storage().ping()),
    }
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": str(RETRY_AFTER_S)},
    )
