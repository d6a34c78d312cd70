"""Batches: ``POST /generate`` queues one (a sampling job); read it back as JSON or a zip."""

from __future__ import annotations

import io
import zipfile
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import Response, StreamingResponse

from api.deps import (
    AdminKey,
    IdPath,
    Reader,
    SessionDep,
    SettingsDep,
    StorageDep,
    get_or_404,
)
from api.responses import audit_out, batch_out, job_out
from api.schemas import AuditOut, BatchOut, GenerateAccepted, GenerateQuery, JobOut
from ml.errors import Invalid
from ml.schemas.audit import AuditConfig
from service.audits import AuditStored, latest_audit, nearest_key, request_audit
from service.db.models import Batch, Job
from service.generation import GenerateRequest, request_generation
from service.storage import ObjectNotFound

router = APIRouter()


def _given_in_query(request: Request) -> bool:
    """Whether the caller wrote any of the request's fields into the query string."""
    names = {f.alias or name for name, f in GenerateRequest.model_fields.items()}
    return any(name in names for name in request.query_params)


@router.post("/generate", status_code=status.HTTP_202_ACCEPTED, tags=["generate"])
def generate(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
    query: Annotated[GenerateQuery, Query()],
    body: GenerateRequest | None = None,
) -> GenerateAccepted:
    """Queue ``n`` images of one class; the job's result is a batch (PNGs, zip). The request is
    a JSON body (``{"class": "mel", "n": 100}``) or the same fields as query parameters
    (``?class=mel&n=100``), not both. With ``filter=plausible`` the job draws
    ``n * oversample`` and keeps the ``n`` the review domain's plausibility scorer rates
    highest (with ``threshold``: those scored at least that, fewer if not enough are); the
    batch records ``drawn`` and the scorer version."""
    if body is not None:
        if _given_in_query(request):
            raise Invalid(
                "give the request as a JSON body or as query parameters, not both "
                f"(query: {', '.join(sorted(request.query_params))})"
            )
        wanted = body
    else:
        wanted = query.as_request()
    made = request_generation(session, settings, wanted, key.name)
    return GenerateAccepted(
        job=job_out(made.job, request),
        batch=batch_out(made.batch, request),
        guidance_source=made.guidance_source,
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
    return latest_audit(session, batch_id)


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
    return job_out(request_audit(session, settings, batch_id, config, key.name), request)


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
    try:
        data = storage.get_bytes(nearest_key(stored, batch_id, image_id))
    except ObjectNotFound as exc:
        raise HTTPException(404, f"image {image_id}'s nearest image is not in storage") from exc
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})
