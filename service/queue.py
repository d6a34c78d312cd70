"""Hand jobs to the Celery workers: only job ids cross the broker; the rest is in the database."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service.db.models import Job
from service.exceptions import ServiceUnavailable
from workers.celery_app import TASKS, get_celery


def enqueue(job: Job) -> None:
    """Publish the job's task; an unreachable broker is a 503 for the caller to retry."""
    name, queue = TASKS[str(job.kind)]
    try:
        get_celery().send_task(
            name,
            args=[job.id],
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as exc:  # kombu raises OperationalError and friends
        raise ServiceUnavailable("broker", str(exc).strip() or type(exc).__name__) from exc


def ping_broker() -> None:
    with get_celery().connection_for_write() as conn:
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
