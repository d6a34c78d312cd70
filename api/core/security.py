"""API keys: random bearer tokens, stored as SHA-256 hashes, each with a role.

Keys are 256-bit random strings, so a fast hash is enough (no password stretching needed): a
leaked database does not reveal usable keys, and lookup is one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import ApiKey, ApiKeyRole

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


def ensure_key(session: Session, name: str, role: ApiKeyRole | str, key: str) -> ApiKey:
    """Idempotent bootstrap: the key exists after this call (committed by the caller). A key
    that was revoked stays revoked (see :func:`revoked_key`)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None:
        row, _ = create_key(session, name, role, key)
    return row
