"""FastAPI dependencies as ``Annotated`` aliases: database session, settings, storage, caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query, status
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.config import Settings, get_settings
from api.core.security import find_key
from api.db.models import ApiKey, ApiKeyRole
from api.db.session import get_session
from api.schemas import MAX_ID
from api.storage import Storage, get_storage

# Ids larger than a PostgreSQL INTEGER cannot name a row: 422 here, not a database error.
IdPath = Annotated[int, PathParam(ge=1, le=MAX_ID)]
IdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID)]

SessionDep = Annotated[Session, Depends(get_session)]
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


def optional_reader(
    session: SessionDep, creds: Credentials, settings: SettingsDep
) -> ApiKey | None:
    """Reads are open unless ``read_requires_key`` is set; a presented key must be valid."""
    if creds is None and not settings.read_requires_key:
        return None
    return require_key(session, creds)


AnyKey = Annotated[ApiKey, Depends(require_key)]
AdminKey = Annotated[ApiKey, Depends(require_admin)]
Reader = Annotated[ApiKey | None, Depends(optional_reader)]
