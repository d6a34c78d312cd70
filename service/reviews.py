"""The review loop's bookkeeping, independent of HTTP and of Label Studio's client: which images
go to which project (blinded and shuffled), verdicts in and out, and the rows a report is
built from. Label Studio calls live in ``workers/review_sync.py``; routes in
``api/routes/reviews.py``."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from sqlalchemy import ColumnElement, CursorResult, Select, and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ml.errors import Conflict, Invalid, NotFound
from service.config import Settings, get_settings
from service.controls import Controls, add_control_batches, png_size_auc
from service.criteria import latest, parse_result
from service.db.models import (
    MAX_ID,
    Batch,
    BatchSource,
    CriteriaSet,
    Image,
    Job,
    JobKind,
    JobStatus,
    Model,
    Review,
    ReviewProject,
    ReviewSample,
    ReviewTask,
    utc_now,
)
from service.job_kinds import new_job
from service.payloads import ReviewSyncPayload
from service.queue import submit
from service.report_schemas import (
    ControlLeak,
    Criterion,
    Filters,
    Flagged,
    ModelColumn,
    PlausibilityReport,
)
from service.reports import Judgement, plausibility_report
from service.selection import BatchChoice, Selection, choose_all
from service.storage import get_storage
from service.study_statistics import DEFAULT_MARGIN


def counted() -> ColumnElement[bool]:
    """The verdicts a number may count: given (not incomplete) and on a task whose data is as
    protomed imported it (not edited in Label Studio since)."""
    return and_(Review.plausible.is_not(None), ReviewTask.edited.is_(None))


class ReviewError(Invalid):
    """A review request that cannot be served as asked (the message says why)."""


def require_label_studio(settings: Settings) -> None:
    """:class:`Conflict` unless Label Studio is configured: a review request would otherwise
    queue sync jobs that can never import anything."""
    if not settings.label_studio_url:
        raise Conflict("Label Studio is not configured: set PROTOMED_LABEL_STUDIO_URL")


def require_label_studio_reads(settings: Settings) -> None:
    """:class:`Conflict` unless protomed can read Label Studio (its address and a token): what
    a webhook names is only believed once read back from there."""
    if not settings.label_studio_url or not settings.label_studio_token:
        raise Conflict("Label Studio is not configured: set PROTOMED_LABEL_STUDIO_URL and _TOKEN")


def queue_sync(session: Session, project_id: int, requested_by: str) -> Job:
    """A review_sync job for the project, stored and queued."""
    return queue_syncs(session, [project_id], requested_by)[0]


def queue_syncs(session: Session, project_ids: Sequence[int], requested_by: str) -> list[Job]:
    """A review_sync job per project, stored and queued: the one way anything reaches Label
    Studio (a review request, a sync now, a webhook), so every caller stores the same
    :class:`ReviewSyncPayload`."""
    jobs = [
        new_job(JobKind.review_sync, ReviewSyncPayload(project_id=p), requested_by=requested_by)
        for p in project_ids
    ]
    if jobs:
        session.add_all(jobs)
        submit(session, jobs)
    return jobs


def sync_all(session: Session, requested_by: str) -> list[Job]:
    """Reconcile every project with Label Studio now (a pull also runs periodically)."""
    ids = session.scalars(select(ReviewProject.id).order_by(ReviewProject.id)).all()
    return queue_syncs(session, ids, requested_by)


def queue_pulls(session: Session) -> list[int]:
    """A review_sync job for every project that has reached Label Studio, unless one is already
    waiting to start (it will read Label Studio after this event); the ids of the jobs that
    will read it. The job retries while Label Studio is down (``review_sync_attempts``), and
    the periodic pull remains behind it."""
    projects = session.scalars(
        select(ReviewProject.id).where(ReviewProject.ls_project_id.is_not(None))
    ).all()
    waiting = session.scalars(
        select(Job).where(Job.kind == JobKind.review_sync, Job.status == JobStatus.queued)
    ).all()
    pending = {ReviewSyncPayload.model_validate(j.params).project_id: j.id for j in waiting}
    jobs = queue_syncs(session, [p for p in projects if p not in pending], "webhook")
    return sorted([*(j.id for j in jobs), *(pending[p] for p in projects if p in pending)])


def project_for(
    session: Session, criteria_set: CriteriaSet, origin_question: bool = False
) -> ReviewProject:
    """The criteria set's shared project with (or without) the "real or synthetic?" question,
    made on first use: Label Studio's labelling interface is per project, so the two are apart;
    a study's own project is never it."""
    project = session.scalar(
        select(ReviewProject).where(
            ReviewProject.criteria_set_id == criteria_set.id,
            ReviewProject.origin_question == origin_question,
            ReviewProject.study_id.is_(None),
        )
    )
    if project is None:
        project = ReviewProject(criteria_set=criteria_set, origin_question=origin_question)
        session.add(project)
        session.flush()
    return project


@dataclass
class SentForReview:
    """What a review request did: the project, its new tasks (shuffled in with the others not
    yet imported) and each batch's chosen images (``service.selection``)."""

    project: ReviewProject
    tasks: list[ReviewTask]
    choices: list[BatchChoice]
    controls: list[Batch] = field(default_factory=list)


def request_review(
    session: Session, batch_ids: list[int], domain: str | None
) -> tuple[ReviewProject, list[ReviewTask]]:
    """Every image of the batches not yet in the domain's project, as new tasks (see
    :func:`send_for_review`)."""
    sent = send_for_review(session, batch_ids, domain)
    return sent.project, sent.tasks


def checked_batches(
    session: Session, batch_ids: list[int], domain: str | None
) -> tuple[list[Batch], CriteriaSet]:
    """The batches (each once, in order) and the newest criteria set of their review domain,
    checked before anything changes: every batch exists (:class:`NotFound`), is generated
    (controls are asked for with ``controls``) and has its images; the domain is ``domain`` or
    the one domain of the batches' datasets (:class:`ReviewError`)."""
    batches = [session.get(Batch, i) for i in dict.fromkeys(batch_ids)]
    missing = [i for i, b in zip(dict.fromkeys(batch_ids), batches, strict=True) if b is None]
    if missing:
        raise NotFound(f"no batch with id {', '.join(map(str, missing))}")
    found = [b for b in batches if b is not None]
    real = [b.id for b in found if b.model is None]
    if real:
        raise ReviewError(
            f"batch {', '.join(map(str, real))} holds control images; ask for controls with "
            "'controls' instead"
        )
    domains = {b.model.dataset.domain for b in found if b.model is not None}
    if domain is None:
        if None in domains or len(domains) != 1:
            raise ReviewError(
                "give 'domain' (the batches' datasets have no single review domain set)"
            )
        (domain,) = {d for d in domains if d is not None}
    criteria_set = latest(session, domain)
    if criteria_set is None:
        known = sorted(session.scalars(select(CriteriaSet.domain).distinct()))
        raise ReviewError(f"unknown review domain {domain!r}; known: {', '.join(known)}")
    not_done = [b.id for b in found if not b.images]
    if not_done:
        raise ReviewError(f"batch {', '.join(map(str, not_done))} has no images yet")
    return found, criteria_set


def send_for_review(
    session: Session,
    batch_ids: list[int],
    domain: str | None,
    selection: Selection | None = None,
    rng: random.Random | None = None,
    controls: Controls | None = None,
    settings: Settings | None = None,
    project: ReviewProject | None = None,
    ask_origin: bool = False,
) -> SentForReview:
    """New tasks for the batches' chosen images (``selection``; default: all of them) in the
    domain's current project, in one shuffled order across all batches (so baseline and
    prototype images, random and uncertain picks, are mixed). Images already in the project
    are not added twice; an earlier uncertain pick that joins the random sample keeps its task,
    whose ``sample`` turns to ``random``. Every batch is checked before anything changes
    (:class:`ReviewError`, :class:`~service.selection.SelectionError`, :class:`NotFound`).

    ``controls``: real held-out images of the classes sent, added as control batches
    (:mod:`service.controls`) whose tasks are made and shuffled exactly like the synthetic
    ones (random sample); the project's PNG-size AUC is then recorded on each of them.

    ``project``: the project to add to instead of the domain's shared one (a study's own,
    :mod:`service.studies`), under its criteria set's domain. ``ask_origin``: into the shared
    project that also asks "real or synthetic?" (a project of its own, :func:`project_for`)."""
    selection = selection or Selection()
    if project is not None:
        domain = project.criteria_set.domain
    found, criteria_set = checked_batches(session, batch_ids, domain)
    if project is None:
        project = project_for(session, criteria_set, ask_origin)
    have = {
        t.image_id: t
        for t in session.scalars(select(ReviewTask).where(ReviewTask.project_id == project.id))
    }
    choices = choose_all(found, have, selection, rng)
    for choice in choices:  # earlier uncertain picks drawn into the random sample
        for img in choice.random:
            if img.id in have:
                have[img.id].sample = ReviewSample.random
    images = [
        (img, sample)
        for c in choices
        for sample, chosen in (
            (ReviewSample.random, c.random),
            (ReviewSample.uncertain, c.uncertain),
        )
        for img in chosen
        if img.id not in have
    ]
    added: list[Batch] = []
    if controls is not None:
        settings = settings or get_settings()
        storage = get_storage()
        synthetic = [img for img, sample in images if sample == ReviewSample.random]
        models = [b.model for b in found if b.model is not None]
        added = add_control_batches(session, settings, storage, controls, models, synthetic)
        images += [(img, ReviewSample.random) for b in added for img in b.images]
    secrets.SystemRandom().shuffle(images)
    start: int = session.execute(
        select(func.coalesce(func.max(ReviewTask.position), -1)).where(
            ReviewTask.project_id == project.id
        )
    ).scalar_one()
    tasks = [
        ReviewTask(
            project=project,
            image=img,
            token=secrets.token_urlsafe(24),
            position=start + 1 + i,
            sample=sample,
        )
        for i, (img, sample) in enumerate(images)
    ]
    session.add_all(tasks)
    # Tasks not yet imported into Label Studio are shuffled again with the new ones: Label
    # Studio numbers tasks in import order, so batches sent in separate requests before one
    # sync must not arrive as recognisable blocks.
    pending = [t for t in project.tasks if t.ls_task_id is None]
    places = sorted(t.position for t in pending)
    secrets.SystemRandom().shuffle(pending)
    for task, place in zip(pending, places, strict=True):
        task.position = place
    session.flush()
    if added:
        leak = png_size_auc(session, get_storage(), project.id)
        for batch in added:
            batch.control = {**(batch.control or {}), "leak": leak}
        session.flush()
    return SentForReview(project, tasks, choices, added)


def request_batch_review(
    session: Session,
    settings: Settings,
    batch_ids: list[int],
    domain: str | None,
    selection: Selection | None,
    requested_by: str,
    controls: Controls | None = None,
    ask_origin: bool = False,
    project: ReviewProject | None = None,
) -> tuple[SentForReview, Job]:
    """Send batches to blinded review: their chosen images (and ``controls``, real held-out
    images) into the domain's shared project or the given one (a study's;
    :func:`send_for_review`) and a queued sync job that imports them into Label Studio."""
    require_label_studio(settings)
    sent = send_for_review(
        session,
        batch_ids,
        domain,
        selection,
        controls=controls,
        settings=settings,
        ask_origin=ask_origin,
        project=project,
    )
    return sent, queue_sync(session, sent.project.id, requested_by)


def pending_modes(session: Session, project: ReviewProject) -> set[str]:
    """The modes of the images waiting to be imported: a single one means Label Studio's task
    order will show them as a block of one mode (what the request's warning is about)."""
    rows = session.scalars(
        select(Model.mode)
        .distinct()
        .join(Batch, Batch.model_id == Model.id)
        .join(Image, Image.batch_id == Batch.id)
        .join(ReviewTask, ReviewTask.image_id == Image.id)
        .where(ReviewTask.project_id == project.id, ReviewTask.ls_task_id.is_(None))
    )
    return {str(m) for m in rows}


def task_data(task: ReviewTask, public_url: str) -> dict[str, Any]:
    """What Label Studio shows: the image (by opaque token) and the class it should depict."""
    return {
        "image": f"{public_url.rstrip('/')}/review-images/{task.token}",
        "expected_class": task.image.class_name,
        "ref": task.token,
    }


def _reviewer(completed_by: Any) -> tuple[str, str | None]:
    """(reviewer, e-mail): the Label Studio user id as text (the stable identity that agreement
    counts by) and the e-mail where known, so the report can be filtered by either. Label
    Studio's API gives the id alone; ``workers/review_sync.py`` adds the e-mail as
    ``{"id": ..., "email": ...}``."""
    if isinstance(completed_by, dict):
        email = completed_by.get("email") or None
        user = completed_by.get("id")
        return (str(user) if user is not None else str(email)), email
    return str(completed_by), None


def _writer(updated_by: Any) -> str | None:
    """Who Label Studio says last wrote an annotation: its ``updated_by``, the user of the token
    that created or changed it (a request cannot set it, unlike ``completed_by``); None where
    Label Studio records none (annotations imported along with a task)."""
    if isinstance(updated_by, dict):
        updated_by = updated_by.get("id", updated_by.get("user_id"))
    if isinstance(updated_by, int) and not isinstance(updated_by, bool):
        return str(updated_by)
    return None


def our_task(session: Session, ls_task_id: Any, ls_project_id: Any) -> ReviewTask | None:
    """Protomed's task behind a Label Studio task id, only if it belongs to the project Label
    Studio names: an annotation of any other task (another project, another installation on the
    same Label Studio, or none) never counts."""
    if isinstance(ls_task_id, dict):
        ls_task_id = ls_task_id.get("id")
    if not isinstance(ls_task_id, int) or not isinstance(ls_project_id, int):
        return None
    return session.scalar(
        select(ReviewTask)
        .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
        .where(ReviewTask.ls_task_id == ls_task_id, ReviewProject.ls_project_id == ls_project_id)
    )


def apply_annotation(session: Session, annotation: dict[str, Any]) -> Review | None:
    """Create or replace the verdict of one annotation as Label Studio holds it (read with
    protomed's own token, never taken from a webhook body); a cancelled (skipped) annotation
    removes it. Annotations of tasks that are not ours in that project are ignored. The verdict
    is flagged when Label Studio says someone other than its named author wrote it (or names
    no writer). Idempotent."""
    ann_id = int(annotation["id"])
    task = our_task(session, annotation.get("task"), annotation.get("project"))
    if task is None:
        return None
    if annotation.get("was_cancelled"):
        remove_annotations(session, [ann_id])
        return None
    keys = [c["key"] for c in task.project.criteria_set.criteria]
    parsed = parse_result(annotation.get("result") or [], keys)
    reviewer, email = _reviewer(annotation.get("completed_by"))
    writer = _writer(annotation.get("updated_by"))
    asked = task.project.origin_question  # answers to a question not asked are not stored
    values = {
        "task_id": task.id,
        "reviewer": reviewer,
        "reviewer_email": email,
        "plausible": parsed["plausible"],
        "overall": parsed["overall"],
        "criteria": parsed["criteria"],
        "comment": parsed["comment"],
        "answered_synthetic": parsed["answered_synthetic"] if asked else None,
        "origin_confidence": parsed["origin_confidence"] if asked else None,
        "updated_at": utc_now(),
        "written_by": writer,
        "flagged": writer != reviewer,
    }
    for _ in range(2):  # a webhook and a pull may insert the same annotation at once
        review = session.scalar(select(Review).where(Review.ls_annotation_id == ann_id))
        if review is None:
            review = Review(ls_annotation_id=ann_id, **values)
            session.add(review)
        else:
            for k, v in values.items():
                setattr(review, k, v)
        try:
            with session.begin_nested():
                session.flush()
            return review
        except IntegrityError:
            session.expunge(review)
    raise RuntimeError(f"annotation {ann_id} could not be stored")


def refresh_annotation(session: Session, ann_id: int, current: dict[str, Any] | None) -> str:
    """Make the stored verdict of annotation ``ann_id`` equal Label Studio's ``current`` record
    (None: Label Studio confirmed it does not exist). Returns what happened: ``stored``,
    ``removed`` (gone or cancelled in Label Studio) or ``ignored`` (not one of our verdicts)."""
    if current is not None and int(current["id"]) != ann_id:
        raise ValueError(f"Label Studio answered annotation {current['id']} for {ann_id}")
    if current is None or current.get("was_cancelled"):
        return "removed" if remove_annotations(session, [ann_id]) else "ignored"
    return "stored" if apply_annotation(session, current) is not None else "ignored"


def stored_annotations(session: Session, ann_ids: Iterable[int]) -> list[int]:
    """Those of ``ann_ids`` that have a stored verdict (only they can be removed)."""
    ids = list(ann_ids)
    if not ids:
        return []
    found = session.scalars(select(Review.ls_annotation_id).where(Review.ls_annotation_id.in_(ids)))
    return sorted(set(found))


def remove_annotations(session: Session, ann_ids: Iterable[int]) -> int:
    # DML executes to a CursorResult (which has rowcount); Session.execute is typed as Result
    result = cast(
        "CursorResult[Any]",
        session.execute(delete(Review).where(Review.ls_annotation_id.in_(list(ann_ids)))),
    )
    return result.rowcount or 0


def _odd(ls_task_id: int | None, claims: ReviewTask | None, reason: str) -> dict[str, Any]:
    """One task a pull did not count, as the project's JSON and the dashboard show it: never
    the ref itself (a review token) nor the image behind it."""
    return {
        "ls_task_id": ls_task_id,
        "claims": claims.ls_task_id if claims is not None else None,
        "reason": reason,
    }


def edited(task: ReviewTask, data: Any) -> str | None:
    """What of the task's data in Label Studio is no longer as protomed imported it (any member
    can PATCH it), or None. The image URL's host is not compared (the public address may have
    changed since the import), only the token it names."""
    if not isinstance(data, dict):
        return "its data"
    wrong = [
        name
        for name, ok in (
            ("ref", data.get("ref") == task.token),
            ("image", str(data.get("image", "")).endswith(f"/review-images/{task.token}")),
            ("expected_class", data.get("expected_class") == task.image.class_name),
        )
        if not ok
    ]
    return ", ".join(wrong) or None


def reconcile(
    session: Session, project: ReviewProject, exported: list[dict[str, Any]]
) -> dict[str, int]:
    """Make the project's verdicts equal Label Studio's export (tasks with annotations): catches
    webhooks that never arrived, updates and deletions. Returns counts.

    Only the tasks protomed created count, known by the ids Label Studio's import answered
    (``ReviewTask.ls_task_id``, never changed here). Any member can import a task whose
    ``ref`` is one of protomed's tokens, with annotations in other users' names, or edit a
    task's data: such a task is skipped and listed in ``project.odd_tasks`` (replaced by every
    pull); an edited task of protomed's is marked (``ReviewTask.edited``): its stored verdicts
    are kept but count nowhere until it is restored, since they may be about another picture or
    class; the pull goes on with the rest, whatever the task data holds."""
    ours = {t.ls_task_id: t for t in project.tasks if t.ls_task_id is not None}
    by_token = {t.token: t for t in project.tasks}
    seen: set[int] = set()
    kept: set[int] = set()  # our tasks skipped: their stored verdicts stay as they are
    odd: list[dict[str, Any]] = []
    applied = 0
    for item in exported:
        ls_id = item.get("id") if isinstance(item, dict) else None
        data = item.get("data") if isinstance(item, dict) else None
        if not isinstance(ls_id, int) or isinstance(ls_id, bool):
            odd.append(_odd(None, None, "a task without a task id: skipped"))
            continue
        task = ours.get(ls_id)
        if task is None:
            ref = data.get("ref") if isinstance(data, dict) else None
            claimed = by_token.get(ref) if isinstance(ref, str) else None
            if claimed is not None:
                odd.append(_odd(ls_id, claimed, NOT_OURS))
            continue
        changed = edited(task, data)
        task.edited = changed  # None again once a member restored it
        if changed is not None:
            kept.add(task.id)
            odd.append(_odd(ls_id, task, f"{changed} edited in Label Studio: {SKIPPED}"))
            continue
        annotations = item.get("annotations")
        for ann in annotations if isinstance(annotations, list) else []:
            if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
                continue
            ann = {**ann, "task": ls_id, "project": project.ls_project_id}
            if apply_annotation(session, ann) is not None:
                seen.add(int(ann["id"]))
                applied += 1
    stale = session.scalars(
        select(Review.ls_annotation_id)
        .join(ReviewTask)
        .where(
            ReviewTask.project_id == project.id,
            Review.ls_annotation_id.not_in(seen),
            ReviewTask.id.not_in(kept),
        )
    ).all()
    removed = remove_annotations(session, stale)
    project.odd_tasks = odd
    project.last_pulled_at = utc_now()
    foreign = sum(o["reason"] == NOT_OURS for o in odd)
    return {
        "applied": applied,
        "removed": removed,
        "foreign": foreign,
        "skipped": len(odd) - foreign,
    }


NOT_OURS = "claims the ref of one of protomed's tasks but was not created by protomed: not counted"
SKIPPED = "none of its verdicts counts until it is restored (they are kept)"


def _judgement(r: Review, img: Image, model_id: int, mode: str, sample: object) -> Judgement:
    """One stored verdict as the report counts it (``model_id`` 0, mode ``real``: a control)."""
    return Judgement(
        img.id,
        img.class_name,
        model_id,
        mode,
        r.reviewer,
        r.plausible,
        r.criteria,
        sample=str(sample),
        flagged=r.flagged,
        reviewer_email=r.reviewer_email,
        answered_synthetic=r.answered_synthetic,
        origin_confidence=r.origin_confidence,
    )


def judgements(
    session: Session,
    *,
    dataset_id: int | None = None,
    model_ids: list[int] | None = None,
    reviewer: str | None = None,
    criteria_set_id: int | None = None,
    flagged: Flagged = "include",
    project_id: int | None = None,
    readers: Sequence[str] | None = None,
) -> Judged:
    """The verdicts matching the filters as report input (:class:`Judged`): judgements, model
    columns, criteria, and the verdicts set aside on edited tasks. Columns: the models with
    verdicts (or those asked for), baseline first. ``flagged``: keep the verdicts written by
    someone other than their named author (``include``), leave them out (``exclude``) or keep
    only them (``only``). ``project_id``: one review project's verdicts only (a study's);
    ``readers``: only those whose reviewer has one of these e-mails (a study's named readers,
    lower-cased)."""
    query = (
        select(
            Review,
            Image,
            Model,
            ReviewProject.criteria_set_id,
            ReviewTask.sample,
            ReviewTask.edited,
        )
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .join(Model, Batch.model_id == Model.id)
        .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
    )
    if dataset_id is not None:
        query = query.where(Model.dataset_id == dataset_id)
    if model_ids:
        query = query.where(Model.id.in_(model_ids))
    if reviewer is not None:  # the Label Studio user id or e-mail
        who = reviewer.strip()
        query = query.where(
            or_(Review.reviewer == who, func.lower(Review.reviewer_email) == who.lower())
        )
    if criteria_set_id is not None:
        query = query.where(ReviewProject.criteria_set_id == criteria_set_id)
    query = _scoped(query, flagged, project_id, readers)
    found = session.execute(query).all()
    rows = [row for row in found if row.edited is None]  # verdicts on edited tasks: set aside
    out = [_judgement(r, img, m.id, str(m.mode), sample) for r, img, m, _, sample, _ in rows]
    ids = list(model_ids or sorted({m.id for _, _, m, *_ in rows}))
    models = [session.get(Model, i) for i in ids]
    columns = sorted(
        (ModelColumn(id=m.id, mode=str(m.mode), label=f"{m.mode} #{m.id}") for m in models if m),
        key=lambda c: (c.mode != "baseline", c.id),
    )
    set_ids = {criteria_set_id} if criteria_set_id else {row[3] for row in rows}
    criteria: list[Criterion] = []
    for set_id in sorted(set_ids):
        cs = session.get(CriteriaSet, set_id)
        for c in cs.criteria if cs else []:
            if c["key"] not in {x.key for x in criteria}:
                criteria.append(Criterion(key=c["key"], label=c["label"]))
    controls = _control_judgements(
        session,
        dataset_id,
        reviewer,
        criteria_set_id,
        flagged,
        [row[3] for row in rows],
        project_id,
        readers,
    )
    return Judged(
        out,
        columns,
        criteria,
        on_edited_tasks=len(found) - len(rows),
        controls=controls.judgements,
        leaks=controls.leaks,
    )


def _scoped(
    query: Select[Any], flagged: Flagged, project_id: int | None, readers: Sequence[str] | None
) -> Select[Any]:
    """The filters that models' and controls' verdicts share: authorship, project, readers."""
    if flagged != "include":
        query = query.where(Review.flagged.is_(flagged == "only"))
    if project_id is not None:
        query = query.where(ReviewTask.project_id == project_id)
    if readers is not None:
        query = query.where(func.lower(Review.reviewer_email).in_([r.lower() for r in readers]))
    return query


class _Controls(NamedTuple):
    judgements: list[Judgement]
    leaks: list[ControlLeak]


def _control_judgements(
    session: Session,
    dataset_id: int | None,
    reviewer: str | None,
    criteria_set_id: int | None,
    flagged: Flagged,
    criteria_sets: list[int],
    project_id: int | None = None,
    readers: Sequence[str] | None = None,
) -> _Controls:
    """The counted verdicts on real control images under the same filters (``dataset_id``:
    the control batch's dataset), in the criteria sets the models' verdicts come from (all
    sets when there are none), and the PNG-size leak measure of each project holding them (the
    newest control batch's)."""
    query = (
        select(Review, Image, ReviewTask.sample, ReviewTask.project_id, Batch)
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
        .where(Batch.source == BatchSource.control, ReviewTask.edited.is_(None))
    )
    if dataset_id is not None:
        query = query.where(Batch.dataset_id == dataset_id)
    if reviewer is not None:
        who = reviewer.strip()
        query = query.where(
            or_(Review.reviewer == who, func.lower(Review.reviewer_email) == who.lower())
        )
    if criteria_set_id is not None:
        query = query.where(ReviewProject.criteria_set_id == criteria_set_id)
    elif criteria_sets and project_id is None:
        query = query.where(ReviewProject.criteria_set_id.in_(set(criteria_sets)))
    query = _scoped(query, flagged, project_id, readers)
    found = session.execute(query).all()
    out = [_judgement(r, img, 0, "real", sample) for r, img, sample, _, _ in found]
    newest: dict[int, Batch] = {}
    for *_, project_id, batch in found:
        if project_id not in newest or batch.id > newest[project_id].id:
            newest[project_id] = batch
    leaks = [
        ControlLeak.model_validate(leak)
        for _, b in sorted(newest.items())
        if isinstance(leak := (b.control or {}).get("leak"), dict)
    ]
    return _Controls(out, leaks)


class Judged(NamedTuple):
    """What :func:`judgements` found: the counted judgements, the model columns, the criteria,
    and how many verdicts matching the filters were set aside on edited tasks."""

    judgements: list[Judgement]
    columns: list[ModelColumn]
    criteria: list[Criterion]
    on_edited_tasks: int
    controls: list[Judgement] = []  # noqa: RUF012 - a NamedTuple default, never mutated
    leaks: list[ControlLeak] = []  # noqa: RUF012


class ProjectCounts(NamedTuple):
    """How far a review project got: its tasks, the verdicts stored, and of those the
    incomplete ones (counted nowhere) and the flagged ones (written in another's name)."""

    tasks: int
    reviews: int
    incomplete: int
    flagged: int


def project_counts(session: Session, project: ReviewProject) -> ProjectCounts:
    tasks = session.scalar(
        select(func.count(ReviewTask.id)).where(ReviewTask.project_id == project.id)
    )
    reviews, incomplete, flagged = session.execute(
        select(
            func.count(Review.id),
            func.count(Review.id).filter(Review.plausible.is_(None)),
            func.count(Review.id).filter(Review.flagged.is_(True)),
        )
        .join(ReviewTask)
        .where(ReviewTask.project_id == project.id)
    ).one()
    return ProjectCounts(tasks or 0, reviews or 0, incomplete or 0, flagged or 0)


class FilterError(Invalid):
    """A report filter that names no valid ids (the message says what is allowed)."""


def parse_ids(models: str | None) -> list[int] | None:
    """Comma-separated model ids, or None for no filter."""
    if not models:
        return None
    try:
        ids = [int(x) for x in models.split(",") if x.strip()]
    except ValueError as exc:
        raise FilterError(f"models must be comma-separated ids (got {models!r})") from exc
    if any(not 1 <= i <= MAX_ID for i in ids):
        raise FilterError(f"model ids must be between 1 and {MAX_ID}")
    return ids


def plausibility(
    session: Session,
    dataset_id: int | None = None,
    models: str | None = None,
    reviewer: str | None = None,
    criteria_set_id: int | None = None,
    flagged: Flagged = "include",
    margin: float = DEFAULT_MARGIN,
) -> PlausibilityReport:
    """The plausibility report with its filters, as the JSON/CSV endpoint and the dashboard
    show it; :class:`FilterError` for malformed model ids. ``margin``: the equivalence margin
    of the "real or synthetic?" section's test against chance."""
    found = judgements(
        session,
        dataset_id=dataset_id,
        model_ids=parse_ids(models),
        reviewer=reviewer,
        criteria_set_id=criteria_set_id,
        flagged=flagged,
    )
    filters = Filters(
        dataset_id=dataset_id,
        models=models,
        reviewer=reviewer,
        criteria_set_id=criteria_set_id,
        flagged=flagged,
    )
    report = plausibility_report(
        found.judgements,
        found.columns,
        found.criteria,
        controls=found.controls,
        leaks=found.leaks,
        margin=margin,
    )
    return report.model_copy(update={"filters": filters, "on_edited_tasks": found.on_edited_tasks})
