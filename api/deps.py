"""FastAPI dependencies as ``Annotated`` aliases: database session, settings, storage, caller.

Who may do what (the README's Security section says the same): admin keys everything; viewer
keys read results and write nothing; reviewer keys read only what cannot unblind them (criteria,
review projects); no key reads nothing but /health, /ready, the API docs and review images
(whose random token is the capability Label Studio's editor loads them with).
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.config import Settings, get_settings
from service.db.models import MAX_ID, ApiKey, ApiKeyRole
from service.db.session import get_session
from service.rows import get_row
from service.security import find_key, find_session
from service.storage import Storage, get_storage

# Ids larger than a PostgreSQL INTEGER cannot name a row: 422 here, not a database error.
IdPath = Annotated[int, PathParam(ge=1, le=MAX_ID)]
IdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID)]

SessionDep = Annotated[Session, Depends(get_session)]

Row = TypeVar("Row")


def get_or_404(
    session: Session, model: type[Row], id_: int, noun: str | None = None, hint: str = ""
) -> Row:
    """:func:`service.rows.get_row`: a miss is :class:`~ml.errors.NotFound` "no <noun> with id
    <id><hint>", answered 404, worded as the service core's actions word it."""
    return get_row(session, model, id_, noun, hint)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer pm_...`")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def require_key(session: SessionDep, creds: Credentials) -> ApiKey:
    """Any live key (401 without one or with an unknown or revoked one)."""
    if creds is None or not creds.credentials:
        raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    key = find_key(session, creds.credentials)
    if key is None:
        raise _unauthorized("unknown or revoked API key")
    return key


def require_admin(key: Annotated[ApiKey, Depends(require_key)]) -> ApiKey:
    """Writes that change datasets, models, jobs or keys: admin role (403 otherwise)."""
    if key.role != ApiKeyRole.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this needs an admin key; key '{key.name}' is {key.role}"
        )
    return key


SESSION_COOKIE = "protomed_session"
READER_ROLES = (ApiKeyRole.admin, ApiKeyRole.viewer)


def caller(session: SessionDep, creds: Credentials, request: Request) -> ApiKey | None:
    """Who reads: the bearer key if one is sent (a wrong one is a 401, never a fallback), else
    the dashboard login cookie, else nobody. Only reads accept the cookie: writes take a bearer
    key, so a page on another site can never make a logged-in browser change anything."""
    if creds is not None and creds.credentials:
        return require_key(session, creds)
    token = request.cookies.get(SESSION_COOKIE)
    return find_session(session, token) if token else None


Caller = Annotated[ApiKey | None, Depends(caller)]


def require_reader(key: Caller) -> ApiKey:
    """Reads of datasets, models, batches, images, jobs and reports: an admin or viewer key.
    Reviewer keys get 403: those pages show modes, models, batches and image hashes, and a
    reviewer who saw them could unblind the images they judge."""
    if key is None:
        raise _unauthorized(
            "an API key is required to read this: send 'Authorization: Bearer <key>' "
            "(browsers: log in at /ui/login)"
        )
    if key.role not in READER_ROLES:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"key '{key.name}' is a {key.role} key: reviewers may read only /criteria and "
            "/reviews/projects (blinding); this needs an admin or viewer key",
        )
    return key


def require_any_reader(key: Caller) -> ApiKey:
    """Reads that reveal nothing about modes (criteria, review projects): any live key."""
    if key is None:
        raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    return key


AdminKey = Annotated[ApiKey, Depends(require_admin)]
Reader = Annotated[ApiKey, Depends(require_reader)]
AnyReader = Annotated[ApiKey, Depends(require_any_reader)]
