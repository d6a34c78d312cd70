"""API keys: random bearer tokens, stored as SHA-256 hashes, each with a role.

Keys are 256-bit random strings, so a fast hash is enough (no password stretching needed): a
leaked database does not reveal usable keys, and lookup is one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ml.errors import Conflict
from service.db.models import ApiKey, ApiKeyRole, UiSession, utc_now
from service.rows import get_row

KEY_PREFIX = "pm_"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def find_key(session: Session, key: str) -> ApiKey | None:
    """The live (not revoked) key row for a presented token, if any."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and row.revoked_at is None else None


def revoked_key(session: Session, key: str) -> ApiKey | None:
    """The key row if this token was revoked: a bootstrap must neither reuse nor revive it."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row if row is not None and row.revoked_at is not None else None


def create_key(
    session: Session, name: str, role: ApiKeyRole | str, key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key (``key`` given: that token, e.g. the bootstrap admin key); returns the
    row and the plaintext, which is shown once and never stored."""
    token = key or new_key()
    row = ApiKey(name=name, key_hash=hash_key(token), role=ApiKeyRole(role))
    session.add(row)
    session.flush()
    return row, token


def revoke_api_key(session: Session, key_id: int, by: ApiKey) -> ApiKey:
    """Revoke the key (committed; revoking a revoked key changes nothing). :class:`Conflict`
    for the caller's own key: an admin revoking itself could lock everyone out."""
    row = get_row(session, ApiKey, key_id, "API key")
    if row.id == by.id:
        raise Conflict("a key cannot revoke itself")
    if row.revoked_at is None:
        row.revoked_at = utc_now()
        session.commit()
    return row


def ensure_key(session: Session, name: str, role: ApiKeyRole | str, key: str) -> ApiKey:
    """Idempotent bootstrap: the key exists after this call (committed by the caller). A key
    that was revoked stays revoked (see :func:`revoked_key`)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None:
        row, _ = create_key(session, name, role, key)
    return row


# --- dashboard logins ---------------------------------------------------------------------------
# A browser cannot send an Authorization header when it follows a link or loads an <img>, so the
# dashboard trades an API key for a session: a fresh random token in an HttpOnly cookie, stored
# here only as its hash (the raw key never leaves the login form), tied to the key so revoking
# the key ends its sessions too.


def open_session(session: Session, key: ApiKey, hours: float) -> str:
    """A new login for ``key`` lasting ``hours``; returns the cookie's token (shown once)."""
    token = secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + timedelta(hours=hours)
    session.add(UiSession(token_hash=hash_key(token), key_id=key.id, expires_at=expires))
    session.flush()
    return token


def find_session(session: Session, token: str) -> ApiKey | None:
    """The live key behind a session cookie: None when unknown, expired or its key revoked."""
    row = session.scalar(select(UiSession).where(UiSession.token_hash == hash_key(token)))
    if row is None or row.expires_at <= datetime.now(UTC) or row.key.revoked_at is not None:
        return None
    return row.key


def close_session(session: Session, token: str) -> None:
    """Logout: the token no longer opens anything (also drops expired sessions)."""
    session.execute(
        delete(UiSession).where(
            (UiSession.token_hash == hash_key(token)) | (UiSession.expires_at <= datetime.now(UTC))
        )
    )
