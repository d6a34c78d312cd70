"""Hand jobs to the Celery workers: only job ids cross the broker; the rest is in the database.

The producer side of the queue, with its own small Celery client (broker only, no tasks): the
API and the workers both publish through it by task name, and neither needs the other's code.
The task names and queues are the registry's (``service.job_kinds``), the contract
``workers.tasks`` registers against.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from service.config import get_settings
from service.db.models import Job
from service.exceptions import ServiceUnavailable
from service.job_kinds import DEFAULT_QUEUE, spec_for


def transport_options(broker_url: str, key_prefix: str = "") -> dict[str, Any]:
    """Broker settings the producer and the workers' app share (``key_prefix``: see
    ``Settings.broker_key_prefix``)."""
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacknowledged message after this long; long jobs are guarded by
        # the database claim (a live heartbeat wins), so redelivering a running job is a no-op.
        options: dict[str, Any] = {"visibility_timeout": 3600}
        if key_prefix:
            options["global_keyprefix"] = key_prefix
        return options
    if broker_url.startswith("sqla+sqlite"):
        # kombu passes these to create_engine: wait for the file lock (the API publishes while
        # the worker polls) instead of failing after sqlite3's default 5 s.
        return {"connect_args": {"timeout": 30}}
    return {}


@lru_cache(maxsize=1)
def get_producer() -> Celery:
    """A broker-only Celery client for the current settings (tests clear the cache)."""
    settings = get_settings()
    url = settings.broker_url
    producer = Celery("protomed-producer", broker=url)
    producer.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options=transport_options(url, settings.broker_key_prefix),
    )
    return producer


def enqueue(job: Job) -> None:
    """Publish the job's task; an unreachable broker is a 503 for the caller to retry."""
    spec = spec_for(str(job.kind))
    try:
        get_producer().send_task(
            spec.task,
            args=[job.id],
            queue=spec.queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises OperationalError and friends
        raise ServiceUnavailable("broker", str(exc).strip() or type(exc).__name__) from exc


def ping_broker() -> None:
    with get_producer().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


def submit(session: Session, jobs: Sequence[Job]) -> None:
    """Commit new jobs, then publish them; if the broker refuses, remove them again (with
    their models and batches) so a failed request leaves nothing behind, and answer 503."""
    session.commit()
    try:
        for job in jobs:
            enqueue(job)
    except ServiceUnavailable:
        for job in jobs:
            for batch in list(job.batches):
                session.delete(batch)
            model = job.model if job.kind == "train" else None
            session.delete(job)
            if model is not None:
                session.delete(model)
        session.commit()
        raise
