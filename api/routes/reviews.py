"""Expert review: criteria sets, sending batches to Label Studio, verdicts coming back (webhook
and pull), the blinded images Label Studio shows, and the plausibility report."""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from api.blinding import NotAnImage, blind_png
from api.criteria import add_version, latest
from api.db.models import (
    CriteriaSet,
    Job,
    JobKind,
    JobStatus,
    Review,
    ReviewProject,
    ReviewTask,
)
from api.deps import MAX_ID, AdminKey, AnyReader, Reader, SessionDep, SettingsDep, StorageDep
from api.queue import submit
from api.reviews import SECRET_HEADER, ReviewError, judgements, pending_modes, stored_annotations
from api.reviews import request_review as add_tasks
from api.routes.jobs import job_out
from api.schemas import JobOut
from api.storage import ObjectNotFound

router = APIRouter(tags=["reviews"])


class Criterion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    label: str = Field(min_length=1, max_length=120)
    help: str = Field(default="", max_length=500)


class CriteriaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    criteria: list[Criterion] = Field(min_length=1, max_length=20)


class CriteriaOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    domain: str
    version: int
    title: str
    criteria: list[dict[str, Any]]


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1, max_length=200)
    domain: str | None = Field(default=None, max_length=64)


class ProjectOut(BaseModel):
    id: int
    domain: str
    criteria_set_id: int
    version: int
    ls_project_id: int | None
    url: str | None
    tasks: int
    reviews: int


class ReviewAccepted(BaseModel):
    job: JobOut
    project: ProjectOut
    added: int
    warning: str | None = Field(
        default=None,
        description="Set when every image waiting for import comes from one mode: reviewers "
        "could then tell them apart by Label Studio's task order (send both modes together).",
    )


@router.get("/criteria")
def list_criteria(session: SessionDep, _reader: AnyReader) -> list[CriteriaOut]:
    """Any key, reviewers' included: the criteria are what they judge by."""
    rows = session.scalars(select(CriteriaSet).order_by(CriteriaSet.domain, CriteriaSet.version))
    return [CriteriaOut.model_validate(r) for r in rows]


@router.get("/criteria/{domain}")
def get_criteria(domain: str, session: SessionDep, _reader: AnyReader) -> CriteriaOut:
    row = latest(session, domain)
    if row is None:
        known = ", ".join(sorted(set(session.scalars(select(CriteriaSet.domain)))))
        raise HTTPException(404, f"no criteria for domain {domain!r}; known: {known}")
    return CriteriaOut.model_validate(row)


@router.post("/criteria/{domain}", status_code=status.HTTP_201_CREATED)
def edit_criteria(
    domain: Annotated[str, PathParam(pattern=r"^[a-z][a-z0-9-]{0,63}$")],
    body: CriteriaIn,
    session: SessionDep,
    _admin: AdminKey,
) -> CriteriaOut:
    """A new version of the domain's criteria (earlier verdicts keep theirs)."""
    keys = [c.key for c in body.criteria]
    if len(set(keys)) != len(keys):
        raise HTTPException(422, f"criterion keys must be unique: {keys}")
    row = add_version(session, domain, body.title, [c.model_dump() for c in body.criteria])
    session.commit()
    return CriteriaOut.model_validate(row)


def project_out(session: SessionDep, project: ReviewProject, public: str | None) -> ProjectOut:
    tasks = session.scalar(
        select(func.count(ReviewTask.id)).where(ReviewTask.project_id == project.id)
    )
    reviews = session.scalar(
        select(func.count(Review.id)).join(ReviewTask).where(ReviewTask.project_id == project.id)
    )
    url = None
    if public and project.ls_project_id:
        url = f"{public.rstrip('/')}/projects/{project.ls_project_id}/data"
    cs = project.criteria_set
    return ProjectOut(
        id=project.id, domain=cs.domain, criteria_set_id=cs.id, version=cs.version,
        ls_project_id=project.ls_project_id, url=url, tasks=tasks or 0, reviews=reviews or 0,
    )  # fmt: skip


def _ls_public(settings: SettingsDep) -> str | None:
    return settings.label_studio_public_url or settings.label_studio_url


@router.post("/reviews", status_code=status.HTTP_202_ACCEPTED)
def request_review(
    body: ReviewRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
) -> ReviewAccepted:
    """Send batches to Label Studio for blinded review: images of all batches are shuffled
    together into the domain's project; a sync job imports them (retried if Label Studio is
    down)."""
    if not settings.label_studio_url:
        raise HTTPException(409, "Label Studio is not configured: set PROTOMED_LABEL_STUDIO_URL")
    try:
        project, tasks = add_tasks(session, body.batch_ids, body.domain)
    except LookupError as exc:
        raise HTTPException(404, str(exc).strip("'\"")) from exc
    except ReviewError as exc:
        raise HTTPException(422, str(exc)) from exc
    job = Job(kind=JobKind.review_sync, params={"project_id": project.id}, requested_by=key.name)
    session.add(job)
    submit(session, [job])
    modes = pending_modes(session, project)
    warning = None
    if len(modes) == 1 and tasks:
        warning = (
            f"every image waiting for import is from a {modes.pop()} model: Label Studio numbers "
            "tasks in import order, so reviewers could see them as one block; send batches of "
            "both modes in one request (or before the next sync) to keep the blinding"
        )
    return ReviewAccepted(
        job=job_out(job, request),
        project=project_out(session, project, _ls_public(settings)),
        added=len(tasks),
        warning=warning,
    )


@router.get("/reviews/projects")
def list_projects(
    session: SessionDep, settings: SettingsDep, _reader: AnyReader
) -> list[ProjectOut]:
    """Any key, reviewers' included: where to review and how far it got (no model, batch or
    mode is named)."""
    rows = session.scalars(select(ReviewProject).order_by(ReviewProject.id))
    return [project_out(session, p, _ls_public(settings)) for p in rows]


@router.post("/reviews/sync", status_code=status.HTTP_202_ACCEPTED)
def sync_now(request: Request, session: SessionDep, key: AdminKey) -> list[JobOut]:
    """Reconcile every project with Label Studio now (a pull also runs periodically)."""
    ids = session.scalars(select(ReviewProject.id).order_by(ReviewProject.id)).all()
    jobs = [
        Job(kind=JobKind.review_sync, params={"project_id": i}, requested_by=key.name) for i in ids
    ]
    session.add_all(jobs)
    submit(session, jobs)
    return [job_out(j, request) for j in jobs]


# --- the webhook: a notification, never a source of verdicts -----------------------------------

LsId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID, description="A Label Studio id.")]
# An event naming more annotations than this (a bulk deletion) is not read one by one: a pull of
# the projects (one export each) reconciles them instead.
MAX_WEBHOOK_READS = 50


class AnnotationRef(BaseModel):
    """An annotation as a webhook names it. Label Studio sends the whole annotation; only its
    id is read, the rest of the body is never trusted."""

    id: LsId


class AnnotationEvent(BaseModel):
    action: Literal["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    annotation: AnnotationRef


class AnnotationsDeletedEvent(BaseModel):
    action: Literal["ANNOTATIONS_DELETED"]
    annotations: list[AnnotationRef] = Field(min_length=1, max_length=100_000)


WebhookEvent = Annotated[AnnotationEvent | AnnotationsDeletedEvent, Field(discriminator="action")]


class WebhookOut(BaseModel):
    action: str
    applied: int = Field(description="Verdicts stored or updated, equal to Label Studio's.")
    removed: int = Field(description="Verdicts removed: Label Studio has no such annotation.")
    ignored: int = Field(description="Annotations that are not protomed's, or not in Label Studio.")
    queued: list[int] = Field(
        default_factory=list,
        description="review_sync jobs that will pull the verdicts instead (Label Studio could "
        "not be read now, or the event names too many annotations).",
    )
    detail: str | None = None


def webhook_secret(
    settings: SettingsDep,
    secret: Annotated[str | None, Header(alias=SECRET_HEADER)] = None,
) -> None:
    """The shared secret, compared in constant time. It only keeps strangers out: Label Studio
    shows it to every user of its organisation, so nothing a webhook says is believed."""
    expected = settings.review_webhook_secret
    if not expected or not secret or not hmac.compare_digest(secret.encode(), expected.encode()):
        raise HTTPException(403, f"wrong or missing {SECRET_HEADER} header")


def queue_pulls(session: SessionDep) -> list[int]:
    """A review_sync job for every project that has reached Label Studio, unless one is already
    waiting to start (it will read Label Studio after this event). The job retries while Label
    Studio is down (``review_sync_attempts``), and the periodic pull remains behind it."""
    projects = session.scalars(
        select(ReviewProject.id).where(ReviewProject.ls_project_id.is_not(None))
    ).all()
    waiting = session.scalars(
        select(Job).where(Job.kind == JobKind.review_sync, Job.status == JobStatus.queued)
    ).all()
    pending = {int(j.params.get("project_id", 0)): j.id for j in waiting}
    jobs = [
        Job(kind=JobKind.review_sync, params={"project_id": p}, requested_by="webhook")
        for p in projects
        if p not in pending
    ]
    if jobs:
        session.add_all(jobs)
        submit(session, jobs)
    return sorted([*(j.id for j in jobs), *(pending[p] for p in projects if p in pending)])


@router.post(
    "/reviews/webhook",
    dependencies=[Depends(webhook_secret)],
    responses={
        202: {"model": WebhookOut, "description": "Label Studio could not be read: pull queued"},
        403: {"description": f"wrong or missing {SECRET_HEADER}"},
        409: {"description": "Label Studio is not configured"},
    },
)
def webhook(
    event: Annotated[WebhookEvent, Body()],
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
) -> WebhookOut:
    """Label Studio's annotation events, taken as a notification only: each annotation named is
    read back from Label Studio with protomed's own token, and only what Label Studio holds
    counts (a verdict on one of protomed's tasks of that project; removed only once Label
    Studio confirms the annotation is gone or cancelled). If Label Studio cannot be read, a
    pull is queued and the answer is 202, so the event is not lost (Label Studio never resends
    a webhook). Idempotent: a repeated event changes nothing."""
    from workers.review_sync import LabelStudioError, refresh_annotations

    if not settings.label_studio_url or not settings.label_studio_token:
        raise HTTPException(
            409, "Label Studio is not configured: set PROTOMED_LABEL_STUDIO_URL and _TOKEN"
        )
    named = (
        [event.annotation.id]
        if isinstance(event, AnnotationEvent)
        else list(dict.fromkeys(a.id for a in event.annotations))
    )
    out = WebhookOut(action=event.action, applied=0, removed=0, ignored=0)
    if len(named) > MAX_WEBHOOK_READS:
        out.detail = f"{len(named)} annotations: the projects are pulled, not each one read"
    else:
        ids = named
        if isinstance(event, AnnotationsDeletedEvent):  # only verdicts we hold can be removed
            ids = stored_annotations(session, named)
            out.ignored = len(named) - len(ids)
        try:
            counts = refresh_annotations(session, ids, settings)
        except LabelStudioError as exc:
            session.rollback()
            out.detail = f"Label Studio could not be read ({exc}); a pull is queued"
        else:
            session.commit()
            out.applied, out.removed = counts["stored"], counts["removed"]
            out.ignored += counts["ignored"]
            return out
    out.queued = queue_pulls(session)
    response.status_code = status.HTTP_202_ACCEPTED
    return out


@router.get(
    "/review-images/{token}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def review_image(
    token: Annotated[str, PathParam(max_length=64)], session: SessionDep, storage: StorageDep
) -> Response:
    """The image behind a review token, for Label Studio's editor in the reviewer's browser
    (no protomed key: the random token is the capability). Blinded: re-encoded per token (see
    :mod:`api.blinding`), so neither its bytes, its hash, its size nor any metadata chunk match
    what ``/images`` or ``/batches`` show; no header echoes the stored object."""
    task = session.scalar(select(ReviewTask).where(ReviewTask.token == token))
    if task is None:
        raise HTTPException(404, "no review image with this token")
    try:
        data = blind_png(storage.get_bytes(task.image.storage_key), task.token)
    except ObjectNotFound as exc:
        raise HTTPException(404, "the image is missing from storage") from exc
    except NotAnImage as exc:
        raise HTTPException(404, "the stored image cannot be decoded") from exc
    # Label Studio's editor loads images cross-origin (CORS mode): without this header the
    # reviewer sees "There was an issue loading URL". No ETag or Last-Modified (they would
    # echo the stored object); private caching only; no Referer leaves the page.
    headers = {
        "Cache-Control": "private, max-age=3600",
        "Access-Control-Allow-Origin": "*",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Response(data, media_type="image/png", headers=headers)


def parse_ids(models: str | None) -> list[int] | None:
    if not models:
        return None
    try:
        ids = [int(x) for x in models.split(",") if x.strip()]
    except ValueError as exc:
        raise HTTPException(422, f"models must be comma-separated ids (got {models!r})") from exc
    if any(not 1 <= i <= MAX_ID for i in ids):
        raise HTTPException(422, "model ids must be between 1 and 2147483647")
    return ids


def plausibility(
    session: SessionDep,
    dataset_id: int | None = None,
    models: str | None = None,
    reviewer: str | None = None,
    criteria_set_id: int | None = None,
) -> dict[str, Any]:
    """The report as a dict (used by the JSON/CSV endpoint and the dashboard)."""
    from api.reports import plausibility_report

    found, columns, criteria = judgements(
        session, dataset_id=dataset_id, model_ids=parse_ids(models), reviewer=reviewer,
        criteria_set_id=criteria_set_id,
    )  # fmt: skip
    report = plausibility_report(found, columns, criteria)
    report["filters"] = {
        "dataset_id": dataset_id, "models": models, "reviewer": reviewer,
        "criteria_set_id": criteria_set_id,
    }  # fmt: skip
    return report


@router.get(
    "/reports/plausibility",
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
)
def plausibility_endpoint(
    session: SessionDep,
    _reader: Reader,
    dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    models: Annotated[str | None, Query(description="Comma-separated model ids.")] = None,
    reviewer: Annotated[
        str | None, Query(max_length=254, description="Label Studio user id or e-mail.")
    ] = None,
    criteria_set_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    """Per class: images reviewed and % plausible per model, prototype minus baseline with a
    95% interval (Newcombe/Wilson) and Fisher's exact p, averages, failure rate per criterion,
    agreement between reviewers. ``format=csv``: the seed's Tables 3-4 layout."""
    report = plausibility(session, dataset_id, models, reviewer, criteria_set_id)
    if format == "csv":
        from api.reports import report_csv

        return PlainTextResponse(report_csv(report), media_type="text/csv")
    return report
