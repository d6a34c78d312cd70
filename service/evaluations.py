"""Reading finished evaluations back: the latest one (of a dataset, or a given job), its typed
result and payload, and its CSV, shared by ``GET /reports/evaluation`` and the dashboard."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.schemas.evaluation import EvaluationResult, evaluation_tables, tables_csv  # torch-free
from service.db.models import Job, JobKind, JobStatus
from service.payloads import EvaluatePayload


def latest_evaluation(
    session: Session, dataset_id: int | None = None, job_id: int | None = None
) -> Job | None:
    """The newest succeeded evaluate job matching the filters, if any."""
    query = select(Job).where(Job.kind == JobKind.evaluate, Job.status == JobStatus.succeeded)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    jobs = session.scalars(query.order_by(Job.id.desc())).all()
    if dataset_id is not None:
        jobs = [
            j for j in jobs if EvaluatePayload.model_validate(j.params).dataset_id == dataset_id
        ]
    return jobs[0] if jobs else None


def evaluation_of(job: Job) -> tuple[EvaluatePayload, EvaluationResult]:
    """A finished evaluate job's request and result, as the worker stored them."""
    return EvaluatePayload.model_validate(job.params), EvaluationResult.model_validate(job.result)


def evaluation_csv(result: EvaluationResult) -> str:
    """Every table of the result (Tables 5-6 in %, CLIP space overall and per class, the toy
    checker), as the CLI prints and the dashboard shows them; a blank row between tables."""
    return tables_csv(evaluation_tables(result))
