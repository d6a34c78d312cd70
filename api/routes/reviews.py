"""Expert review: criteria sets, sending batches to Label Studio, verdicts coming back (webhook
and pull) and the blinded images Label Studio shows. The report is ``routes/reports.py``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.responses import Response
from sqlalchemy import select

from api.deps import AdminKey, AnyReader, SessionDep, SettingsDep, StorageDep
from api.responses import job_out, ls_public, project_out
from api.schemas import (
    AnnotationEvent,
    AnnotationsDeletedEvent,
    BatchSelected,
    CriteriaIn,
    CriteriaOut,
    JobOut,
    ProjectOut,
    ReviewAccepted,
    ReviewRequest,
    WebhookEvent,
    WebhookOut,
)
from service.blinding import NotAnImage, blind_png
from service.criteria import add_version, criteria_of
from service.db.models import (
    CriteriaSet,
    ReviewProject,
    ReviewTask,
)
from service.label_studio import SECRET_HEADER, LabelStudioError, refresh_annotations
from service.reviews import (
    pending_modes,
    queue_pulls,
    request_batch_review,
    require_label_studio_reads,
    stored_annotations,
    sync_all,
)
from service.scorers import retrain_due
from service.storage import ObjectNotFound

router = APIRouter(tags=["reviews"])


@router.get("/criteria")
def list_criteria(session: SessionDep, _reader: AnyReader) -> list[CriteriaOut]:
    """Any key, reviewers' included: the criteria are what they judge by."""
    rows = session.scalars(select(CriteriaSet).order_by(CriteriaSet.domain, CriteriaSet.version))
    return [CriteriaOut.model_validate(r) for r in rows]


@router.get("/criteria/{domain}")
def get_criteria(domain: str, session: SessionDep, _reader: AnyReader) -> CriteriaOut:
    return CriteriaOut.model_validate(criteria_of(session, domain))


@router.post("/criteria/{domain}", status_code=status.HTTP_201_CREATED)
def edit_criteria(
    domain: Annotated[str, PathParam(pattern=r"^[a-z][a-z0-9-]{0,63}$")],
    body: CriteriaIn,
    session: SessionDep,
    _admin: AdminKey,
) -> CriteriaOut:
    """A new version of the domain's criteria (earlier verdicts keep theirs)."""
    row = add_version(session, domain, body.title, [c.model_dump() for c in body.criteria])
    session.commit()
    return CriteriaOut.model_validate(row)


@router.post(
    "/reviews",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        404: {"description": "a batch does not exist"},
        409: {
            "description": "Label Studio is not configured, or select 'uncertain' names a "
            "batch without scorer probabilities"
        },
    },
)
def request_review(
    body: ReviewRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
) -> ReviewAccepted:
    """Send batches to Label Studio for blinded review: images of all batches are shuffled
    together into the domain's project; a sync job imports them (retried if Label Studio is
    down). ``select: uncertain`` sends ``per_batch`` images of each batch, a simple random
    sample (counted in the report) and the scorer's least certain images (kept out of the
    report's rates), mixed so no reviewer can tell them apart; 409 if a batch is not scored,
    422 if the batch has too few images left for the budget. ``controls`` adds real held-out
    images of the classes sent (``service/controls.py``); 422 if they cannot be drawn.
    ``ask_origin`` sends them to the domain's project that also asks "real or synthetic?"."""
    controls = body.controls.controls() if body.controls else None
    sent, job = request_batch_review(
        session,
        settings,
        body.batch_ids,
        body.domain,
        body.selection(),
        key.name,
        controls,
        ask_origin=body.ask_origin,
    )
    project, tasks = sent.project, sent.tasks
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
        project=project_out(session, project, ls_public(settings)),
        added=len(tasks),
        selected=[
            BatchSelected(batch_id=c.batch_id, random=len(c.random), uncertain=len(c.uncertain))
            for c in sent.choices
        ],
        controls=[b.id for b in sent.controls],
        png_size_auc=(sent.controls[0].control or {}).get("leak", {}).get("png_size_auc")
        if sent.controls
        else None,
        warning=warning,
    )


@router.get("/reviews/projects")
def list_projects(
    session: SessionDep, settings: SettingsDep, _reader: AnyReader
) -> list[ProjectOut]:
    """Any key, reviewers' included: where to review and how far it got (no model, batch or
    mode is named)."""
    rows = session.scalars(select(ReviewProject).order_by(ReviewProject.id))
    return [project_out(session, p, ls_public(settings)) for p in rows]


@router.post("/reviews/sync", status_code=status.HTTP_202_ACCEPTED)
def sync_now(request: Request, session: SessionDep, key: AdminKey) -> list[JobOut]:
    """Reconcile every project with Label Studio now (a pull also runs periodically)."""
    return [job_out(j, request) for j in sync_all(session, key.name)]


# --- the webhook: a notification, never a source of verdicts -----------------------------------

MAX_WEBHOOK_READS = 50


def webhook_secret(
    settings: SettingsDep,
    secret: Annotated[str | None, Header(alias=SECRET_HEADER)] = None,
) -> None:
    """The shared secret, compared in constant time. It only keeps strangers out: Label Studio
    shows it to every user of its organisation, so nothing a webhook says is believed."""
    expected = settings.review_webhook_secret
    if not expected or not secret or not hmac.compare_digest(secret.encode(), expected.encode()):
        raise HTTPException(403, f"wrong or missing {SECRET_HEADER} header")


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
    require_label_studio_reads(settings)
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
            if counts["stored"] or counts["removed"]:
                retrain_due(session, settings)  # enough new verdicts: the domain's scorer again
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
    :mod:`service.blinding`), so neither its bytes, its hash, its size nor any metadata chunk match
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
