"""The review loop's bookkeeping, independent of HTTP and of Label Studio's client: which images
go to which project (blinded and shuffled), verdicts in and out, and the rows a report is
built from. Label Studio calls live in ``workers/review_sync.py``; routes in
``api/routes/reviews.py``."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.criteria import latest, parse_result
from service.db.models import (
    MAX_ID,
    Batch,
    CriteriaSet,
    Image,
    Model,
    Review,
    ReviewProject,
    ReviewSample,
    ReviewTask,
    utc_now,
)
from service.report_models import Criterion, Filters, ModelColumn, PlausibilityReport
from service.reports import Judgement, plausibility_report
from service.selection import BatchChoice, Selection, choose_all


class ReviewError(ValueError):
    """A review request that cannot be served as asked (the message says why)."""


def project_for(session: Session, criteria_set: CriteriaSet) -> ReviewProject:
    project = session.scalar(
        select(ReviewProject).where(ReviewProject.criteria_set_id == criteria_set.id)
    )
    if project is None:
        project = ReviewProject(criteria_set=criteria_set)
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


def request_review(
    session: Session, batch_ids: list[int], domain: str | None
) -> tuple[ReviewProject, list[ReviewTask]]:
    """Every image of the batches not yet in the domain's project, as new tasks (see
    :func:`send_for_review`)."""
    sent = send_for_review(session, batch_ids, domain)
    return sent.project, sent.tasks


def send_for_review(
    session: Session,
    batch_ids: list[int],
    domain: str | None,
    selection: Selection | None = None,
    rng: random.Random | None = None,
) -> SentForReview:
    """New tasks for the batches' chosen images (``selection``; default: all of them) in the
    domain's current project, in one shuffled order across all batches (so baseline and
    prototype images, random and uncertain picks, are mixed). Images already in the project
    are not added twice; an earlier uncertain pick that joins the random sample keeps its task,
    whose ``sample`` turns to ``random``. Every batch is checked before anything changes
    (:class:`ReviewError`, :class:`~service.selection.SelectionError`)."""
    selection = selection or Selection()
    batches = [session.get(Batch, i) for i in dict.fromkeys(batch_ids)]
    missing = [i for i, b in zip(dict.fromkeys(batch_ids), batches, strict=True) if b is None]
    if missing:
        raise LookupError(f"no batch with id {', '.join(map(str, missing))}")
    found = [b for b in batches if b is not None]
    domains = {b.model.dataset.domain for b in found}
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
    project = project_for(session, criteria_set)
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
    secrets.SystemRandom().shuffle(images)
    start: int = session.execute(
        select(func.coalesce(func.max(ReviewTask.position), -1)).where(
            ReviewTask.project_id == project.id
        )
    ).scalar_one()
    tasks = [
        ReviewTask(
            project=project, image=img, token=secrets.token_urlsafe(24), position=start + 1 + i,
            sample=sample,
        )
        for i, (img, sample) in enumerate(images)
    ]  # fmt: skip
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
    return SentForReview(project, tasks, choices)


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
    removes it. Annotations of tasks that are not ours in that project are ignored. Idempotent."""
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
    values = {
        "task_id": task.id, "reviewer": reviewer, "reviewer_email": email,
        "plausible": parsed["plausible"], "overall": parsed["overall"],
        "criteria": parsed["criteria"], "comment": parsed["comment"], "updated_at": utc_now(),
    }  # fmt: skip
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


def reconcile(
    session: Session, project: ReviewProject, exported: list[dict[str, Any]]
) -> dict[str, int]:
    """Make the project's verdicts equal Label Studio's export (tasks with annotations): catches
    webhooks that never arrived, updates and deletions. Returns counts."""
    by_token = {t.token: t for t in project.tasks}
    seen: set[int] = set()
    linked = applied = 0
    for item in exported:
        token = (item.get("data") or {}).get("ref")
        task = by_token.get(token) if isinstance(token, str) else None
        if task is None:
            continue
        if task.ls_task_id != item["id"]:
            task.ls_task_id, linked = item["id"], linked + 1
            session.flush()
        for ann in item.get("annotations") or []:
            ann = {**ann, "task": item["id"], "project": project.ls_project_id}
            if apply_annotation(session, ann) is not None:
                seen.add(int(ann["id"]))
                applied += 1
    stale = session.scalars(
        select(Review.ls_annotation_id)
        .join(ReviewTask)
        .where(ReviewTask.project_id == project.id, Review.ls_annotation_id.not_in(seen))
    ).all()
    removed = remove_annotations(session, stale)
    project.last_pulled_at = utc_now()
    return {"linked": linked, "applied": applied, "removed": removed}


def judgements(
    session: Session,
    *,
    dataset_id: int | None = None,
    model_ids: list[int] | None = None,
    reviewer: str | None = None,
    criteria_set_id: int | None = None,
) -> tuple[list[Judgement], list[ModelColumn], list[Criterion]]:
    """The verdicts matching the filters as report input: (judgements, model columns,
    criteria). Columns: the models with verdicts (or those asked for), baseline first."""
    query = (
        select(Review, Image, Model, ReviewProject.criteria_set_id, ReviewTask.sample)
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
    rows = session.execute(query).all()
    out = [
        Judgement(img.id, img.class_name, m.id, str(m.mode), r.reviewer, r.plausible, r.criteria,
                  sample=str(sample))
        for r, img, m, _, sample in rows
    ]  # fmt: skip
    ids = list(model_ids or sorted({m.id for _, _, m, *_ in rows}))
    models = [session.get(Model, i) for i in ids]
    columns = sorted(
        (ModelColumn(id=m.id, mode=str(m.mode), label=f"{m.mode} #{m.id}") for m in models if m),
        key=lambda c: (c.mode != "baseline", c.id),
    )
    set_ids = {criteria_set_id} if criteria_set_id else {s for *_, s, _ in rows}
    criteria: list[Criterion] = []
    for set_id in sorted(set_ids):
        cs = session.get(CriteriaSet, set_id)
        for c in cs.criteria if cs else []:
            if c["key"] not in {x.key for x in criteria}:
                criteria.append(Criterion(key=c["key"], label=c["label"]))
    return out, columns, criteria


def project_counts(session: Session, project: ReviewProject) -> tuple[int, int]:
    """(tasks, verdicts) of a review project: how far its review got."""
    tasks = session.scalar(
        select(func.count(ReviewTask.id)).where(ReviewTask.project_id == project.id)
    )
    reviews = session.scalar(
        select(func.count(Review.id)).join(ReviewTask).where(ReviewTask.project_id == project.id)
    )
    return tasks or 0, reviews or 0


class FilterError(ValueError):
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
) -> PlausibilityReport:
    """The plausibility report with its filters, as the JSON/CSV endpoint and the dashboard
    show it; :class:`FilterError` for malformed model ids."""
    found, columns, criteria = judgements(
        session, dataset_id=dataset_id, model_ids=parse_ids(models), reviewer=reviewer,
        criteria_set_id=criteria_set_id,
    )  # fmt: skip
    filters = Filters(
        dataset_id=dataset_id, models=models, reviewer=reviewer, criteria_set_id=criteria_set_id
    )
    return plausibility_report(found, columns, criteria).model_copy(update={"filters": filters})
