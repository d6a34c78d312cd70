"""Shared fixtures: real-data location, small-model settings, temporary folders."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import torch
from alembic.config import Config

REPO = Path(__file__).resolve().parents[1]

# Tests never download anything: make the Hugging Face hub (open_clip's weight source) offline
# before any library reads the setting.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data_dir() -> Path:
    """Where the real datasets live: PROTOMED_DATA_DIR, else ../shared/data beside the repo."""
    return Path(os.environ.get("PROTOMED_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-image folder; tests needing it skip, saying why, where it is absent."""
    root = shared_data_dir()
    if not (root / "derm64").is_dir() or not (root / "cells64").is_dir():
        if os.environ.get("PROTOMED_REQUIRE_REAL_DATA"):  # CI: a missing folder is a failure
            pytest.fail(f"PROTOMED_REQUIRE_REAL_DATA is set but {root} lacks derm64/cells64")
        pytest.skip(
            f"real data not found at {root} (set PROTOMED_DATA_DIR to the folder holding "
            "derm64/ and cells64/; CI provides ../shared/data)"
        )
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two cores here: keep torch from oversubscribing them."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


PG_ADMIN_URL = os.environ.get(
    "PROTOMED_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def alembic_config(url: str) -> Config:
    """The repo's alembic.ini pointed at ``url``; leaves pytest's logging alone."""
    cfg = Config(str(REPO / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    cfg.attributes["configure_logger"] = False
    return cfg


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database, dropped afterwards. Skips where the server
    is unreachable, unless PROTOMED_REQUIRE_SERVICES is set (CI), where it fails."""
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL unreachable at {PG_ADMIN_URL}: {e}".strip()
        if os.environ.get("PROTOMED_REQUIRE_SERVICES"):
            pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but {reason}")
        pytest.skip(f"{reason} (set PROTOMED_REQUIRE_SERVICES to make this a failure)")
    name = f"protomed_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            reset_service_caches()  # close pooled connections of the app before dropping
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


REDIS_URL = os.environ.get("PROTOMED_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def redis_broker() -> Iterator[dict[str, str]]:
    """Broker settings for a Redis namespace of this test's own: a random key prefix, never a
    database flush, so concurrent test runs on one Redis neither take nor delete each other's
    messages; its keys are removed afterwards. Skips where Redis is unreachable, unless
    PROTOMED_REQUIRE_SERVICES is set (CI), where it fails."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as e:
        reason = f"Redis unreachable at {REDIS_URL}: {e}"
        if os.environ.get("PROTOMED_REQUIRE_SERVICES"):
            pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but {reason}")
        pytest.skip(f"{reason} (set PROTOMED_REQUIRE_SERVICES to make this a failure)")
    prefix = f"pmtest-{uuid.uuid4().hex[:12]}:"
    try:
        yield {"PROTOMED_BROKER_URL": REDIS_URL, "PROTOMED_BROKER_KEY_PREFIX": prefix}
    finally:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback, standing in for S3/MinIO (no AWS account, no network)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def reset_service_caches() -> None:
    """Forget the process-wide settings, engine, storage, queue producer and Celery app (after
    env changes)."""
    from service.config import get_settings
    from service.db.session import get_engine, get_sessionmaker
    from service.queue import get_producer
    from service.storage import get_storage
    from workers.celery_app import get_celery

    if get_engine.cache_info().currsize:
        get_engine().dispose()
    for cached in (
        get_settings,
        get_engine,
        get_sessionmaker,
        get_storage,
        get_producer,
        get_celery,
    ):
        cached.cache_clear()


ADMIN_KEY = "pm_test-admin-key-0123456789"


@dataclass
class Service:
    """An in-process API on a fresh SQLite database, local storage and an embedded broker."""

    client: Any  # fastapi.testclient.TestClient
    admin: dict[str, str]  # headers carrying the bootstrap admin key
    data_root: Path  # a folder under the allowed data roots, empty at start
    tmp: Path
    env: dict[str, str]


def service_env(tmp: Path, **extra: str) -> dict[str, str]:
    """PROTOMED_* settings for a self-contained service under ``tmp``."""
    env = {
        "PROTOMED_DATABASE_URL": f"sqlite:///{tmp / 'protomed.db'}",
        "PROTOMED_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
        "PROTOMED_STORAGE_BACKEND": "local",
        "PROTOMED_STORAGE_DIR": str(tmp / "storage"),
        "PROTOMED_WORK_DIR": str(tmp / "work"),
        "PROTOMED_DATA_ROOTS": json.dumps([str(tmp / "data"), str(shared_data_dir())]),
        "PROTOMED_ADMIN_KEY": ADMIN_KEY,
        "PROTOMED_ENCODER": "protomed-tiny-vit",
        "PROTOMED_ENCODER_WEIGHTS": "untrained",
    }
    env.update(extra)
    return env


def migrate(url: str) -> None:
    from alembic import command

    command.upgrade(alembic_config(url), "head")


@contextmanager
def make_service(tmp: Path, monkeypatch: pytest.MonkeyPatch, **extra: str) -> Iterator[Service]:
    """The in-process API of the ``service`` fixture, with extra PROTOMED_* settings (smaller
    limits...)."""
    from fastapi.testclient import TestClient

    env = service_env(tmp, **extra)
    (tmp / "data").mkdir(exist_ok=True)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_service_caches()
    migrate(env["PROTOMED_DATABASE_URL"])
    from api.main import create_app

    try:
        with TestClient(create_app()) as client:
            yield Service(client, {"Authorization": f"Bearer {ADMIN_KEY}"}, tmp / "data", tmp, env)
    finally:
        reset_service_caches()


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    with make_service(tmp_path, monkeypatch) as svc:
        yield svc


def fake_hub_cache(cache: Path, repo: str, filename: str, content: bytes = b"") -> Path:
    """Put ``filename`` of the model repo ``repo`` into a Hugging Face hub cache folder laid out
    as huggingface_hub writes it (refs/main -> snapshots/<commit>/), as if downloaded earlier."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """PROTOMED_TEST_REVERSE=1 runs the collected tests in reverse order: a check that no test
    depends on what an earlier one left behind."""
    if os.environ.get("PROTOMED_TEST_REVERSE"):
        items.reverse()
