"""The FastAPI application: ``uvicorn api.main:app``.

Starts without torch or the ML core: training and sampling happen in Celery workers
(``workers/``); the API validates requests, keeps metadata and hands out results.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from api.errors import install_handlers
from api.finite_json import refuse_non_finite
from api.routes import (
    batches,
    dashboard,
    datasets,
    health,
    images,
    jobs,
    keys,
    models,
    reports,
    reviews,
    scorers,
    studies,
    sweeps,
)
from service.config import get_settings

log = logging.getLogger(__name__)


def bootstrap() -> None:
    """Idempotent start-up writes: the default criteria sets, and the bootstrap admin key
    (``PROTOMED_ADMIN_KEY``) when one is configured."""
    from service.criteria import ensure_defaults
    from service.db.session import get_sessionmaker
    from service.security import ensure_key

    settings = get_settings()
    with get_sessionmaker()() as session:
        ensure_defaults(session)
        if settings.admin_key:
            row = ensure_key(session, "admin (bootstrap)", "admin", settings.admin_key)
            if row.revoked_at is not None:
                log.warning(
                    "PROTOMED_ADMIN_KEY is revoked (key id %s) and stays revoked: set a live "
                    "admin key",
                    row.id,
                )
        session.commit()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    try:
        bootstrap()
    except Exception as exc:  # the database may come up later; /ready reports it meanwhile
        log.warning("bootstrap skipped: %s", exc)
    yield


def create_app() -> FastAPI:
    # FastAPIOffline: /docs and /redoc with their JS, CSS and favicon served by this app
    # (fastapi_offline's static files), not from a CDN, so the docs work without internet.
    app = FastAPIOffline(
        title="protomed",
        version="0.1.0",
        summary="Prototype-guided class-conditional diffusion: train, generate, review.",
        lifespan=lifespan,
        # Every JSON body: NaN, Infinity and 1e400 are a 422 naming the field (finite_json).
        dependencies=[Depends(refuse_non_finite)],
    )
    install_handlers(app)
    for module in (
        health,
        datasets,
        jobs,
        models,
        batches,
        images,
        reviews,
        reports,
        keys,
        sweeps,
        scorers,
        studies,
        dashboard,
    ):
        app.include_router(module.router)
    return app


app = create_app()
