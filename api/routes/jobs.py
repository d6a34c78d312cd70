"""Jobs: submit training (``/jobs/train``) and evaluation (``/jobs/evaluate``); list, inspect,
cancel. Sampling and review-sync jobs are submitted by ``/generate`` and ``/reviews``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from sqlalchemy import select

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep, get_or_404
from api.responses import job_out
from api.schemas import JobOut, ModelOut, TrainAccepted
from service.db.models import MAX_ID, Job, JobKind, JobStatus
from service.evaluations import EvaluateRequest, request_evaluation
from service.job_state import request_cancel
from service.training import TrainRequest, request_training

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("/train", status_code=status.HTTP_202_ACCEPTED)
def submit_training(
    body: TrainRequest, request: Request, session: SessionDep, settings: SettingsDep, key: AdminKey
) -> TrainAccepted:
    """Queue one training run per mode (``both``: prototype and baseline on the same split);
    422 if the CLIP encoder's weights (every run learns prototypes first) are not on this machine
    (none are needed with ``prototype_encoder="learned"``), or if a class holds fewer images
    than the split asks (``service.splits``)."""
    jobs = request_training(session, settings, body, key.name)
    return TrainAccepted(
        jobs=[job_out(j, request) for j in jobs],
        models=[ModelOut.model_validate(j.model) for j in jobs],
    )


@router.post("/evaluate", status_code=status.HTTP_202_ACCEPTED, tags=["evaluation"])
def submit_evaluation(
    body: EvaluateRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
) -> JobOut:
    """A classifier trained on real, baseline and prototype images of equal size per class and
    tested on the held-out real images; CLIP-space FD, precision/recall, prototype
    consistency. ``test_dataset_id``: test on that dataset's images instead of the held-out ones
    (an external set, classes matched by name; 422 names the missing classes). Runs on a GPU
    worker; the result is the job's and ``GET /reports/evaluation``."""
    return job_out(request_evaluation(session, settings, body, key.name), request)


@router.get("")
def list_jobs(
    request: Request,
    session: SessionDep,
    _reader: Reader,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: JobKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[JobOut]:
    """Newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if status_ is not None:
        query = query.where(Job.status == status_)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [job_out(j, request) for j in session.scalars(query)]


@router.get("/{job_id}")
def get_job(job_id: IdPath, request: Request, session: SessionDep, _reader: Reader) -> JobOut:
    return job_out(get_or_404(session, Job, job_id), request)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: IdPath, request: Request, session: SessionDep, _admin: AdminKey) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next progress report."""
    return job_out(request_cancel(session, job_id), request)
