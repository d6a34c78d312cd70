"""Batches: ``POST /generate`` queues one (a sampling job); read it back as JSON or a zip."""

from __future__ import annotations

import io
import zipfile
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import Response, StreamingResponse
from pydantic import AfterValidator
from sqlalchemy import select

from api.deps import (
    AdminKey,
    IdPath,
    IdQuery,
    Reader,
    SessionDep,
    SettingsDep,
    StorageDep,
    get_or_404,
)
from api.responses import audit_out, batch_out, job_out
from api.schemas import AuditOut, BatchOut, GenerateAccepted, JobOut
from ml.config import DEFAULT_SCHEDULER, DEFAULT_STEPS, SchedulerName
from ml.schemas.audit import AuditConfig
from service.audits import AuditStored, AuditUnavailable, latest_audit, start_audit
from service.db.models import MAX_ID, Batch, Dataset, Job, JobKind, Model, ModelMode, ModelStatus
from service.encoder import require_encoder_weights
from service.inputs import nfc
from service.job_kinds import new_job, set_payload
from service.payloads import BatchFilter, SamplePayload
from service.queue import submit
from service.scorers import latest_scorer
from service.storage import ObjectNotFound
from service.sweeps import resolve_guidance

router = APIRouter()


def pick_model(
    session: SessionDep, model_id: int | None, dataset_id: int | None, mode: ModelMode | None
) -> Model:
    """The named model (must be ready), else the newest ready one of the dataset (and mode)."""
    if model_id is not None:
        model = get_or_404(session, Model, model_id, hint="; see GET /models")
        if model.status != ModelStatus.ready:
            raise HTTPException(409, f"model {model_id} is {model.status}, not ready")
        return model
    if dataset_id is None:
        ids = session.scalars(select(Dataset.id).limit(2)).all()
        if len(ids) != 1:
            raise HTTPException(
                422, "give model_id or dataset_id (there is not exactly one dataset)"
            )
        dataset_id = ids[0]
    else:
        get_or_404(session, Dataset, dataset_id, hint="; see GET /datasets")
    query = select(Model).where(Model.dataset_id == dataset_id, Model.status == ModelStatus.ready)
    if mode is not None:
        query = query.where(Model.mode == mode)
    newest = session.scalar(query.order_by(Model.id.desc()).limit(1))
    if newest is None:
        raise HTTPException(
            409, f"dataset {dataset_id} has no ready {mode or ''} model yet; train one first"
        )
    return newest


def batch_filter(
    settings: SettingsDep, n: int, kind: str, threshold: float | None, oversample: int | None
) -> BatchFilter | None:
    """The filter a generate request asks for, checked against the limits (422 naming them)."""
    if kind == "none":
        if threshold is not None or oversample is not None:
            raise HTTPException(422, "threshold and oversample apply only with filter=plausible")
        return None
    most = settings.scorer_max_oversample
    factor = settings.scorer_oversample if oversample is None else oversample
    if not 1 <= factor <= most:
        raise HTTPException(422, f"oversample must be between 1 and {most} (got {factor})")
    limit = settings.max_images_per_request
    if n * factor > limit:
        raise HTTPException(
            422, f"n * oversample = {n * factor} images to draw; at most {limit} per request "
            f"(lower n or oversample)",
        )  # fmt: skip
    return BatchFilter(oversample=factor, threshold=threshold)


def require_scorer(session: SessionDep, settings: SettingsDep, model: Model) -> None:
    """409 unless the model's review domain has a plausibility scorer on the configured
    encoder's embeddings, saying how to get one."""
    domain = model.dataset.domain
    if domain is None:
        raise HTTPException(
            409, f"dataset {model.dataset_id} has no review domain, so no plausibility scorer: "
            "filter=plausible needs one (set the dataset's domain, review its images)",
        )  # fmt: skip
    scorer = latest_scorer(session, domain)
    if scorer is None:
        raise HTTPException(
            409, f"review domain {domain!r} has no plausibility scorer yet; train one with "
            f'POST /scorers {{"domain": "{domain}"}} or `protomed scorer train {domain}` once '
            "enough of its images are reviewed",
        )  # fmt: skip
    trained_on = scorer.encoder.split("|")[0]
    # a learned encoder is stored with its scorer; a CLIP one must be the workers' encoder
    if not trained_on.startswith("learned:") and trained_on != settings.encoder:
        raise HTTPException(
            409, f"the newest scorer of {domain!r} (#{scorer.id}) was trained on {trained_on} "
            f"embeddings, the service's encoder is now {settings.encoder}: train a new one "
            f'with POST /scorers {{"domain": "{domain}"}}',
        )  # fmt: skip


@router.post("/generate", status_code=status.HTTP_202_ACCEPTED, tags=["generate"])
def generate(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
    class_name: Annotated[
        str, Query(alias="class", min_length=1, max_length=200), AfterValidator(nfc)
    ],
    n: Annotated[int, Query(description="Images to generate (1 to the configured limit).")] = 16,
    model_id: IdQuery = None,
    dataset_id: IdQuery = None,
    mode: ModelMode | None = None,
    guidance: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=20.0,
            description="Default: the model's default for the class (GET /models/{id}/guidance,"
            " set from a guidance sweep), else the global default (2.0).",
        ),
    ] = None,
    steps: Annotated[
        int | None, Query(ge=1, le=1000, description="Default: ddim 50, dpm++/dpm++sde 20.")
    ] = None,
    seed: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    scheduler: Annotated[
        SchedulerName, Query(description="dpm++sde: SDE-DPM-Solver++")
    ] = DEFAULT_SCHEDULER,
    filter_: Annotated[
        Literal["none", "plausible"],
        Query(
            alias="filter",
            description="plausible: keep the images the domain's scorer rates most plausible",
        ),
    ] = "none",
    threshold: Annotated[
        float | None,
        Query(ge=0.0, le=1.0, description="filter=plausible: keep only images scored >= this"),
    ] = None,
    oversample: Annotated[
        int | None,
        Query(ge=1, description="filter=plausible: images drawn per image kept (default 3)"),
    ] = None,
) -> GenerateAccepted:
    """Queue ``n`` images of one class; the job's result is a batch (PNGs, zip). With
    ``filter=plausible`` the job draws ``n * oversample`` and keeps the ``n`` the review
    domain's plausibility scorer rates highest (with ``threshold``: those scored at least that,
    fewer if not enough are); the batch records ``drawn`` and the scorer version."""
    limit = settings.max_images_per_request
    if not 1 <= n <= limit:
        raise HTTPException(422, f"n must be between 1 and {limit} (got {n})")
    wanted = batch_filter(settings, n, filter_, threshold, oversample)
    model = pick_model(session, model_id, dataset_id, mode)
    if class_name not in model.classes:
        raise HTTPException(
            422, f"unknown class {class_name!r}; model {model.id} knows: {', '.join(model.classes)}"
        )
    if wanted is not None:
        require_scorer(session, settings, model)
        require_encoder_weights(settings)
    steps = steps or DEFAULT_STEPS[scheduler]
    scale, source = resolve_guidance(model, class_name, guidance, settings)
    job = new_job(JobKind.sample, None, model=model, requested_by=key.name)
    batch = Batch(
        model=model, class_name=class_name, n=n, guidance=scale, steps=steps, seed=seed,
        scheduler=scheduler, job=job,
        filter=wanted.model_dump(mode="json") if wanted is not None else None,
    )  # fmt: skip
    session.add_all([job, batch])
    session.flush()
    set_payload(job, SamplePayload(batch_id=batch.id))
    submit(session, [job])
    return GenerateAccepted(
        job=job_out(job, request), batch=batch_out(batch, request), guidance_source=source
    )


@router.get("/batches/{batch_id}", tags=["batches"])
def get_batch(batch_id: IdPath, request: Request, session: SessionDep, _reader: Reader) -> BatchOut:
    return batch_out(get_or_404(session, Batch, batch_id), request)


@router.get(
    "/batches/{batch_id}/zip",
    tags=["batches"],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def batch_zip(
    batch_id: IdPath, session: SessionDep, storage: StorageDep, _reader: Reader
) -> StreamingResponse:
    """All images of a batch as ``<class>_<index>.png`` plus a manifest.csv."""
    batch = get_or_404(session, Batch, batch_id)
    images = sorted(batch.images, key=lambda i: i.index)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        lines = ["file,class,index,sha256,model,guidance,steps,seed,scheduler"]
        for img in images:
            name = f"{img.class_name}_{img.index:04d}.png"
            zf.writestr(name, storage.get_bytes(img.storage_key))
            lines.append(
                f"{name},{img.class_name},{img.index},{img.sha256},{batch.model_id},"
                f"{batch.guidance},{batch.steps},{batch.seed},{batch.scheduler}"
            )
        zf.writestr("manifest.csv", "\n".join(lines) + "\n")
    buf.seek(0)
    return StreamingResponse(
        buf,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.zip"'},
    )


# --- memorisation audit ---------------------------------------------------------------------------


def _latest(session: SessionDep, batch_id: int) -> tuple[Job, AuditStored]:
    get_or_404(session, Batch, batch_id, hint="; see GET /batches")
    try:
        return latest_audit(session, batch_id)
    except AuditUnavailable as exc:
        raise HTTPException(exc.status, str(exc)) from exc


@router.post("/batches/{batch_id}/audit", status_code=status.HTTP_202_ACCEPTED, tags=["batches"])
def start_batch_audit(
    batch_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
    config: AuditConfig | None = None,
) -> JobOut:
    """Queue a memorisation audit of a generated batch: each image's nearest training image
    (pixel and CLIP space), near-copies flagged per class by thresholds calibrated on held-out
    real images. Read it with ``GET /batches/{id}/audit`` once the job has succeeded."""
    batch = get_or_404(session, Batch, batch_id, hint="; see GET /batches")
    config = config or AuditConfig()
    if "clip" in config.spaces:
        require_encoder_weights(settings)
    try:
        job = start_audit(session, batch, config, key.name)
    except AuditUnavailable as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    submit(session, [job])
    return job_out(job, request)


@router.get("/batches/{batch_id}/audit", tags=["batches"])
def get_batch_audit(
    batch_id: IdPath, request: Request, session: SessionDep, _reader: Reader
) -> AuditOut:
    """The batch's newest finished audit; 404 if none was started (start one with
    ``POST /batches/{id}/audit``), 409 while one is queued or running, or if the last failed."""
    job, stored = _latest(session, batch_id)
    return audit_out(job, stored, request)


@router.get(
    "/batches/{batch_id}/audit/nearest/{image_id}",
    name="audit_nearest",
    tags=["batches"],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def audit_nearest(
    batch_id: IdPath, image_id: IdPath, session: SessionDep, storage: StorageDep, _reader: Reader
) -> Response:
    """The training image nearest to one of the batch's images in its newest audit (kept for
    flagged images and the closest few)."""
    _job, stored = _latest(session, batch_id)
    if image_id not in stored.image_ids:
        raise HTTPException(404, f"image {image_id} is not in batch {batch_id}'s audit")
    key_ = stored.nearest_keys.get(str(stored.image_ids.index(image_id)))
    if key_ is None:
        raise HTTPException(
            404, f"the audit kept no nearest training image for image {image_id} (only for "
            "flagged images and the closest few)",
        )  # fmt: skip
    try:
        data = storage.get_bytes(key_)
    except ObjectNotFound as exc:
        raise HTTPException(404, f"image {image_id}'s nearest image is not in storage") from exc
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})
