"""Jobs: submit training (``/jobs/train``) and evaluation (``/jobs/evaluate``); list, inspect,
cancel. Sampling and review-sync jobs are submitted by ``/generate`` and ``/reviews``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import ValidationError
from sqlalchemy import select

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep, get_or_404
from api.responses import job_out
from api.schemas import EvaluateRequest, JobOut, ModelOut, TrainAccepted, TrainRequest
from ml.schemas.evaluation import DownstreamConfig, EvalConfig  # torch-free
from service.db.models import (
    MAX_ID,
    Batch,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Model,
    ModelMode,
    ModelStatus,
)
from service.encoder import require_encoder_weights, require_prototype_encoder
from service.job_kinds import new_job
from service.job_state import cancel
from service.payloads import (
    EvaluatePayload,
    GivenBatches,
    ModelPair,
    Selection,
    TrainPayload,
)
from service.queue import submit
from service.splits import check_split

router = APIRouter(prefix="/jobs", tags=["jobs"])


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
    422 if the CLIP encoder's weights (every run learns prototypes first) are not on this machine
    (none are needed with ``prototype_encoder="learned"``), or if a class holds fewer images
    than the split asks (``service.splits``)."""
    dataset = get_or_404(session, Dataset, body.dataset_id, hint="; see GET /datasets")
    classes = body.classes or list(dataset.classes)
    unknown = sorted(set(classes) - set(dataset.classes))
    if unknown or len(classes) < 2:
        raise HTTPException(
            422,
            f"classes {unknown or classes} not usable: choose at least two of {dataset.classes}",
        )
    modes = ["prototype", "baseline"] if body.mode == "both" else [body.mode]
    configs = {m: train_config(body, m) for m in modes}
    check_split(dataset.counts, classes, body.n_per_class, body.n_heldout, body.k)
    require_prototype_encoder(settings)
    selection = Selection(
        root=dataset.root,
        layout=dataset.layout,
        n_per_class=body.n_per_class,
        n_heldout=body.n_heldout,
        seed=body.seed,
        classes=classes,
    )
    jobs = []
    for mode in modes:
        model = Model(
            dataset=dataset,
            mode=ModelMode(mode),
            preset=body.preset,
            config=configs[mode],
            classes=classes,
            status=ModelStatus.pending,
        )
        payload = TrainPayload(dataset_id=dataset.id, selection=selection, k=body.k, mode=mode)
        jobs.append(new_job(JobKind.train, payload, model=model, requested_by=key.name))
    session.add_all(jobs)
    submit(session, jobs)
    return TrainAccepted(
        jobs=[job_out(j, request) for j in jobs],
        models=[ModelOut.model_validate(j.model) for j in jobs],
    )


def _model(session: SessionDep, model_id: int, mode: ModelMode) -> Model:
    model = get_or_404(session, Model, model_id, hint="; see GET /models")
    if model.mode != mode:
        raise HTTPException(422, f"model {model_id} is a {model.mode} model, not {mode}")
    if model.status != ModelStatus.ready:
        raise HTTPException(409, f"model {model_id} is {model.status}, not ready")
    return model


def _batches(session: SessionDep, ids: list[int], model: Model, mode: str) -> list[int]:
    for batch_id in ids:
        batch = get_or_404(session, Batch, batch_id)
        if batch.model is None:
            raise HTTPException(422, f"batch {batch_id} holds real control images, not generated")
        if batch.model.dataset_id != model.dataset_id:
            raise HTTPException(
                422,
                f"batch {batch_id} is from dataset {batch.model.dataset_id}, "
                f"the models from dataset {model.dataset_id}",
            )
        if batch.model_id != model.id:
            raise HTTPException(
                422,
                f"batch {batch_id} was made by model {batch.model_id}, not the {mode} "
                f"model {model.id}",
            )
    return ids


def _test_dataset(session: SessionDep, dataset_id: int, model: Model) -> Dataset:
    """An external test set: another dataset holding every class of the models (by name);
    its other classes are ignored, as ``ml.evaluation.evaluate.external_test_set`` does."""
    dataset = get_or_404(session, Dataset, dataset_id, hint="; see GET /datasets")
    if dataset.id == model.dataset_id:
        raise HTTPException(
            422,
            f"test_dataset_id {dataset.id} is the dataset the models were trained on: "
            "give another dataset, or leave it out to test on the held-out part of their split",
        )
    have = {c for c in dataset.classes if (dataset.counts or {}).get(c, 1)}
    missing = sorted(set(model.classes) - have)
    if missing:
        raise HTTPException(
            422,
            f"test dataset {dataset.id} ({dataset.name}) has no images of the models' "
            f"class(es) {missing}: a test set must have every one of {sorted(model.classes)} "
            f"(it has {sorted(have) or 'none'}; its other classes are ignored)",
        )
    return dataset


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
    base = _model(session, body.baseline_model_id, ModelMode.baseline)
    proto = _model(session, body.prototype_model_id, ModelMode.prototype)
    if base.dataset_id != proto.dataset_id:
        raise HTTPException(
            422,
            f"the models are from different datasets ({base.dataset_id} and {proto.dataset_id})",
        )
    if body.test_dataset_id is not None:
        _test_dataset(session, body.test_dataset_id, proto)
    require_encoder_weights(settings)  # the CLIP-space metrics embed with it
    config = EvalConfig(
        n_per_class=body.n_per_class,
        steps=body.steps,
        guidance=body.guidance,
        seeds=tuple(body.seeds),
        downstream=DownstreamConfig(backbone=body.backbone, epochs=body.epochs),
    )
    payload = EvaluatePayload(
        dataset_id=proto.dataset_id,
        models=ModelPair(baseline=base.id, prototype=proto.id),
        batches=GivenBatches(
            baseline=_batches(session, body.baseline_batch_ids, base, "baseline"),
            prototype=_batches(session, body.prototype_batch_ids, proto, "prototype"),
        ),
        config=config,
        test_dataset_id=body.test_dataset_id,
    )
    job = new_job(JobKind.evaluate, payload, model=proto, requested_by=key.name)
    session.add(job)
    submit(session, [job])
    return job_out(job, request)


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
    job = get_or_404(session, Job, job_id)
    outcome = cancel(session, job_id)
    if outcome == "missing":
        raise HTTPException(404, f"job {job_id} not found")
    session.refresh(job)  # the cancel wrote with UPDATEs: read back what the job is now
    if outcome == "finished":
        raise HTTPException(409, f"job {job_id} already finished ({job.status})")
    return job_out(job, request)
