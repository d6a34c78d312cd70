"""Requesting a generation: one batch of ``n`` images of a class from a ready model, queued as a
``sample`` job. The request's rules (which model, the image limits, the plausibility filter and
the scorer it needs) live here once, so ``POST /generate`` in either of its forms (JSON body or
query string) and any other caller check the same things and store the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.config import DEFAULT_SCHEDULER, DEFAULT_STEPS, SchedulerName  # torch-free
from ml.errors import Conflict, Invalid
from service.config import Settings
from service.db.models import MAX_ID, Batch, Dataset, Job, JobKind, Model, ModelMode, ModelStatus
from service.encoder import require_encoder_weights
from service.inputs import ClassName, RequestModel
from service.job_kinds import new_job, set_payload
from service.payloads import BatchFilter, SamplePayload
from service.queue import submit
from service.rows import get_row
from service.scorers import latest_scorer
from service.sweeps import GuidanceSource, resolve_guidance

Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class GenerateRequest(RequestModel):
    """What ``POST /generate`` asks for, as a JSON body or as query parameters (the same names:
    ``class`` and ``filter`` as the caller writes them)."""

    class_name: ClassName = Field(alias="class", description="The class to generate.")
    n: int = Field(16, description="Images to generate (1 to the configured limit).")
    model_id: Id | None = None
    dataset_id: Id | None = None
    mode: ModelMode | None = None
    guidance: float | None = Field(
        None,
        ge=0.0,
        le=20.0,
        description="Default: the model's default for the class (GET /models/{id}/guidance,"
        " set from a guidance sweep), else the global default (2.0).",
    )
    steps: int | None = Field(
        None, ge=1, le=1000, description="Default: ddim 50, dpm++/dpm++sde 20."
    )
    seed: int = Field(0, ge=0, le=MAX_ID)
    scheduler: SchedulerName = Field(DEFAULT_SCHEDULER, description="dpm++sde: SDE-DPM-Solver++")
    filter: Literal["none", "plausible"] = Field(
        "none", description="plausible: keep the images the domain's scorer rates most plausible"
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="filter=plausible: keep only images scored >= this"
    )
    oversample: int | None = Field(
        None, ge=1, description="filter=plausible: images drawn per image kept (default 3)"
    )


@dataclass(frozen=True)
class Generation:
    """What a generation request queued: the sample job, the batch it fills, and where the
    batch's guidance came from."""

    job: Job
    batch: Batch
    guidance_source: GuidanceSource


def pick_model(
    session: Session, model_id: int | None, dataset_id: int | None, mode: ModelMode | None
) -> Model:
    """The named model (must be ready), else the newest ready one of the dataset (and mode);
    the dataset may be left out where there is only one."""
    if model_id is not None:
        model = get_row(session, Model, model_id, hint="; see GET /models")
        if model.status != ModelStatus.ready:
            raise Conflict(f"model {model_id} is {model.status}, not ready")
        return model
    if dataset_id is None:
        ids = session.scalars(select(Dataset.id).limit(2)).all()
        if len(ids) != 1:
            raise Invalid("give model_id or dataset_id (there is not exactly one dataset)")
        dataset_id = ids[0]
    else:
        get_row(session, Dataset, dataset_id, hint="; see GET /datasets")
    query = select(Model).where(Model.dataset_id == dataset_id, Model.status == ModelStatus.ready)
    if mode is not None:
        query = query.where(Model.mode == mode)
    newest = session.scalar(query.order_by(Model.id.desc()).limit(1))
    if newest is None:
        raise Conflict(f"dataset {dataset_id} has no ready {mode or ''} model yet; train one first")
    return newest


def batch_filter(
    settings: Settings, n: int, kind: str, threshold: float | None, oversample: int | None
) -> BatchFilter | None:
    """The filter a generate request asks for, checked against the configured limits (the
    message names them)."""
    if kind == "none":
        if threshold is not None or oversample is not None:
            raise Invalid("threshold and oversample apply only with filter=plausible")
        return None
    most = settings.scorer_max_oversample
    factor = settings.scorer_oversample if oversample is None else oversample
    if not 1 <= factor <= most:
        raise Invalid(f"oversample must be between 1 and {most} (got {factor})")
    limit = settings.max_images_per_request
    if n * factor > limit:
        raise Invalid(
            f"n * oversample = {n * factor} images to draw; at most {limit} per request "
            f"(lower n or oversample)"
        )
    return BatchFilter(oversample=factor, threshold=threshold)


def require_scorer(session: Session, settings: Settings, model: Model) -> None:
    """:class:`Conflict` unless the model's review domain has a plausibility scorer on the
    configured encoder's embeddings, saying how to get one: the filter would otherwise fail on
    the worker, after the request was accepted."""
    domain = model.dataset.domain
    if domain is None:
        raise Conflict(
            f"dataset {model.dataset_id} has no review domain, so no plausibility scorer: "
            "filter=plausible needs one (set the dataset's domain, review its images)"
        )
    scorer = latest_scorer(session, domain)
    if scorer is None:
        raise Conflict(
            f"review domain {domain!r} has no plausibility scorer yet; train one with "
            f'POST /scorers {{"domain": "{domain}"}} or `protomed scorer train {domain}` once '
            "enough of its images are reviewed"
        )
    trained_on = scorer.encoder.split("|")[0]
    # a learned encoder is stored with its scorer; a CLIP one must be the workers' encoder
    if not trained_on.startswith("learned:") and trained_on != settings.encoder:
        raise Conflict(
            f"the newest scorer of {domain!r} (#{scorer.id}) was trained on {trained_on} "
            f"embeddings, the service's encoder is now {settings.encoder}: train a new one "
            f'with POST /scorers {{"domain": "{domain}"}}'
        )


def request_generation(
    session: Session, settings: Settings, request: GenerateRequest, requested_by: str
) -> Generation:
    """Check the request, store the batch and its sample job, and queue the job (committed by
    :func:`service.queue.submit`; nothing is stored when the broker does not answer)."""
    n, limit = request.n, settings.max_images_per_request
    if not 1 <= n <= limit:
        raise Invalid(f"n must be between 1 and {limit} (got {n})")
    wanted = batch_filter(settings, n, request.filter, request.threshold, request.oversample)
    model = pick_model(session, request.model_id, request.dataset_id, request.mode)
    class_name = request.class_name
    if class_name not in model.classes:
        raise Invalid(
            f"unknown class {class_name!r}; model {model.id} knows: {', '.join(model.classes)}"
        )
    if wanted is not None:
        require_scorer(session, settings, model)
        require_encoder_weights(settings)
    steps = request.steps or DEFAULT_STEPS[request.scheduler]
    scale, source = resolve_guidance(model, class_name, request.guidance, settings)
    job = new_job(JobKind.sample, None, model=model, requested_by=requested_by)
    batch = Batch(
        model=model,
        class_name=class_name,
        n=n,
        guidance=scale,
        steps=steps,
        seed=request.seed,
        scheduler=request.scheduler,
        job=job,
        filter=wanted.model_dump(mode="json") if wanted is not None else None,
    )
    session.add_all([job, batch])
    session.flush()
    set_payload(job, SamplePayload(batch_id=batch.id))
    submit(session, [job])
    return Generation(job=job, batch=batch, guidance_source=source)
