"""A job's life in the database: claim, heartbeat, progress, cancel, finish, and the reaper.

The database is the source of truth, not the broker. A worker *claims* a job with one conditional
UPDATE (queued, or running with a stale heartbeat), so redelivered or duplicated messages never
run a job twice. While it runs, a heartbeat thread refreshes ``heartbeat_at`` and picks up cancel
requests. If a worker dies (SIGKILL, lost machine) its heartbeat stops; :func:`reap` re-queues the
job (up to ``max_attempts`` runs) or marks it failed, so nothing stays ``running`` forever.
Torch-free: the API and light workers import it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.db.models import Job, JobKind, JobStatus, ModelStatus, utc_now
from api.db.session import get_sessionmaker

log = logging.getLogger(__name__)


class JobStopped(Exception):
    """Raised inside a job when it must stop: cancelled by a user or over its time limit."""

    def __init__(self, reason: str, *, cancelled: bool) -> None:
        super().__init__(reason)
        self.cancelled = cancelled


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
    result = session.execute(
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
    )
    session.commit()
    return result.rowcount == 1


class JobContext:
    """What a running job uses to report progress and learn that it must stop."""

    def __init__(self, job_id: int, worker: str, settings: Settings, time_limit_s: float) -> None:
        self.job_id, self.worker, self.settings = job_id, worker, settings
        self.deadline = time.monotonic() + time_limit_s
        self.time_limit_s = time_limit_s
        self._progress: tuple[float, float | None] | None = None
        self._cancel = threading.Event()
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

    def check(self) -> None:
        if self._cancel.is_set():
            raise JobStopped("cancelled by request", cancelled=True)
        if time.monotonic() > self.deadline:
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
            if session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self._cancel.set()
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


def reap(settings: Settings, requeue: Callable[[Job], None]) -> dict[str, list[int]]:
    """Re-queue (or fail, after ``max_attempts``) running jobs whose worker stopped beating."""
    out: dict[str, list[int]] = {"requeued": [], "failed": []}
    with get_sessionmaker()() as session:
        stale = session.scalars(
            select(Job).where(
                Job.status == JobStatus.running, Job.heartbeat_at < _stale_before(settings)
            )
        ).all()
        for job in stale:
            lost = f"worker {job.worker} stopped answering (no heartbeat for "
            lost += f"{settings.heartbeat_timeout_s:.0f} s)"
            if job.attempts < settings.max_attempts and not job.cancel_requested:
                job.status, job.worker, job.error = JobStatus.queued, None, f"{lost}; re-queued"
                out["requeued"].append(job.id)
            else:
                job.status, job.finished_at = JobStatus.failed, utc_now()
                job.error = f"{lost} after {job.attempts} attempt(s)"
                if job.kind == JobKind.train and job.model is not None:
                    job.model.status = ModelStatus.failed
                out["failed"].append(job.id)
        session.commit()
        for job in stale:
            if job.id in out["requeued"]:
                requeue(job)
    if any(out.values()):
        log.warning("reaper: %s", out)
    return out
