"""The Redis broker's key prefix: installations (and concurrent test runs) sharing one Redis
database keep their queues apart, so neither takes nor deletes the other's messages."""

from __future__ import annotations

import os
import uuid

import pytest
import redis
from conftest import reset_service_caches

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def shared_redis() -> redis.Redis:
    client = redis.Redis.from_url(URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        if os.environ.get("PROTOMED_REQUIRE_SERVICES"):
            pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but Redis is unreachable: {exc}")
        pytest.skip(f"Redis unreachable at {URL}: {exc}")
    return client


def test_two_prefixes_on_one_database_keep_their_queues_apart(
    shared_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job published by installation A waits under A's keys only; B's queue stays empty."""
    from service.queue import GPU_QUEUE, get_producer

    a, b = (f"pmtest-{uuid.uuid4().hex[:8]}:" for _ in range(2))
    monkeypatch.setenv("PROTOMED_BROKER_URL", URL)
    try:
        for prefix, n in ((a, 2), (b, 0)):
            monkeypatch.setenv("PROTOMED_BROKER_KEY_PREFIX", prefix)
            reset_service_caches()
            for job_id in range(n):
                get_producer().send_task("protomed.train", args=[job_id], queue=GPU_QUEUE)
        assert shared_redis.llen(f"{a}{GPU_QUEUE}") == 2
        assert shared_redis.llen(f"{b}{GPU_QUEUE}") == 0
    finally:
        for prefix in (a, b):
            keys = list(shared_redis.scan_iter(f"{prefix}*"))
            if keys:
                shared_redis.delete(*keys)
        reset_service_caches()


def test_prefix_is_validated() -> None:
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="broker_key_prefix"):
        Settings(broker_key_prefix="bad prefix with spaces")
