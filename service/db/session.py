"""Engine and sessions built from :class:`service.config.Settings`.

Created lazily, so importing this module (and the app) opens no connection and tests can point
``PROTOMED_DATABASE_URL`` elsewhere before first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from service.config import get_settings, normalize_database_url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` (extra ``create_engine`` arguments in ``kwargs``); SQLite gets
    foreign keys switched on (off by default there), so ON DELETE rules behave as on PostgreSQL."""
    url = normalize_database_url(url)
    kwargs.setdefault("pool_pre_ping", True)
    if url.startswith("sqlite"):
        # FastAPI runs sync dependencies in a thread pool: allow a connection to change threads.
        # The API, the worker and its heartbeat thread write concurrently: wait for locks.
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_foreign_keys)
    return engine


def _sqlite_foreign_keys(dbapi_conn: Any, _record: Any) -> None:
    """Foreign keys on; WAL so readers (API polls) never block the worker's writes."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine for ``Settings.database_url``."""
    return make_engine(get_settings().database_url)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    """Sessions keep loaded attributes after commit, so responses can be built from them."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request, rolled back on error, always closed."""
    with get_sessionmaker()() as session:
        try:
            yield session
        except Exception:
            session.rollback()
            raise
