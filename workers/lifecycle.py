"""A job's life in the database: claim, heartbeat, progress, cancel, finish, and the reaper.

The database is the source of truth, not the broker. A worker *claims* a job with one conditional
UPDATE (queued, or running with a stale heartbeat), so redelivered or duplicated messages never
run a job twice. While it runs, a heartbeat thread refreshes ``heartbeat_at`` and picks up cancel
requests. If a worker dies (SIGKILL, lost machine) its heartbeat stops; :func:`reap` re-queues the
job (up to ``max_attempts`` runs) or marks it failed, so nothing stays ``running`` forever.

A job's *place* in its queue is its id (submission order). A task message is a token: the worker
that receives it claims the first queued job of the message's queue (:func:`claim_next`), not
necessarily the one the message names. So a job re-queued after an interruption keeps its id and
runs before every job submitted after it, whatever order the broker delivers messages in; each
re-queue publishes one more token, so there is always a message for every queued job.

A worker that is shutting down (:data:`SHUTTING_DOWN`, set from Celery's
``worker_shutting_down`` signal) claims nothing, and its running job stops at its next progress
report (the trainer checkpoints first) and goes back to ``queued`` at once
(:func:`requeue_interrupted`), without using up an attempt. A worker process that died without
that (killed) is released by its supervisor at once (:func:`release_worker`), or else by the
reaper. Torch-free: the API and light workers import it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.models import Job, JobKind, JobStatus, ModelStatus, utc_now
from service.db.session import get_sessionmaker
from workers.progress import StagedProgress

log = logging.getLogger(__name__)
# Set (from the worker's signal handler) when this worker process has been asked to stop.
SHUTTING_DOWN = threading.Event()
INTERRUPTED = "interrupted: the worker is shutting down"


class JobStopped(Exception):
    """Raised inside a job when it must stop: cancelled by a user, over its time limit, or
    interrupted because its worker is shutting down (then it is re-queued, not failed)."""

    def __init__(self, reason: str, *, cancelled: bool, interrupted: bool = False) -> None:
        super().__init__(reason)
        self.cancelled, self.interrupted = cancelled, interrupted


def _stale_before(settings: Settings) -> Any:
    return utc_now() - timedelta(seconds=settings.heartbeat_timeout_s)


def claim(session: Session, job_id: int, worker: str, settings: Settings) -> bool:
    """Atomically take a job: queued (not cancelled), or running with a dead worker."""
    now = utc_now()
    claimable = or_(
        and_(Job.status == JobStatus.queued, Job.cancel_requested.is_(False)),
        and_(
            Job.status == JobStatus.running,
            Job.heartbeat_at < _stale_before(settings),
            Job.attempts < settings.max_attempts,
        ),
    )
    # DML executes to a CursorResult (which has rowcount); Session.execute is typed as Result
    result = cast(
        "CursorResult[Any]",
        session.execute(
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                status=JobStatus.running,
                worker=worker,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                started_at=now,
                error=None,
            )
            .execution_options(synchronize_session=False)
        ),
    )
    session.commit()
    return result.rowcount == 1


def claim_next(
    session: Session, job_id: int, worker: str, settings: Settings, kinds: Sequence[str]
) -> int | None:
    """Claim the job a message names if its worker died (a redelivered message), else the first
    queued job of ``kinds`` (the message's queue) in submission order; ``None``: nothing to
    do (the token's job was cancelled, or run from an earlier token)."""
    own = session.get(Job, job_id)
    if (
        own is not None
        and own.status == JobStatus.running
        and claim(session, job_id, worker, settings)
    ):
        return job_id
    for _ in range(10):  # another worker may take the first one between SELECT and UPDATE
        first = session.scalar(
            select(Job.id)
            .where(
                Job.status == JobStatus.queued,
                Job.cancel_requested.is_(False),
                Job.kind.in_(list(kinds)),
            )
            .order_by(Job.id)
            .limit(1)
        )
        if first is None:
            return None
        if claim(session, first, worker, settings):
            return first
    return None


def requeue_interrupted(job_id: int, worker: str, reason: str) -> bool:
    """Put a job this worker was running back in the queue at once, at its place (same row,
    same id); the run does not count as an attempt. The caller publishes a token."""
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.running or job.worker != worker:
            return False
        job.status, job.worker, job.eta_s = JobStatus.queued, None, None
        job.attempts = max(0, job.attempts - 1)
        job.error = f"{reason}; re-queued at {job.progress:.0%}"
        if job.kind == JobKind.train and job.model is not None:
            job.model.status = ModelStatus.pending
        session.commit()
    log.warning("job %s %s; re-queued", job_id, reason)
    return True


class JobContext:
    """What a running job uses to report progress and learn that it must stop.

    The time limit counts from the run's ``started_at`` in the database (set by the claim) and
    is checked by the heartbeat, as well as on this process's own clock: the row is the record
    of when the run began, and a test can age it to make the limit pass at a moment it chooses
    (a job known to be mid-training) instead of racing a short limit against the machine."""

    def __init__(self, job_id: int, worker: str, settings: Settings, time_limit_s: float) -> None:
        self.job_id, self.worker, self.settings = job_id, worker, settings
        self.deadline = time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self._progress: tuple[float, float | None] | None = None
        self._cancel = threading.Event()
        self._over_time = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobContext:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def report(self, fraction: float, eta_s: float | None = None) -> None:
        """Record progress (written by the heartbeat thread); raise if the job must stop."""
        with self._lock:
            self._progress = (min(max(fraction, 0.0), 1.0), eta_s)
        self.check()

    def stages(self, weights: dict[str, float]) -> StagedProgress:
        """Progress and ETA of a job made of weighted stages (``workers.progress``)."""
        return StagedProgress(weights, self.report)

    def check(self) -> None:
        if self._cancel.is_set():
            raise JobStopped("cancelled by request", cancelled=True)
        if SHUTTING_DOWN.is_set():
            raise JobStopped(INTERRUPTED, cancelled=False, interrupted=True)
        if self._over_time.is_set() or time.monotonic() > self.deadline:
            raise JobStopped(f"time limit of {self.time_limit_s:.0f} s exceeded", cancelled=False)

    def _flush(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
        values: dict[str, Any] = {"heartbeat_at": utc_now()}
        if progress is not None:
            values["progress"], values["eta_s"] = progress
        with get_sessionmaker()() as session:
            session.execute(
                update(Job).where(Job.id == self.job_id, Job.worker == self.worker).values(**values)
            )
            began = utc_now() - timedelta(seconds=self.time_limit_s)
            row = session.execute(
                select(Job.cancel_requested, Job.started_at < began).where(Job.id == self.job_id)
            ).first()
            if row is not None and row[0]:
                self._cancel.set()
            if row is not None and row[1]:
                self._over_time.set()
            session.commit()

    def _beat(self) -> None:
        interval = min(self.settings.heartbeat_s, 1.0)  # progress every second at most
        last_beat = 0.0
        while not self._done.wait(interval):
            if self._progress is None and time.monotonic() - last_beat < self.settings.heartbeat_s:
                continue
            try:
                self._flush()
                last_beat = time.monotonic()
            except Exception as exc:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)


def finish(
    job_id: int,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    on_model: Callable[[Any], None] | None = None,
) -> None:
    """Write the final state of a job (and let ``on_model`` update its model row)."""
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        job.status, job.finished_at, job.error = status, utc_now(), error
        if result is not None:
            job.result = result
        if status == JobStatus.succeeded:
            job.progress, job.eta_s = 1.0, 0.0
        if on_model is not None and job.model is not None:
            on_model(job.model)
        session.commit()


def _requeue_or_fail(job: Job, lost: str, settings: Settings, out: dict[str, list[int]]) -> None:
    if job.attempts < settings.max_attempts and not job.cancel_requested:
        job.status, job.worker, job.eta_s = JobStatus.queued, None, None
        job.error = f"{lost}; re-queued"
        out["requeued"].append(job.id)
    else:
        job.status, job.finished_at = JobStatus.failed, utc_now()
        job.error = f"{lost} after {job.attempts} attempt(s)"
        if job.kind == JobKind.train and job.model is not None:
            job.model.status = ModelStatus.failed
        out["failed"].append(job.id)


def _release(
    settings: Settings, requeue: Callable[[Job], None], where: Any, lost: Callable[[Job], str]
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"requeued": [], "failed": []}
    with get_sessionmaker()() as session:
        jobs = session.scalars(select(Job).where(Job.status == JobStatus.running, where)).all()
        for job in jobs:
            _requeue_or_fail(job, lost(job), settings, out)
        session.commit()
        for job in jobs:
            if job.id in out["requeued"]:
                requeue(job)
    return out


def reap(settings: Settings, requeue: Callable[[Job], None]) -> dict[str, list[int]]:
    """Re-queue (or fail, after ``max_attempts``) running jobs whose worker stopped beating."""
    wait = f"{settings.heartbeat_timeout_s:.0f} s"
    out = _release(
        settings, requeue, Job.heartbeat_at < _stale_before(settings),
        lambda job: f"worker {job.worker} stopped answering (no heartbeat for {wait})",
    )  # fmt: skip
    if any(out.values()):
        log.warning("reaper: %s", out)
    return out


def release_worker(
    settings: Settings, worker: str, requeue: Callable[[Job], None], why: str
) -> dict[str, list[int]]:
    """A worker process known to be gone (its supervisor saw it exit): its running jobs are
    re-queued now (counted as an attempt: it may have crashed) instead of after the heartbeat
    timeout."""
    out = _release(settings, requeue, Job.worker == worker, lambda _job: f"worker {worker} {why}")
    if any(out.values()):
        log.warning("released jobs of %s: %s", worker, out)
    return out
