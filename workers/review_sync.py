"""Label Studio side of the review loop (label-studio-sdk): the project and its webhook, the
blinded tasks, and the reconciliation pull.

Every step is idempotent, so a sync interrupted anywhere (Label Studio down, worker killed) is
simply run again: the project is found by its title before one is created, and tasks already
imported are recognised by their opaque ``ref`` token before anything is imported.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.criteria import label_config
from service.db.models import ReviewProject
from service.db.session import get_sessionmaker
from service.reviews import reconcile, refresh_annotation, task_data

log = logging.getLogger(__name__)
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
SECRET_HEADER = "X-Protomed-Secret"
IMPORT_CHUNK = 500
# A webhook's reads of Label Studio: short and not retried (the sdk would sleep 1 + 2 s on a
# refused connection), since an unreachable Label Studio turns into a queued pull at once.
WEBHOOK_READ: dict[str, Any] = {"timeout_in_seconds": 10, "max_retries": 0}


class LabelStudioError(Exception):
    """Label Studio could not be read as protomed needs (the message says why)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer (or answered 5xx): retry later, nothing is lost."""


def client(settings: Settings) -> Any:
    from label_studio_sdk import LabelStudio

    if not settings.label_studio_url or not settings.label_studio_token:
        raise RuntimeError("PROTOMED_LABEL_STUDIO_URL and PROTOMED_LABEL_STUDIO_TOKEN are not set")
    return LabelStudio(
        base_url=settings.label_studio_url, api_key=settings.label_studio_token, timeout=30
    )


def _title(project: ReviewProject) -> str:
    """Unique per protomed installation and project (the row's id and creation time), so a
    re-run finds its own project and never another installation's on a shared Label Studio."""
    cs = project.criteria_set
    stamp = project.created_at.strftime("%Y%m%d%H%M%S%f")
    return f"protomed review: {cs.domain} v{cs.version} [{project.id}-{stamp}]"


def ensure_project(ls: Any, project: ReviewProject, settings: Settings) -> int:
    """The project's Label Studio id, creating the project and its webhook once."""
    if project.ls_project_id is not None:
        return project.ls_project_id
    title = _title(project)
    found = next((p for p in ls.projects.list() if p.title == title), None)
    if found is None:
        cs = project.criteria_set
        found = ls.projects.create(
            title=title,
            description=f"{cs.title}. Images are blinded and shuffled; judge each criterion.",
            label_config=label_config(cs.criteria),
        )
    project.ls_project_id = found.id
    if settings.review_webhook_secret:
        hook = ls.webhooks.create(
            url=f"{(settings.review_callback_url or settings.public_url).rstrip('/')}"
            "/reviews/webhook",
            project=found.id,
            send_payload=True,
            send_for_all_actions=False,
            actions=WEBHOOK_ACTIONS,
            headers={SECRET_HEADER: settings.review_webhook_secret},
        )
        project.ls_webhook_id = hook.id
    return found.id


def export(ls: Any, ls_project_id: int, *, all_tasks: bool) -> list[dict[str, Any]]:
    chunks = ls.projects.exports.download_sync(
        ls_project_id, export_type="JSON", download_all_tasks=all_tasks
    )
    return json.loads(b"".join(chunks) or b"[]")


def import_tasks(ls: Any, project: ReviewProject, settings: Settings) -> int:
    """Import the tasks Label Studio does not have yet, in their shuffled order."""
    pending = sorted((t for t in project.tasks if t.ls_task_id is None), key=lambda t: t.position)
    if not pending:
        return 0
    by_token = {t.token: t for t in pending}
    for item in export(ls, project.ls_project_id, all_tasks=True):  # imported before a crash
        task = by_token.pop((item.get("data") or {}).get("ref"), None)
        if task is not None:
            task.ls_task_id = item["id"]
    todo = [t for t in pending if t.ls_task_id is None]
    for start in range(0, len(todo), IMPORT_CHUNK):
        chunk = todo[start : start + IMPORT_CHUNK]
        resp = ls.projects.import_tasks(
            project.ls_project_id,
            request=[task_data(t, settings.public_url) for t in chunk],
            return_task_ids=True,
        )
        ids = list(resp.task_ids or [])
        if len(ids) != len(chunk):
            raise RuntimeError(f"Label Studio returned {len(ids)} task ids for {len(chunk)}")
        for task, ls_id in zip(chunk, ids, strict=True):
            task.ls_task_id = ls_id
    return len(todo)


def current_annotation(
    ls: Any, ann_id: int, options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Label Studio's own record of an annotation (``GET /api/annotations/{id}/``: id, task,
    project, completed_by as a user id, result, was_cancelled), None when Label Studio says it
    does not exist (404)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        found = ls.annotations.get(ann_id, request_options=options)
    except ApiError as exc:
        if exc.status_code == 404:
            return None
        raise
    return found.model_dump(mode="json")


def user_emails(
    ls: Any, user_ids: Iterable[int] | None = None, options: dict[str, Any] | None = None
) -> dict[int, str]:
    """Label Studio user id -> e-mail: every user of the organisation (one request), or the
    given ones (one request each; for a webhook's one or two annotations)."""
    from label_studio_sdk.core.api_error import ApiError

    if user_ids is None:
        try:
            users = ls.users.list(request_options=options)
        except ApiError as exc:
            if exc.status_code not in (403, 404):
                raise
            log.warning("Label Studio lists no users (%s): no e-mails kept", exc.status_code)
            return {}
        return {u.id: u.email for u in users if u.id is not None and u.email}
    out: dict[int, str] = {}
    for uid in set(user_ids):
        try:
            email = ls.users.get(uid, request_options=options).email
        except ApiError as exc:
            if exc.status_code not in (403, 404):  # a user we may not see: no e-mail, no more
                raise
            continue
        if email:
            out[uid] = email
    return out


def with_email(annotation: dict[str, Any], emails: dict[int, str]) -> dict[str, Any]:
    """The annotation with ``completed_by`` as {id, email}, the form ``apply_annotation``
    stores both from."""
    user = annotation.get("completed_by")
    if isinstance(user, int):
        return {**annotation, "completed_by": {"id": user, "email": emails.get(user)}}
    return annotation


def refresh_annotations(
    session: Session, ann_ids: Iterable[int], settings: Settings
) -> Counter[str]:
    """Re-read each annotation from Label Studio with protomed's token and make the stored
    verdict equal what Label Studio holds: stored, removed (only once Label Studio confirms it
    is gone or cancelled) or ignored (not ours). A webhook names the ids and nothing else counts
    from it, since anyone in Label Studio's organisation can read the webhook's secret. Raises
    :class:`LabelStudioError` when Label Studio cannot be read (nothing is changed then)."""
    counts: Counter[str] = Counter()
    try:
        ls = client(settings)
        found = {i: current_annotation(ls, i, WEBHOOK_READ) for i in dict.fromkeys(ann_ids)}
        users = {a["completed_by"] for a in found.values() if a and a.get("completed_by")}
        emails = user_emails(ls, [u for u in users if isinstance(u, int)], WEBHOOK_READ)
    except Exception as exc:
        if _unavailable(exc):
            raise LabelStudioUnavailable(reason(exc)) from exc
        if getattr(exc, "status_code", None) is not None:  # ApiError: 401/403 (wrong token)...
            raise LabelStudioError(reason(exc)) from exc
        raise
    for ann_id, current in found.items():
        counts[refresh_annotation(session, ann_id, current and with_email(current, emails))] += 1
    return counts


def reason(exc: Exception) -> str:
    """Why Label Studio could not be used, in short. Never the sdk's ApiError text: it holds
    Label Studio's response headers, its session cookie among them, and the reason reaches job
    errors (any reader) and webhook answers."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"Label Studio answered {status}"
    return str(exc) or type(exc).__name__


def _unavailable(exc: Exception) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, ConnectionError)):
        return True
    return isinstance(exc, ApiError) and (exc.status_code or 500) >= 500


def sync_project(project_id: int, settings: Settings, *, push: bool = True) -> dict[str, Any]:
    """Project and webhook, missing tasks, then every verdict pulled back. Each stage commits,
    so what is done stays done when a later stage fails."""
    try:
        ls = client(settings)
        with get_sessionmaker()() as session:
            project = session.get(ReviewProject, project_id)
            if project is None:
                raise ValueError(f"no review project {project_id}")
            imported = 0
            if push:
                ensure_project(ls, project, settings)
                session.commit()
                imported = import_tasks(ls, project, settings)
                session.commit()
            if project.ls_project_id is None:
                return {"imported": 0, "pulled": False}
            exported = export(ls, project.ls_project_id, all_tasks=False)
            emails = user_emails(ls)
            for item in exported:
                item["annotations"] = [with_email(a, emails) for a in item.get("annotations") or []]
            counts = reconcile(session, project, exported)
            session.commit()
            return {"imported": imported, "ls_project_id": project.ls_project_id, **counts}
    except Exception as exc:
        if _unavailable(exc):
            raise LabelStudioUnavailable(reason(exc)) from exc
        raise


def pull_all(settings: Settings) -> None:
    """The periodic reconciliation: every project that has reached Label Studio."""
    with get_sessionmaker()() as session:
        ids = session.scalars(
            select(ReviewProject.id).where(ReviewProject.ls_project_id.is_not(None))
        ).all()
    for project_id in ids:
        try:
            sync_project(project_id, settings, push=False)
        except LabelStudioUnavailable as exc:
            log.warning("review pull of project %s: Label Studio unavailable (%s)", project_id, exc)
            return
