"""Plausibility scorers, the service side: which reviewed images a domain's scorer learns from
(each image's verdict as the report counts it, :func:`service.reports.image_verdicts`), starting
a ``score`` job (on request, or by itself once enough new verdicts arrived), and reading scorers
back for the API, the CLI and the dashboard. The fitting is ``ml.scorer``; the job is
``workers/scoring.py``.

**Retraining.** After verdicts land (a review sync, a webhook), every domain whose reviewed
images outnumber those its newest scorer was trained on by ``scorer_retrain_after`` (or that has
no scorer and at least ``scorer_min_images`` reviewed images) gets a ``score`` job, unless one
for that domain is already queued or running: calling it again changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ml.errors import Conflict, NotFound
from ml.schemas.scorer import ScorerMetrics  # torch- and sklearn-free
from service.config import Settings
from service.db.models import (
    Batch,
    CriteriaSet,
    Image,
    Job,
    JobKind,
    JobStatus,
    Model,
    Review,
    ReviewProject,
    ReviewTask,
    Scorer,
)
from service.encoder import require_encoder_weights
from service.job_kinds import new_job
from service.payloads import ScorePayload
from service.queue import submit
from service.reports import Judgement, image_verdicts
from service.reviews import counted

log = logging.getLogger(__name__)
UNFINISHED = (JobStatus.queued, JobStatus.running)


@dataclass(frozen=True)
class Reviewed:
    """One reviewed image of a domain with its verdict (majority of its reviewers)."""

    image_id: int
    class_name: str
    storage_key: str
    sha256: str
    plausible: bool
    reviews: int


def _domain_reviews(session: Session, domain: str) -> list[tuple[Review, Image, Model]]:
    query = (
        select(Review, Image, Model)
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .join(Model, Batch.model_id == Model.id)
        .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
        .join(CriteriaSet, ReviewProject.criteria_set_id == CriteriaSet.id)
        .where(CriteriaSet.domain == domain, counted())  # incomplete, edited: no label
        .order_by(Review.updated_at, Review.id)  # a reviewer's later verdict wins
    )
    return [(r, i, m) for r, i, m in session.execute(query).all()]


def reviewed_images(session: Session, domain: str) -> list[Reviewed]:
    """Every image of the domain's review projects (all criteria versions) with at least one
    verdict, in image id order, labelled plausible when most of its reviewers said so."""
    rows = _domain_reviews(session, domain)
    judged = [
        Judgement(img.id, img.class_name, m.id, str(m.mode), r.reviewer, r.plausible, r.criteria)
        for r, img, m in rows
    ]
    verdicts = image_verdicts(judged)
    images = {img.id: img for _r, img, _m in rows}
    counts: dict[int, int] = {}
    for _r, img, _m in rows:
        counts[img.id] = counts.get(img.id, 0) + 1
    return [
        Reviewed(
            i, images[i].class_name, images[i].storage_key, images[i].sha256, verdicts[i], counts[i]
        )
        for i in sorted(verdicts)
    ]


def reviewed_count(session: Session, domain: str) -> int:
    """How many distinct images of the domain have at least one verdict."""
    found = session.scalar(
        select(func.count(func.distinct(ReviewTask.image_id)))
        .select_from(Review)
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
        .join(CriteriaSet, ReviewProject.criteria_set_id == CriteriaSet.id)
        .where(CriteriaSet.domain == domain, counted())
    )
    return int(found or 0)


def latest_scorer(session: Session, domain: str) -> Scorer | None:
    """The domain's newest scorer version (the one new batches are scored with)."""
    return session.scalar(
        select(Scorer).where(Scorer.domain == domain).order_by(Scorer.version.desc()).limit(1)
    )


def metrics_of(scorer: Scorer) -> ScorerMetrics:
    return ScorerMetrics.model_validate(scorer.metrics)


def score_jobs(session: Session, domain: str, statuses: tuple[JobStatus, ...]) -> list[Job]:
    """The domain's score jobs in these states, newest first."""
    jobs = session.scalars(
        select(Job)
        .where(Job.kind == JobKind.score, Job.status.in_(statuses))
        .order_by(Job.id.desc())
    ).all()
    return [j for j in jobs if (j.params or {}).get("domain") == domain]


def known_domains(session: Session) -> list[str]:
    return sorted(session.scalars(select(CriteriaSet.domain).distinct()))


def start_scoring(session: Session, domain: str, requested_by: str, settings: Settings) -> Job:
    """A stored ``score`` job for the domain (not yet queued). :class:`NotFound` for an unknown
    domain, :class:`Conflict` with too few reviewed images or a job for the domain already
    waiting."""
    domains = known_domains(session)
    if domain not in domains:
        raise NotFound(f"unknown review domain {domain!r}; known: {', '.join(domains)}")
    pending = score_jobs(session, domain, UNFINISHED)
    if pending:
        raise Conflict(
            f"a scorer job for {domain!r} is already {pending[0].status} (job "
            f"{pending[0].id}); poll GET /jobs/{pending[0].id}",
        )
    have = reviewed_count(session, domain)
    if have < settings.scorer_min_images:
        raise Conflict(
            f"domain {domain!r} has {have} reviewed images; a scorer needs at least "
            f"{settings.scorer_min_images} (send batches for review: POST /reviews)",
        )
    job = new_job(JobKind.score, ScorePayload(domain=domain), requested_by=requested_by)
    session.add(job)
    session.flush()
    return job


def request_scorer(session: Session, settings: Settings, domain: str, requested_by: str) -> Job:
    """Check, store and queue a ``score`` job: the domain's next scorer version on all its
    reviewed images (committed by :func:`service.queue.submit`). The scorer embeds the images
    with the encoder, so its weights must be here; then :func:`start_scoring`'s rules."""
    require_encoder_weights(settings)
    job = start_scoring(session, domain, requested_by, settings)
    submit(session, [job])
    return job


def due_domains(session: Session, settings: Settings) -> list[str]:
    """Domains whose scorer should be (re)trained now (module docstring) and has no job
    waiting or running."""
    due = []
    for domain in known_domains(session):
        have = reviewed_count(session, domain)
        latest = latest_scorer(session, domain)
        trained_on = latest.n_images if latest is not None else 0
        enough = have >= settings.scorer_min_images
        if latest is None:
            new_enough = enough
        else:
            new_enough = have - trained_on >= settings.scorer_retrain_after
        if enough and new_enough and not score_jobs(session, domain, UNFINISHED):
            due.append(domain)
    return due


def retrain_due(session: Session, settings: Settings) -> list[Job]:
    """Queue a ``score`` job for every due domain (:func:`due_domains`) and publish it.
    Called after verdicts are committed; a failure to publish is logged, not raised (the
    verdicts are stored either way, and the next arrival tries again)."""
    jobs = [
        new_job(JobKind.score, ScorePayload(domain=d), requested_by="retrain")
        for d in due_domains(session, settings)
    ]
    if not jobs:
        return []
    session.add_all(jobs)
    try:
        submit(session, jobs)
    except Exception as exc:  # the broker: submit removed the jobs again
        log.warning("could not queue scorer retraining: %s", exc)
        return []
    return jobs
