"""Evaluations, the service side: requesting one (an ``evaluate`` job comparing a baseline and a
prototype model; its rules live here once, so ``POST /jobs/evaluate`` and any other caller
check the same things and store the same rows) and reading finished ones back (the latest of a
dataset or a given job, its typed result and payload, its CSV), shared by
``GET /reports/evaluation`` and the dashboard."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.errors import Conflict, Invalid, NotFound
from ml.schemas.evaluation import (  # torch-free
    DownstreamConfig,
    EvalConfig,
    EvaluationResult,
    evaluation_tables,
    tables_csv,
)
from service.config import Settings
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
from service.encoder import require_encoder_weights
from service.inputs import RequestModel
from service.job_kinds import new_job
from service.payloads import EvaluatePayload, GivenBatches, ModelPair
from service.queue import submit
from service.rows import get_row

Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class EvaluateRequest(RequestModel):
    """What ``POST /jobs/evaluate`` asks for: the two ready models to compare, the classifier
    trained on their images, and optionally given batches and an external test set."""

    baseline_model_id: Id
    prototype_model_id: Id
    seeds: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(
        [0, 1, 2], min_length=1, max_length=10
    )
    backbone: Literal["small", "resnet18", "resnext50"] = "small"
    epochs: int = Field(30, ge=1, le=1000)
    n_per_class: int | None = Field(None, ge=1, le=10_000, description="default: as real")
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0, le=20)
    baseline_batch_ids: list[Id] = Field(
        default_factory=list, max_length=500, description="use these images instead of generating"
    )
    prototype_batch_ids: list[Id] = Field(default_factory=list, max_length=500)
    test_dataset_id: Id | None = Field(
        default=None,
        description="An external test set: another registered dataset whose images the models "
        "never saw, classes matched by name (it must have every class of the models; its other "
        "classes are ignored). Every score is then measured on it. Default: the held-out part "
        "of the models' split.",
    )


def ready_model(session: Session, model_id: int, mode: ModelMode) -> Model:
    """The model, which must be a ready model of this mode (:class:`Invalid` for the other
    mode, :class:`Conflict` while it is not ready)."""
    model = get_row(session, Model, model_id, hint="; see GET /models")
    if model.mode != mode:
        raise Invalid(f"model {model_id} is a {model.mode} model, not {mode}")
    if model.status != ModelStatus.ready:
        raise Conflict(f"model {model_id} is {model.status}, not ready")
    return model


def given_batches(session: Session, ids: list[int], model: Model, mode: str) -> list[int]:
    """The batch ids, each of which must exist and have been made by the model (so of its
    dataset): the evaluation uses their images instead of generating its own."""
    for batch_id in ids:
        batch = get_row(session, Batch, batch_id)
        if batch.model is None:
            raise Invalid(f"batch {batch_id} holds real control images, not generated")
        if batch.model.dataset_id != model.dataset_id:
            raise Invalid(
                f"batch {batch_id} is from dataset {batch.model.dataset_id}, "
                f"the models from dataset {model.dataset_id}"
            )
        if batch.model_id != model.id:
            raise Invalid(
                f"batch {batch_id} was made by model {batch.model_id}, not the {mode} "
                f"model {model.id}"
            )
    return ids


def check_test_dataset(session: Session, dataset_id: int, model: Model) -> Dataset:
    """An external test set: another dataset holding every class of the models (by name);
    its other classes are ignored, as ``ml.evaluation.evaluate.external_test_set`` does."""
    dataset = get_row(session, Dataset, dataset_id, hint="; see GET /datasets")
    if dataset.id == model.dataset_id:
        raise Invalid(
            f"test_dataset_id {dataset.id} is the dataset the models were trained on: "
            "give another dataset, or leave it out to test on the held-out part of their split"
        )
    have = {c for c in dataset.classes if (dataset.counts or {}).get(c, 1)}
    missing = sorted(set(model.classes) - have)
    if missing:
        raise Invalid(
            f"test dataset {dataset.id} ({dataset.name}) has no images of the models' "
            f"class(es) {missing}: a test set must have every one of {sorted(model.classes)} "
            f"(it has {sorted(have) or 'none'}; its other classes are ignored)"
        )
    return dataset


def request_evaluation(
    session: Session, settings: Settings, request: EvaluateRequest, requested_by: str
) -> Job:
    """Check the request, store its ``evaluate`` job (on the prototype model) and queue it
    (committed by :func:`service.queue.submit`). Both models must be ready, of their modes and
    of one dataset; given batches must be theirs; a test dataset must be another one holding
    every class; the CLIP encoder's weights must be here (the CLIP-space metrics embed with
    them)."""
    base = ready_model(session, request.baseline_model_id, ModelMode.baseline)
    proto = ready_model(session, request.prototype_model_id, ModelMode.prototype)
    if base.dataset_id != proto.dataset_id:
        raise Invalid(
            f"the models are from different datasets ({base.dataset_id} and {proto.dataset_id})"
        )
    if request.test_dataset_id is not None:
        check_test_dataset(session, request.test_dataset_id, proto)
    require_encoder_weights(settings)
    config = EvalConfig(
        n_per_class=request.n_per_class,
        steps=request.steps,
        guidance=request.guidance,
        seeds=tuple(request.seeds),
        downstream=DownstreamConfig(backbone=request.backbone, epochs=request.epochs),
    )
    payload = EvaluatePayload(
        dataset_id=proto.dataset_id,
        models=ModelPair(baseline=base.id, prototype=proto.id),
        batches=GivenBatches(
            baseline=given_batches(session, request.baseline_batch_ids, base, "baseline"),
            prototype=given_batches(session, request.prototype_batch_ids, proto, "prototype"),
        ),
        config=config,
        test_dataset_id=request.test_dataset_id,
    )
    job = new_job(JobKind.evaluate, payload, model=proto, requested_by=requested_by)
    session.add(job)
    submit(session, [job])
    return job


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


def finished_evaluation(
    session: Session, dataset_id: int | None = None, job_id: int | None = None
) -> Job:
    """:func:`latest_evaluation`, else :class:`NotFound` saying how to get one."""
    job = latest_evaluation(session, dataset_id, job_id)
    if job is None:
        raise NotFound("no finished evaluation yet; POST /jobs/evaluate first")
    return job


def evaluation_of(job: Job) -> tuple[EvaluatePayload, EvaluationResult]:
    """A finished evaluate job's request and result, as the worker stored them."""
    return EvaluatePayload.model_validate(job.params), EvaluationResult.model_validate(job.result)


def evaluation_csv(result: EvaluationResult) -> str:
    """Every table of the result (Tables 5-6 in %, CLIP space overall and per class, the toy
    checker), as the CLI prints and the dashboard shows them; a blank row between tables."""
    return tables_csv(evaluation_tables(result))
