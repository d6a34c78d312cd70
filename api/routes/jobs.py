"""Training jobs and the job queue: submit, list, inspect, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import ValidationError
from sqlalchemy import select

from api.db.models import Dataset, Job, JobKind, JobStatus, Model, ModelMode, ModelStatus, utc_now
from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep
from api.encoder import require_encoder_weights
from api.queue import submit
from api.schemas import MAX_ID, JobOut, ModelOut, TrainAccepted, TrainRequest

router = APIRouter(prefix="/jobs", tags=["jobs"])

TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def job_out(job: Job, request: Request) -> JobOut:
    """A job with links to what it concerns and, once done, what it produced."""
    links = {"self": str(request.url_for("get_job", job_id=job.id))}
    if job.model_id is not None:
        links["model"] = str(request.url_for("get_model", model_id=job.model_id))
    for batch in job.batches:
        links["batch"] = str(request.url_for("get_batch", batch_id=batch.id))
        links["zip"] = str(request.url_for("batch_zip", batch_id=batch.id))
    return JobOut.model_validate(job).model_copy(update={"links": links})


def train_config(body: TrainRequest, mode: str) -> dict[str, Any]:
    """The validated TrainConfig as JSON (ml.config is torch-free at import)."""
    from ml.config import describe_validation_error, make_config

    try:
        cfg = make_config(body.preset, {**body.overrides, "mode": mode})
    except ValidationError as exc:
        raise HTTPException(422, f"overrides: {describe_validation_error(exc)}") from exc
    except ValueError as exc:
        raise HTTPException(422, f"overrides: {exc}") from exc
    return cfg.model_dump(mode="json")


@router.post("/train", status_code=status.HTTP_202_ACCEPTED)
def submit_training(
    body: TrainRequest, request: Request, session: SessionDep, settings: SettingsDep, key: AdminKey
) -> TrainAccepted:
    """Queue one training run per mode (``both``: prototype and baseline on the same split);
    422 if the encoder's weights (every run learns prototypes first) are not on this machine."""
    dataset = session.get(Dataset, body.dataset_id)
    if dataset is None:
        raise HTTPException(404, f"no dataset with id {body.dataset_id}; see GET /datasets")
    classes = body.classes or list(dataset.classes)
    unknown = sorted(set(classes) - set(dataset.classes))
    if unknown or len(classes) < 2:
        raise HTTPException(
            422,
            f"classes {unknown or classes} not usable: choose at least two of {dataset.classes}",
        )
    modes = ["prototype", "baseline"] if body.mode == "both" else [body.mode]
    configs = {m: train_config(body, m) for m in modes}
    require_encoder_weights(settings)
    selection = {
        "root": dataset.root, "layout": dataset.layout, "n_per_class": body.n_per_class,
        "n_heldout": body.n_heldout, "seed": body.seed, "classes": classes,
    }  # fmt: skip
    jobs = []
    for mode in modes:
        model = Model(
            dataset=dataset, mode=ModelMode(mode), preset=body.preset, config=configs[mode],
            classes=classes, status=ModelStatus.pending,
        )  # fmt: skip
        params = {"dataset_id": dataset.id, "selection": selection, "k": body.k, "mode": mode}
        jobs.append(Job(kind=JobKind.train, model=model, params=params, requested_by=key.name))
    session.add_all(jobs)
    submit(session, jobs)
    return TrainAccepted(
        jobs=[job_out(j, request) for j in jobs],
        models=[ModelOut.model_validate(j.model) for j in jobs],
    )


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


def get_or_404(session: SessionDep, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return job


@router.get("/{job_id}")
def get_job(job_id: IdPath, request: Request, session: SessionDep, _reader: Reader) -> JobOut:
    return job_out(get_or_404(session, job_id), request)


@router.post("/{job_id}/cancel")
def cancel_job(job_id: IdPath, request: Request, session: SessionDep, _admin: AdminKey) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next progress report."""
    job = get_or_404(session, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} already finished ({job.status})")
    if job.status == JobStatus.queued:
        job.status, job.finished_at = JobStatus.cancelled, utc_now()
        if job.model is not None and job.kind == JobKind.train:
            job.model.status = ModelStatus.cancelled
    job.cancel_requested = True
    session.commit()
    return job_out(job, request)
