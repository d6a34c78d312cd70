"""The Redis broker's key prefix: installations (and concurrent test runs) sharing one Redis
database keep their queues apart, so neither takes nor deletes the other's messages."""

from __future__ import annotations

import pytest
import redis
from conftest import REDIS_URL, redis_broker, reset_service_caches


def test_two_prefixes_on_one_database_keep_their_queues_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jobs published by installation A wait under A's keys only; B's queue stays empty."""
    from service.job_kinds import GPU_QUEUE
    from service.queue import get_producer

    client = redis.Redis.from_url(REDIS_URL)
    with redis_broker() as a, redis_broker() as b:
        assert a["PROTOMED_BROKER_URL"] == b["PROTOMED_BROKER_URL"]  # one database, shared
        try:
            for env, n in ((a, 2), (b, 0)):
                for k, v in env.items():
                    monkeypatch.setenv(k, v)
                reset_service_caches()
                for job_id in range(n):
                    get_producer().send_task("protomed.train", args=[job_id], queue=GPU_QUEUE)
            assert client.llen(a["PROTOMED_BROKER_KEY_PREFIX"] + GPU_QUEUE) == 2
            assert client.llen(b["PROTOMED_BROKER_KEY_PREFIX"] + GPU_QUEUE) == 0
        finally:
            reset_service_caches()


def test_prefix_is_validated() -> None:
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="broker_key_prefix"):
        Settings(broker_key_prefix="bad prefix with spaces")
