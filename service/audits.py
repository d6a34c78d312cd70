"""Memorisation audits of batches, the service side: start one (an ``audit`` job on the gpu
queue, where the CLIP encoder and the training images are) and read the newest one back, shared
by ``/batches/{id}/audit`` and the dashboard. The audit itself is ``ml.audit``; its result is
stored as the job's result (``AuditStored``), so no table of its own is needed."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.errors import Conflict, NotFound, UserError
from ml.schemas.audit import AuditConfig, AuditReport  # torch-free
from service.config import Settings
from service.db.models import Batch, Job, JobKind, JobStatus
from service.encoder import require_encoder_weights
from service.job_kinds import new_job
from service.payloads import AuditPayload
from service.queue import submit
from service.rows import get_row

UNFINISHED = (JobStatus.queued, JobStatus.running)


class AuditStored(BaseModel):
    """What an audit job stores: the report, the batch's image ids in report order, and the
    storage keys of the nearest training images kept for display (report index -> key)."""

    batch_id: int
    report: AuditReport
    image_ids: list[int]
    nearest_keys: dict[str, str]


class AuditUnavailable(UserError):
    """No finished audit to show; the message says how to get one. Callers that show the
    reason instead of failing (the dashboard, model cards) catch this; the API answers with the
    subclass's status."""


class NoAuditYet(AuditUnavailable, NotFound):
    """The batch was never audited."""


class AuditNotReady(AuditUnavailable, Conflict):
    """The batch's newest audit is still queued or running, or it failed."""


def audit_jobs(session: Session, batch_id: int) -> list[Job]:
    """The batch's audit jobs, newest first."""
    jobs = session.scalars(
        select(Job).where(Job.kind == JobKind.audit).order_by(Job.id.desc())
    ).all()
    return [j for j in jobs if AuditPayload.model_validate(j.params).batch_id == batch_id]


def latest_audit(session: Session, batch_id: int) -> tuple[Job, AuditStored]:
    """The newest succeeded audit of the batch, else AuditUnavailable saying what to do."""
    jobs = audit_jobs(session, batch_id)
    done = next((j for j in jobs if j.status == JobStatus.succeeded and j.result), None)
    if done is not None:
        return done, AuditStored.model_validate(done.result)
    start = f"start one with POST /batches/{batch_id}/audit (admin key)"
    if not jobs:
        raise NoAuditYet(f"batch {batch_id} has no audit yet; {start}")
    last = jobs[0]
    if last.status in UNFINISHED:
        raise AuditNotReady(
            f"the audit of batch {batch_id} is {last.status} (job {last.id}); poll "
            f"GET /jobs/{last.id}",
        )
    raise AuditNotReady(
        f"the last audit of batch {batch_id} (job {last.id}) {last.status}: "
        f"{last.error or 'no result'}; {start}",
    )


def start_audit(session: Session, batch: Batch, config: AuditConfig, requested_by: str) -> Job:
    """A stored audit job of a finished batch (not yet queued). :class:`Conflict` for a batch
    whose images are not all there yet, one with an audit already waiting or running, and a
    control batch (real images: no model whose training data they could copy)."""
    if batch.model_id is None:
        raise Conflict(f"batch {batch.id} holds real control images, not generated")
    if batch.job is not None and batch.job.status != JobStatus.succeeded:
        raise Conflict(
            f"batch {batch.id} is not generated yet (its job {batch.job.id} is "
            f"{batch.job.status}); audit it once that job has succeeded",
        )
    if not batch.images:
        raise Conflict(f"batch {batch.id} has no images to audit")
    pending = [j for j in audit_jobs(session, batch.id) if j.status in UNFINISHED]
    if pending:
        raise Conflict(
            f"an audit of batch {batch.id} is already {pending[0].status} "
            f"(job {pending[0].id}); poll GET /jobs/{pending[0].id}",
        )
    payload = AuditPayload(batch_id=batch.id, config=config)
    job = new_job(JobKind.audit, payload, model_id=batch.model_id, requested_by=requested_by)
    session.add(job)
    session.flush()
    return job


def request_audit(
    session: Session,
    settings: Settings,
    batch_id: int,
    config: AuditConfig | None,
    requested_by: str,
) -> Job:
    """Check, store and queue a memorisation audit of the batch (committed by
    :func:`service.queue.submit`): the batch must exist and be generated, with no audit of it
    waiting; an audit in CLIP space needs the encoder's weights here."""
    batch = get_row(session, Batch, batch_id, hint="; see GET /batches")
    config = config or AuditConfig()
    if "clip" in config.spaces:
        require_encoder_weights(settings)
    job = start_audit(session, batch, config, requested_by)
    submit(session, [job])
    return job


def nearest_key(stored: AuditStored, batch_id: int, image_id: int) -> str:
    """The storage key of the training image nearest to one of the audited images;
    :class:`NotFound` if the image is not in this audit, or the audit kept none for it."""
    if image_id not in stored.image_ids:
        raise NotFound(f"image {image_id} is not in batch {batch_id}'s audit")
    key = stored.nearest_keys.get(str(stored.image_ids.index(image_id)))
    if key is None:
        raise NotFound(
            f"the audit kept no nearest training image for image {image_id} (only for "
            "flagged images and the closest few)"
        )
    return key


def audit_summary(stored: AuditStored) -> dict[str, Any]:
    """A few numbers for lists (the batch page's link)."""
    t = stored.report.totals
    return {"flagged": t.n_flagged, "images": t.n_images, "flag_rate": t.flag_rate}
