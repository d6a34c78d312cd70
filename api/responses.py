"""Response builders shared by several route modules: a job, a batch or a review project with
the links a client follows next."""

from __future__ import annotations

from fastapi import Request
from sqlalchemy.orm import Session

from api.schemas import (
    AuditImageLinks,
    AuditOut,
    BatchOut,
    ImageOut,
    JobOut,
    OddTask,
    ProjectOut,
)
from service.audits import AuditStored
from service.config import Settings
from service.db.models import Batch, Job, ReviewProject
from service.reviews import project_counts


def job_out(job: Job, request: Request) -> JobOut:
    """A job with links to what it concerns and, once done, what it produced."""
    links = {"self": str(request.url_for("get_job", job_id=job.id))}
    if job.model_id is not None:
        links["model"] = str(request.url_for("get_model", model_id=job.model_id))
    for batch in job.batches:
        links["batch"] = str(request.url_for("get_batch", batch_id=batch.id))
        links["zip"] = str(request.url_for("batch_zip", batch_id=batch.id))
    return JobOut.model_validate(job).model_copy(update={"links": links})


def batch_out(batch: Batch, request: Request) -> BatchOut:
    """A batch with the URLs of its images and of its zip."""
    images = [
        ImageOut.model_validate(i).model_copy(
            update={"url": str(request.url_for("get_image", image_id=i.id))}
        )
        for i in sorted(batch.images, key=lambda i: i.index)
    ]
    zip_url = str(request.url_for("batch_zip", batch_id=batch.id))
    return BatchOut.model_validate(batch).model_copy(update={"images": images, "zip_url": zip_url})


def ls_public(settings: Settings) -> str | None:
    """Label Studio's address as reviewers' browsers reach it."""
    return settings.label_studio_public_url or settings.label_studio_url


def project_out(session: Session, project: ReviewProject, public: str | None) -> ProjectOut:
    """A review project: where to review it and how far it got (no model or mode named)."""
    counts = project_counts(session, project)
    url = None
    if public and project.ls_project_id:
        url = f"{public.rstrip('/')}/projects/{project.ls_project_id}/data"
    cs = project.criteria_set
    return ProjectOut(
        id=project.id,
        domain=cs.domain,
        criteria_set_id=cs.id,
        version=cs.version,
        origin_question=project.origin_question,
        ls_project_id=project.ls_project_id,
        url=url,
        tasks=counts.tasks,
        reviews=counts.reviews,
        incomplete=counts.incomplete,
        flagged=counts.flagged,
        odd_tasks=[OddTask.model_validate(o) for o in project.odd_tasks or []],
    )


def audit_out(job: Job, stored: AuditStored, request: Request) -> AuditOut:
    """The stored audit with links to each image and, where kept, its nearest training image."""
    links = []
    for a, image_id in zip(stored.report.images, stored.image_ids, strict=True):
        kept = str(a.index) in stored.nearest_keys
        nearest = request.url_for("audit_nearest", batch_id=stored.batch_id, image_id=image_id)
        links.append(
            AuditImageLinks(
                index=a.index,
                image_id=image_id,
                image_url=str(request.url_for("get_image", image_id=image_id)),
                nearest_url=str(nearest) if kept else None,
            )
        )
    return AuditOut(
        batch_id=stored.batch_id,
        job_id=job.id,
        finished_at=job.finished_at,
        report=stored.report,
        links=links,
    )
