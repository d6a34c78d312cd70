"""Guidance per class: sweeps (one batch per class and guidance scale, reviewed blinded), their
report (plausibility against guidance per class, with intervals and a recommended scale), and
the model's per-class defaults that ``POST /generate`` uses. Every read names batches and
scales, so reviewer keys get 403 (blinding); writes need an admin key."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import PlainTextResponse
from sqlalchemy import select

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep, StorageDep, get_or_404
from api.responses import job_out, ls_public, project_out
from api.schemas import (
    ApplyOut,
    ApplyRequest,
    GuidanceDefaults,
    GuidanceOut,
    SweepAccepted,
    SweepBatchOut,
    SweepOut,
    SweepReviewAccepted,
)
from service.db.models import Model, Sweep
from service.exceptions import ServiceUnavailable
from service.queue import submit
from service.sweep_report import SweepReport, sweep_csv
from service.sweeps import (
    SweepRequest,
    apply,
    discard,
    send_sweep_to_review,
    set_defaults,
    start_sweep,
    sweep_batches,
)
from service.sweeps import report as build_report

router = APIRouter(tags=["sweeps"])


def sweep_out(sweep: Sweep, request: Request) -> SweepOut:
    cells = [
        SweepBatchOut(
            class_name=b.class_name,
            scale=b.guidance,
            batch_id=b.id,
            job_id=b.job_id,
            status=str(b.job.status) if b.job else None,
            images=len(b.images),
        )
        for b in sweep_batches(sweep)
    ]
    return SweepOut(
        id=sweep.id,
        model_id=sweep.model_id,
        classes=sweep.classes,
        scales=sweep.scales,
        n=sweep.n,
        seed=sweep.seed,
        steps=sweep.steps,
        scheduler=sweep.scheduler,
        requested_by=sweep.requested_by,
        created_at=sweep.created_at,
        batches=cells,
        report_url=str(request.url_for("sweep_report", sweep_id=sweep.id)),
        page_url=str(request.url_for("ui_sweep", sweep_id=sweep.id)),
    )


@router.post("/models/{model_id}/sweeps", status_code=status.HTTP_202_ACCEPTED)
def start(
    model_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
    body: SweepRequest | None = None,
) -> SweepAccepted:
    """Queue a guidance sweep: ``n`` images of each class at each scale (default scales 1, 2,
    3.5, 5; every class), one sample job per (class, scale), the same seeds at every scale of
    a class so only the guidance differs. Then ``POST /sweeps/{id}/review``."""
    model = get_or_404(session, Model, model_id, hint="; see GET /models")
    sweep, jobs = start_sweep(session, model, body or SweepRequest(), settings, key.name)
    try:
        submit(session, jobs)
    except ServiceUnavailable:
        discard(session, sweep)
        raise
    return SweepAccepted(sweep=sweep_out(sweep, request), jobs=[job_out(j, request) for j in jobs])


@router.get("/models/{model_id}/sweeps")
def list_sweeps(
    model_id: IdPath, request: Request, session: SessionDep, _reader: Reader
) -> list[SweepOut]:
    get_or_404(session, Model, model_id, hint="; see GET /models")
    rows = session.scalars(select(Sweep).where(Sweep.model_id == model_id).order_by(Sweep.id))
    return [sweep_out(s, request) for s in rows]


@router.get("/sweeps/{sweep_id}")
def get_sweep(sweep_id: IdPath, request: Request, session: SessionDep, _reader: Reader) -> SweepOut:
    """The sweep with each (class, scale) batch and its sample job's status."""
    return sweep_out(get_or_404(session, Sweep, sweep_id), request)


@router.post("/sweeps/{sweep_id}/review", status_code=status.HTTP_202_ACCEPTED)
def review_sweep(
    sweep_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
    domain: Annotated[str | None, Query(max_length=64)] = None,
) -> SweepReviewAccepted:
    """Send every batch of the sweep to blinded review: all scales of all classes shuffled
    together into the domain's one Label Studio project; tasks show the image and the class
    it should show, never the scale (409 while a batch is still generating)."""
    sent = send_sweep_to_review(session, settings, sweep_id, domain, key.name)
    return SweepReviewAccepted(
        job=job_out(sent.job, request),
        project=project_out(session, sent.project, ls_public(settings)),
        added=len(sent.tasks),
    )


@router.get(
    "/sweeps/{sweep_id}/report",
    name="sweep_report",
    response_model=SweepReport,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def sweep_report(
    sweep_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    _reader: Reader,
    format: Literal["json", "csv"] = "json",
) -> SweepReport | PlainTextResponse:
    """Per class and scale: images reviewed, plausible (the image as unit: its reviewers'
    majority, a tie implausible), the rate with its Wilson 95% interval, and the batch's
    diversity (mean pairwise pixel distance); per class the recommended scale and why, by the
    rule the report states (``methods.rule``)."""
    rep = build_report(session, get_or_404(session, Sweep, sweep_id), storage, settings)
    if format == "csv":
        return PlainTextResponse(sweep_csv(rep), media_type="text/csv")
    return rep


@router.post("/sweeps/{sweep_id}/apply")
def apply_sweep(
    sweep_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    _admin: AdminKey,
    body: ApplyRequest | None = None,
) -> ApplyOut:
    """Write the sweep's recommended scales (or ``{"scales": {class: scale}}`` instead) into
    the model's per-class guidance defaults; classes without a recommendation keep theirs.
    409 when the sweep recommends nothing yet."""
    sweep = get_or_404(session, Sweep, sweep_id)
    chosen, skipped = apply(session, sweep, storage, settings, body.scales if body else None)
    session.commit()
    defaults = dict(sweep.model.guidance_defaults or {})
    return ApplyOut(model_id=sweep.model_id, set=chosen, unchanged=skipped, defaults=defaults)


# --- the model's per-class defaults --------------------------------------------------------------


def guidance_out(model: Model, settings: SettingsDep) -> GuidanceOut:
    return GuidanceOut(
        model_id=model.id,
        defaults=dict(model.guidance_defaults or {}),
        fallback=settings.default_guidance,
    )


@router.get("/models/{model_id}/guidance")
def get_guidance(
    model_id: IdPath, session: SessionDep, settings: SettingsDep, _reader: Reader
) -> GuidanceOut:
    """The per-class guidance ``POST /generate`` uses when given none."""
    return guidance_out(get_or_404(session, Model, model_id), settings)


@router.put("/models/{model_id}/guidance")
def put_guidance(
    model_id: IdPath,
    body: GuidanceDefaults,
    session: SessionDep,
    settings: SettingsDep,
    _admin: AdminKey,
) -> GuidanceOut:
    """Set the per-class defaults by hand, replacing them all (``{"defaults": {}}`` clears
    them: every class falls back to the global default)."""
    model = get_or_404(session, Model, model_id)
    set_defaults(model, body.defaults, replace=True)
    session.commit()
    return guidance_out(model, settings)
