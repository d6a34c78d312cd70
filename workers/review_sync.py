"""The sync job's side of the review loop in Label Studio: the project and its webhook, the
blinded tasks, and the reconciliation pull (reads shared with the API's webhook are in
:mod:`service.label_studio`).

Every step is idempotent, so a sync interrupted anywhere (Label Studio down, worker killed) is
simply run again: the project is found by its title before one is created, and a task whose
import was sent but whose id never came back is recognised by its opaque ``ref`` token before
anything is imported again (only such a task: see :func:`recover_imported`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import object_session

from service.config import Settings
from service.criteria import label_config
from service.db.models import ReviewProject, ReviewTask
from service.db.session import get_sessionmaker
from service.label_studio import (
    SECRET_HEADER,
    LabelStudioUnavailable,
    client,
    reason,
    unavailable,
    user_emails,
    with_email,
)
from service.reviews import reconcile, task_data
from service.scorers import retrain_due
from service.studies import refresh_status

log = logging.getLogger(__name__)
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
IMPORT_CHUNK = 500
STUDY_SAMPLING = "Uniform sampling"  # Label Studio's name for a random order per annotator


def _title(project: ReviewProject) -> str:
    """Unique per protomed installation and project (the row's id and creation time), so a
    re-run finds its own project and never another installation's on a shared Label Studio."""
    cs = project.criteria_set
    stamp = project.created_at.strftime("%Y%m%d%H%M%S%f")
    if project.study is not None:  # Label Studio allows 50 characters: no room for the name
        return f"protomed study #{project.study.id} [{project.id}-{stamp}]"
    return f"protomed review: {cs.domain} v{cs.version} [{project.id}-{stamp}]"


def study_settings(project: ReviewProject) -> dict[str, Any]:
    """The Label Studio project settings of a study's project (none for a shared one): each
    task is served until it has ``overlap`` annotations (``maximum_annotations``), each reader
    gets the remaining tasks in a random order of their own (``Uniform sampling``), and the
    editor shows no earlier annotation history, no predictions and no skip button (a skip is
    no read). Label Studio Community cannot assign tasks to users or hide the data manager:
    see :mod:`service.studies` for what protomed counts instead."""
    study = project.study
    if study is None:
        return {}
    return {
        "maximum_annotations": study.overlap,
        "sampling": STUDY_SAMPLING,
        "show_annotation_history": False,
        "show_collab_predictions": False,
        "show_skip_button": False,
    }


def description(project: ReviewProject) -> str:
    cs = project.criteria_set
    then = ", then whether the image is real or synthetic" if project.origin_question else ""
    text = f"{cs.title}. Images are blinded and shuffled; judge each criterion{then}."
    if project.study is not None:
        text = f"Study: {project.study.name}. {text}"
    return text


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
            description=description(project),
            label_config=label_config(cs.criteria, ask_origin=project.origin_question),
            **study_settings(project),
        )
    ls_id: int = found.id
    project.ls_project_id = ls_id
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
    return ls_id


def export(ls: Any, ls_project_id: int, *, all_tasks: bool) -> list[dict[str, Any]]:
    chunks = ls.projects.exports.download_sync(
        ls_project_id, export_type="JSON", download_all_tasks=all_tasks
    )
    exported: list[dict[str, Any]] = json.loads(b"".join(chunks) or b"[]")
    return exported


def last_task_id(ls: Any, ls_project_id: int) -> int:
    """The highest task id of the Label Studio project (0 without tasks): one task, read
    through the data manager's ordering."""
    ordering = json.dumps({"ordering": ["-tasks:id"]})
    page = ls.tasks.list(project=ls_project_id, page_size=1, fields="task_only", query=ordering)
    last = next(iter(page), None)
    return int(last.id) if last is not None else 0


def recover_imported(
    pending: list[ReviewTask], exported: list[dict[str, Any]], known: set[int]
) -> int:
    """Give back their Label Studio ids to the pending tasks whose import was sent but whose
    answer never came back (a crash between the import and the commit). Only a task whose
    import was sent (``import_after`` set) may be adopted, and only by a Label Studio task
    numbered above the project's highest task before that import (Label Studio's ids only
    grow): any member can import a task with one of protomed's refs, but only once protomed's
    own import has shown it, so the lowest-numbered such task is protomed's. Any other
    claimant stays foreign (the next pull reports it). Returns how many were recovered."""
    sent = {t.token: t for t in pending if t.import_after is not None}
    claims: dict[str, int] = {}
    for item in exported:
        data, ls_id = item.get("data"), item.get("id")
        ref = data.get("ref") if isinstance(data, dict) else None
        task = sent.get(ref) if isinstance(ref, str) else None
        if task is None or not isinstance(ls_id, int) or ls_id in known:
            continue
        if ls_id > (task.import_after or 0):
            claims[task.token] = min(ls_id, claims.get(task.token, ls_id))
    for token, ls_id in claims.items():
        sent[token].ls_task_id = ls_id
    return len(claims)


def import_tasks(ls: Any, project: ReviewProject, settings: Settings) -> int:
    """Import the tasks Label Studio does not have yet, in their shuffled order. Each chunk's
    intent is committed before it is sent (``import_after``) and its ids right after, so only
    tasks protomed itself sent can be recovered from an export (:func:`recover_imported`): a
    task any member imports with one of protomed's refs is never adopted."""
    pending = sorted((t for t in project.tasks if t.ls_task_id is None), key=lambda t: t.position)
    if not pending:
        return 0
    if project.ls_project_id is None:
        raise RuntimeError(f"review project {project.id} has no Label Studio project yet")
    session = object_session(project)
    if session is None:
        raise RuntimeError(f"review project {project.id} is not in a session")
    if any(t.import_after is not None for t in pending):  # sent before a crash
        known = {t.ls_task_id for t in project.tasks if t.ls_task_id is not None}
        recover_imported(pending, export(ls, project.ls_project_id, all_tasks=True), known)
        session.commit()
    todo = [t for t in pending if t.ls_task_id is None]
    for start in range(0, len(todo), IMPORT_CHUNK):
        chunk = todo[start : start + IMPORT_CHUNK]
        last = last_task_id(ls, project.ls_project_id)
        for task in chunk:
            task.import_after = last
        session.commit()
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
        session.commit()
    return len(todo)


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
            refresh_status(session, project)
            session.commit()
            retrain_due(session, settings)  # enough new verdicts: the domain's scorer again
            return {"imported": imported, "ls_project_id": project.ls_project_id, **counts}
    except Exception as exc:
        if unavailable(exc):
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
