"""Celery tasks: claim the job, run it with a heartbeat, record how it ended.

Every worker also runs the reaper (at start and then periodically), so a job whose worker died
is re-queued or failed even when no beat scheduler is deployed.

Shutdown: Celery's blocking loop (solo pool, SQLite broker) still fetches one more message after
a warm shutdown was requested. A task that starts while :data:`SHUTTING_DOWN` is set therefore
claims nothing and hands its token back; a job running when the signal comes stops at its next
progress report and is re-queued at once, at its place (``workers.lifecycle``). With the
prefork pool (``protomed worker``, compose) the job runs in a child process that Celery does not
tell: the main process passes the shutdown on to its children with SIGUSR2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from service.config import get_settings
from service.db.models import Job, JobKind, JobStatus, ModelStatus
from service.db.session import get_engine, get_sessionmaker
from service.payloads import ReviewSyncPayload
from service.queue import TASKS, enqueue
from service.storage import get_storage
from workers.celery_app import app
from workers.lifecycle import (
    SHUTTING_DOWN,
    JobContext,
    JobStopped,
    claim,
    claim_next,
    finish,
    reap,
    requeue_interrupted,
)

log = logging.getLogger(__name__)
_stop_reaper = threading.Event()
_consumer: list[Any] = []  # the worker's consumer (set when ready): its pool's processes
SHUTDOWN_SIGNAL = signal.SIGUSR2  # main process -> prefork children: "stop and re-queue"


def _runner(kind: str) -> Callable[..., dict[str, Any]]:
    if kind == JobKind.train:
        from workers.training import run_training

        return run_training
    if kind == JobKind.evaluate:
        from workers.evaluation import run_evaluation

        return run_evaluation
    if kind == JobKind.sample:
        from workers.sampling import run_sampling

        return run_sampling
    if kind == JobKind.audit:
        from workers.audit import run_audit

        return run_audit
    if kind == JobKind.score:
        from workers.scoring import run_scoring

        return run_scoring
    raise ValueError(f"no runner for job kind {kind!r}: the job fails instead of sampling")


def _queue_kinds(kind: str) -> list[str]:
    """The job kinds that share ``kind``'s queue: a token of that queue may run any of them."""
    queue = TASKS[str(kind)][1]
    return [k for k, (_name, q) in TASKS.items() if q == queue]


def _publish(job_id: int) -> None:
    """One more token for a queued job. If the broker refuses, the job still waits, queued, at
    its place: the next token of its queue (any job's) runs it first."""
    try:
        with get_sessionmaker()() as session:
            job = session.get(Job, job_id)
            if job is not None:
                enqueue(job)
    except Exception as exc:
        log.warning("could not publish a token for job %s: %s", job_id, exc)


def _hand_back(job_id: int) -> str:
    """A task received while the worker shuts down: claim nothing and publish the token again,
    so the job waits, queued and at its place, for the next worker."""
    _publish(job_id)
    log.info("worker shutting down: job %s left queued", job_id)
    return "deferred"


def run_job(job_id: int, kind: str, worker: str) -> str:
    """Run the first queued job of ``kind``'s queue (see ``claim_next``) to its end; returns
    the final status (or ``skipped``/``deferred``/``requeued``)."""
    if SHUTTING_DOWN.is_set():
        return _hand_back(job_id)
    settings, storage = get_settings(), get_storage()
    with get_sessionmaker()() as session:
        claimed = claim_next(session, job_id, worker, settings, _queue_kinds(kind))
        if claimed is None:
            log.info("no claimable job for the token of job %s (done, cancelled, running)", job_id)
            return "skipped"
        job = session.get(Job, claimed)
        if job is None:
            raise RuntimeError(f"job {claimed} was deleted right after it was claimed")
        kind = str(job.kind)
    job_id = claimed
    long_job = kind in (JobKind.train, JobKind.evaluate)
    limit = settings.train_time_limit_s if long_job else settings.sample_time_limit_s
    is_train = kind == JobKind.train

    def model_status(status: ModelStatus) -> Callable[[Any], None] | None:
        return (lambda m: setattr(m, "status", status)) if is_train else None

    try:
        with JobContext(job_id, worker, settings, limit) as ctx:
            result = _runner(kind)(job_id, ctx, settings, storage)
    except JobStopped as exc:
        if exc.interrupted:
            if requeue_interrupted(job_id, worker, str(exc)):
                _publish(job_id)
            return "requeued"
        status = JobStatus.cancelled if exc.cancelled else JobStatus.failed
        model = ModelStatus.cancelled if exc.cancelled else ModelStatus.failed
        finish(
            job_id, status, error=None if exc.cancelled else str(exc), on_model=model_status(model)
        )
        return str(status)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        error = f"{type(exc).__name__}: {exc}"[:4000]
        finish(job_id, JobStatus.failed, error=error, on_model=model_status(ModelStatus.failed))
        return str(JobStatus.failed)
    finish(job_id, JobStatus.succeeded, result=result)
    return str(JobStatus.succeeded)


def _worker_name(task: Any) -> str:
    return f"{task.request.hostname or 'worker'}:{os.getpid()}"


@app.task(name=TASKS["train"][0], bind=True)
def train(self: Any, job_id: int) -> str:
    return run_job(job_id, JobKind.train, _worker_name(self))


@app.task(name=TASKS["sample"][0], bind=True)
def sample(self: Any, job_id: int) -> str:
    return run_job(job_id, JobKind.sample, _worker_name(self))


@app.task(name=TASKS["evaluate"][0], bind=True)
def evaluate(self: Any, job_id: int) -> str:
    return run_job(job_id, JobKind.evaluate, _worker_name(self))


@app.task(name=TASKS["audit"][0], bind=True)
def audit(self: Any, job_id: int) -> str:
    return run_job(job_id, JobKind.audit, _worker_name(self))


@app.task(name=TASKS["score"][0], bind=True)
def score(self: Any, job_id: int) -> str:
    return run_job(job_id, JobKind.score, _worker_name(self))


@app.task(name=TASKS["review_sync"][0], bind=True)
def review_sync(self: Any, job_id: int) -> str:
    """Push tasks to Label Studio and pull verdicts. Label Studio down: the job goes back to
    ``queued`` with the reason and is retried later (nothing is lost: tasks are in the
    database and every step is idempotent), up to ``review_sync_attempts`` times."""
    from service.label_studio import LabelStudioUnavailable
    from workers.review_sync import sync_project

    if SHUTTING_DOWN.is_set():
        return _hand_back(job_id)
    settings = get_settings()
    with get_sessionmaker()() as session:
        if not claim(session, job_id, _worker_name(self), settings):
            return "skipped"
        job = session.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"review sync job {job_id} was deleted right after it was claimed")
        project_id = ReviewSyncPayload.model_validate(job.params).project_id
        attempts = job.attempts
    try:
        result = sync_project(project_id, settings)
    except LabelStudioUnavailable as exc:
        if attempts >= settings.review_sync_attempts:
            finish(job_id, JobStatus.failed, error=f"Label Studio unavailable: {exc}")
            return str(JobStatus.failed)
        wait = settings.review_sync_retry_s
        with get_sessionmaker()() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise RuntimeError(f"review sync job {job_id} was deleted while it ran") from exc
            job.status, job.worker = JobStatus.queued, None
            job.error = f"Label Studio unavailable ({exc}); attempt {attempts}, retry in {wait:g} s"
            session.commit()
        self.apply_async((job_id,), countdown=wait, queue=TASKS["review_sync"][1])
        return "retrying"
    except Exception as exc:
        log.exception("review sync %s failed", job_id)
        finish(job_id, JobStatus.failed, error=f"{type(exc).__name__}: {exc}"[:4000])
        return str(JobStatus.failed)
    finish(job_id, JobStatus.succeeded, result=result)
    return str(JobStatus.succeeded)


def _requeue(job: Job) -> None:
    enqueue(job)


def _periodic_loop() -> None:
    """The reaper, and the review pull that catches webhooks Label Studio never delivered."""
    settings = get_settings()
    interval = max(1.0, settings.heartbeat_timeout_s / 4)
    last_pull = 0.0
    while True:
        try:
            reap(settings, _requeue)
        except Exception as exc:  # keep reaping after a database or broker blip
            log.warning("reaper failed: %s", exc)
        if settings.label_studio_url and time.monotonic() - last_pull >= settings.review_pull_s:
            last_pull = time.monotonic()
            try:
                from workers.review_sync import pull_all

                pull_all(settings)
            except Exception as exc:
                log.warning("review pull failed: %s", exc)
        if _stop_reaper.wait(interval):
            return


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked pool process must not share its parent's database connections, and learns of
    its worker's shutdown from :data:`SHUTDOWN_SIGNAL`."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    signal.signal(SHUTDOWN_SIGNAL, lambda *_: SHUTTING_DOWN.set())


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    _consumer[:] = [sender]
    threading.Thread(target=_periodic_loop, name="periodic", daemon=True).start()


def _pool_pids() -> list[int]:
    """The prefork pool's child processes (none for the solo pool)."""
    pool = getattr(getattr(_consumer[0], "pool", None), "_pool", None) if _consumer else None
    return [p.pid for p in getattr(pool, "_pool", None) or [] if getattr(p, "pid", None)]


@worker_shutting_down.connect
def _stop(**_: Any) -> None:
    """Runs in the worker's signal handler: only set flags (the job sees them at its next
    progress report; the next task start sees them before claiming)."""
    SHUTTING_DOWN.set()
    _stop_reaper.set()
    for pid in _pool_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, SHUTDOWN_SIGNAL)
