"""The service core's errors as HTTP answers: a dependency's failure is a 503 with a message and
Retry-After (a request that fails this way has changed nothing: writes commit only after every
dependency answered, so the client can simply retry); a user's mistake (ml.errors.UserError: a
split larger than the dataset, encoder weights the workers lack, ...) is its class's status with
the message saying what to change."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from api.finite_json import json_safe
from ml.errors import UserError
from service.exceptions import RETRY_AFTER_S, ServiceUnavailable

log = logging.getLogger(__name__)
__all__ = ["RETRY_AFTER_S", "ServiceUnavailable", "install_handlers", "unavailable"]


def unavailable(component: str, reason: str) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={
            "detail": f"{component} unavailable: {reason}; nothing was changed, retry later",
            "component": component,
        },
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, but one that can always be written: the input echoed in each error
        may hold NaN (a query string's ``nan``), which JSON cannot carry."""
        return JSONResponse(
            status_code=422, content={"detail": json_safe(jsonable_encoder(exc.errors()))}
        )

    @app.exception_handler(UserError)
    async def _user(_req: Request, exc: UserError) -> JSONResponse:
        """Every domain error, translated here once: its class says the status (ml/errors.py),
        its message what was wrong and what is allowed."""
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(ServiceUnavailable)
    async def _service(_req: Request, exc: ServiceUnavailable) -> JSONResponse:
        log.warning("%s", exc)
        return unavailable(exc.component, exc.reason)

    @app.exception_handler(OperationalError)
    async def _database(_req: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error: %s", exc.orig)
        return unavailable("database", str(exc.orig).strip().splitlines()[0][:200])

    @app.exception_handler(DataError)
    async def _data(_req: Request, exc: DataError) -> JSONResponse:
        """A value the database cannot store (out of range, malformed): the client's input."""
        reason = str(exc.orig).strip().splitlines()[0][:200]
        return JSONResponse(status_code=422, content={"detail": f"invalid value: {reason}"})

    @app.exception_handler(DBAPIError)
    async def _dbapi(_req: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return unavailable("database", "connection lost")
        raise exc
