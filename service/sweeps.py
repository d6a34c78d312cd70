"""Guidance per class from expert verdicts: a sweep generates a few guidance scales per class
(one ``sample`` batch per class and scale, the same seeds at every scale of a class), sends
them blinded into the domain's one review project, reports plausibility against guidance
(:mod:`service.sweep_report`) and writes the recommended scale per class into the model's
``guidance_defaults``, which ``POST /generate`` then uses unless told otherwise.

Shared by the API (``api/routes/sweeps.py``), the CLI (``protomed sweep``) and the dashboard;
no web framework, no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.config import DEFAULT_SCHEDULER, DEFAULT_STEPS, SchedulerName  # torch-free
from ml.errors import Conflict, Invalid
from service.config import Settings
from service.db.models import (
    MAX_ID,
    Batch,
    Image,
    Job,
    JobKind,
    Model,
    ModelStatus,
    Review,
    ReviewProject,
    ReviewSample,
    ReviewTask,
    Sweep,
)
from service.inputs import ClassName, RequestModel
from service.job_kinds import new_job, set_payload
from service.payloads import SamplePayload
from service.reports import Judgement
from service.reviews import counted, queue_sync, request_review, require_label_studio
from service.rows import get_row
from service.storage import ObjectNotFound, Storage
from service.sweep_report import (
    Cell,
    SweepReport,
    mean_pairwise_distance,
    pixels,
    recommendations,
    sweep_report,
)

MAX_SCALE = 20.0  # as POST /generate's guidance
DEFAULT_SCALES = (1.0, 2.0, 3.5, 5.0)
Scale = Annotated[float, Field(ge=0.0, le=MAX_SCALE)]


class SweepError(Invalid):
    """A sweep request that cannot be served as asked (an unknown class, a scale out of range,
    too many images); a model or sweep not in a state to do it is a :class:`Conflict`."""


class SweepRequest(RequestModel):
    """What a sweep generates: every class asked for at every scale, ``n`` images each."""

    classes: list[ClassName] | None = Field(
        None, min_length=1, max_length=100, description="default: every class of the model"
    )
    scales: list[Scale] = Field(
        default_factory=lambda: list(DEFAULT_SCALES),
        min_length=2,
        max_length=8,
        description=f"2 to 8 distinct guidance scales, each 0 to {MAX_SCALE:g}",
    )
    n: int = Field(8, ge=1, description="images per (class, scale); the total is bounded too")
    seed: int = Field(0, ge=0, le=MAX_ID, description="the same at every scale (paired design)")
    steps: int | None = Field(None, ge=1, le=1000, description="default: ddim 50, dpm++ 20")
    scheduler: SchedulerName = DEFAULT_SCHEDULER

    @field_validator("scales")
    @classmethod
    def _distinct(cls, scales: list[float]) -> list[float]:
        if len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct (got {scales})")
        return sorted(scales)

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[str] | None) -> list[str] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError(f"classes must not repeat (got {classes})")
        return classes


def start_sweep(
    session: Session, model: Model, request: SweepRequest, settings: Settings, requested_by: str
) -> tuple[Sweep, list[Job]]:
    """The sweep row, one batch and one queued sample job per (class, scale), flushed (the
    caller submits the jobs). :class:`Conflict` for an unready model, :class:`SweepError` for
    an unknown class or too many images."""
    if model.status != ModelStatus.ready:
        raise Conflict(f"model {model.id} is {model.status}, not ready")
    classes = request.classes or list(model.classes)
    unknown = [c for c in classes if c not in model.classes]
    if unknown:
        raise SweepError(
            f"unknown class {', '.join(map(repr, unknown))}; model {model.id} knows: "
            f"{', '.join(model.classes)}"
        )
    total = len(classes) * len(request.scales) * request.n
    limit = settings.max_images_per_request
    if total > limit:
        raise SweepError(
            f"{len(classes)} classes x {len(request.scales)} scales x {request.n} images = "
            f"{total}, over the limit of {limit} images per request; ask fewer"
        )
    steps = request.steps or DEFAULT_STEPS[request.scheduler]
    sweep = Sweep(
        model=model,
        classes=classes,
        scales=list(request.scales),
        n=request.n,
        seed=request.seed,
        steps=steps,
        scheduler=request.scheduler,
        requested_by=requested_by,
    )
    session.add(sweep)
    jobs = []
    for name in classes:
        for scale in request.scales:
            job = new_job(JobKind.sample, None, model=model, requested_by=requested_by)
            batch = Batch(
                model=model,
                class_name=name,
                n=request.n,
                guidance=scale,
                steps=steps,
                seed=request.seed,
                scheduler=request.scheduler,
                job=job,
                sweep=sweep,
            )
            session.add_all([job, batch])
            jobs.append(job)
    session.flush()
    for job in jobs:
        (batch,) = job.batches
        set_payload(job, SamplePayload(batch_id=batch.id))
    return sweep, jobs


def discard(session: Session, sweep: Sweep) -> None:
    """Remove a sweep whose jobs could not be queued (``service.queue.submit`` has removed its
    jobs and batches already), so a refused request leaves nothing behind."""
    session.delete(sweep)
    session.commit()


def sweep_batches(sweep: Sweep) -> list[Batch]:
    """The sweep's batches by class (the sweep's order), then scale."""
    order = {c: i for i, c in enumerate(sweep.classes)}
    return sorted(sweep.batches, key=lambda b: (order.get(b.class_name, len(order)), b.guidance))


def review(
    session: Session, sweep: Sweep, domain: str | None = None
) -> tuple[ReviewProject, list[ReviewTask]]:
    """Every batch of the sweep into the domain's one review project, shuffled together, so
    reviewers see neither the scale nor which images share one (``service.reviews``)."""
    waiting = [b.id for b in sweep.batches if not b.images]
    if waiting:
        raise Conflict(
            f"sweep {sweep.id} is still generating: batch {', '.join(map(str, waiting))} has no "
            "images yet"
        )
    return request_review(session, [b.id for b in sweep_batches(sweep)], domain)


@dataclass(frozen=True)
class SweepReview:
    """What sending a sweep to review did: the sync job, the domain's project, its new tasks."""

    job: Job
    project: ReviewProject
    tasks: list[ReviewTask]


def send_sweep_to_review(
    session: Session, settings: Settings, sweep_id: int, domain: str | None, requested_by: str
) -> SweepReview:
    """Every batch of the sweep into blinded review (:func:`review`) and a queued sync job
    that imports them into Label Studio: the one way the API and the CLI do it."""
    require_label_studio(settings)
    sweep = get_row(session, Sweep, sweep_id)
    project, tasks = review(session, sweep, domain)
    job = queue_sync(session, project.id, requested_by)
    return SweepReview(job=job, project=project, tasks=tasks)


def judgements_by_batch(session: Session, batch_ids: Sequence[int]) -> dict[int, list[Judgement]]:
    """Every stored verdict on the batches' images, in any review project, per batch; only
    verdicts on images of a random sample of their batch (a batch sent whole is one), as the
    plausibility report counts them (``service.reports``): an image picked because a scorer
    was unsure of it says nothing unbiased about its batch. Incomplete verdicts are left out."""
    rows = session.execute(
        select(Review, Image, Batch)
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .where(
            Batch.id.in_(list(batch_ids)),
            ReviewTask.sample == ReviewSample.random,
            counted(),  # an incomplete verdict, or one on an edited task, says nothing
        )
    ).all()
    out: dict[int, list[Judgement]] = defaultdict(list)
    for r, img, b in rows:
        out[b.id].append(
            Judgement(img.id, img.class_name, b.model_id, "", r.reviewer, r.plausible, r.criteria)
        )
    return out


def diversity(batch: Batch, storage: Storage) -> float | None:
    """The batch's mean pairwise pixel distance (None with under two stored images)."""
    found = []
    for img in sorted(batch.images, key=lambda i: i.index):
        try:
            found.append(pixels(storage.get_bytes(img.storage_key)))
        except (ObjectNotFound, OSError):
            continue
    try:
        return mean_pairwise_distance(found)
    except ValueError:  # images of different sizes (never from one sampler run): no figure
        return None


def report(session: Session, sweep: Sweep, storage: Storage, settings: Settings) -> SweepReport:
    """The sweep's report as the API, the CLI and the dashboard show it."""
    batches = sweep_batches(sweep)
    cells = [
        Cell(b.class_name, b.guidance, b.id, len(b.images), diversity(b, storage)) for b in batches
    ]
    return sweep_report(
        sweep_id=sweep.id,
        model_id=sweep.model_id,
        classes=sweep.classes,
        scales=sweep.scales,
        n=sweep.n,
        seed=sweep.seed,
        steps=sweep.steps,
        scheduler=sweep.scheduler,
        cells=cells,
        judgements=judgements_by_batch(session, [b.id for b in batches]),
        min_images=settings.sweep_min_images,
        defaults=sweep.model.guidance_defaults or {},
    )


# --- the model's per-class defaults --------------------------------------------------------------


def check_defaults(model: Model, scales: Mapping[str, float]) -> dict[str, float]:
    """Class -> scale, every class the model's and every scale within range (SweepError)."""
    unknown = [c for c in scales if c not in model.classes]
    if unknown:
        raise SweepError(
            f"unknown class {', '.join(map(repr, unknown))}; model {model.id} knows: "
            f"{', '.join(model.classes)}"
        )
    bad = {c: s for c, s in scales.items() if not 0.0 <= s <= MAX_SCALE}
    if bad:
        raise SweepError(f"guidance must be between 0 and {MAX_SCALE:g} (got {bad})")
    return {c: float(s) for c, s in scales.items()}


def set_defaults(model: Model, scales: Mapping[str, float], *, replace: bool) -> dict[str, float]:
    """Write per-class defaults: merged into the model's (``replace=False``: other classes keep
    theirs) or instead of them. Returns the model's defaults after."""
    given = check_defaults(model, scales)
    merged = given if replace else {**(model.guidance_defaults or {}), **given}
    model.guidance_defaults = merged or None
    return dict(merged)


def apply(
    session: Session,
    sweep: Sweep,
    storage: Storage,
    settings: Settings,
    overrides: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The sweep's recommendations (or ``overrides``, class -> scale, instead) into the model's
    defaults; classes without a recommendation keep theirs. Returns (what was set, class ->
    why it was left as it was)."""
    if overrides:
        chosen, skipped = check_defaults(sweep.model, overrides), {}
    else:
        rep = report(session, sweep, storage, settings)
        chosen = recommendations(rep)
        skipped = {c.class_name: c.reason for c in rep.classes if c.recommended is None}
        if not chosen:
            raise Conflict(
                f"sweep {sweep.id} recommends no scale for any class yet ("
                + "; ".join(f"{c}: {r}" for c, r in skipped.items())
                + "); review more images, or give the scales yourself"
            )
    set_defaults(sweep.model, chosen, replace=False)
    return chosen, skipped


GuidanceSource = Literal["query", "model default", "global default"]


def resolve_guidance(
    model: Model, class_name: str, given: float | None, settings: Settings
) -> tuple[float, GuidanceSource]:
    """The scale a batch is generated with, and where it came from: the request's own, else the
    model's default for the class (from a sweep or set by hand), else the global default."""
    if given is not None:
        return given, "query"
    scale = (model.guidance_defaults or {}).get(class_name)
    if scale is not None:
        return float(scale), "model default"
    return settings.default_guidance, "global default"


def sweeps_of(session: Session, model_id: int) -> list[Sweep]:
    return list(session.scalars(select(Sweep).where(Sweep.model_id == model_id).order_by(Sweep.id)))
