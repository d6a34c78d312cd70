"""Celery tasks, one per job kind of the registry (``service.job_kinds``): claim the job, run it
with a heartbeat, record how it ended (every write through ``service.job_state``).

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

from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down
from sqlalchemy import select

from ml.runtime import configure_threads
from service.config import Settings, get_settings
from service.db.models import Job, JobKind, JobStatus
from service.db.session import get_engine, get_sessionmaker
from service.job_kinds import KINDS, KindSpec, queue_kinds, spec_for
from service.job_state import (
    Run,
    claim,
    claim_next,
    finish,
    job_error,
    reap,
    requeue,
)
from service.payloads import ReviewSyncPayload
from service.queue import enqueue
from service.storage import Storage, get_storage
from workers.celery_app import app
from workers.lifecycle import SHUTTING_DOWN, JobContext, JobStopped, requeue_interrupted

log = logging.getLogger(__name__)
_stop_reaper = threading.Event()
_consumer: list[Any] = []  # the worker's consumer (set when ready): its pool's processes
SHUTDOWN_SIGNAL = signal.SIGUSR2  # main process -> prefork children: "stop and re-queue"
# What a task returns: the job's final status, or what became of the token.
Outcome = str
Recover = Callable[[Run, Exception], Outcome | None]


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


def _hand_back(job_id: int) -> Outcome:
    """A task received while the worker shuts down: claim nothing and publish the token again,
    so the job waits, queued and at its place, for the next worker."""
    _publish(job_id)
    log.info("worker shutting down: job %s left queued", job_id)
    return "deferred"


def _ended(run: Run, status: JobStatus, **kw: Any) -> Outcome:
    """Write the run's end; a run that lost its job (reaped, re-run elsewhere) writes nothing."""
    return str(status) if finish(run, status, **kw) else "lost"


def _execute(run: Run, kind: str, settings: Settings, recover: Recover | None = None) -> Outcome:
    """Run a claimed job with its heartbeat to its end and record how it ended: every write
    goes through ``service.job_state``, so nothing is written once the run lost the job.
    ``recover``: a task's own handling of some exceptions (``None``: not one of them)."""
    try:
        spec = spec_for(kind)
    except ValueError as exc:  # a retired or unknown kind: the job fails, nothing else runs
        return _ended(run, JobStatus.failed, error=str(exc))
    limit = settings.train_time_limit_s if spec.long else settings.sample_time_limit_s
    try:
        with JobContext(run, settings, limit) as ctx:
            result = spec.load_runner()(run.job_id, ctx, settings, get_storage())
    except JobStopped as exc:
        if exc.lost:
            log.warning("job %s: %s; this run stops without writing", run.job_id, exc)
            return "lost"
        if exc.interrupted:
            if requeue_interrupted(run, str(exc)):
                _publish(run.job_id)
            return "requeued"
        if exc.cancelled:
            return _ended(run, JobStatus.cancelled)
        return _ended(run, JobStatus.failed, error=str(exc))
    except Exception as exc:
        outcome = recover(run, exc) if recover is not None else None
        if outcome is not None:
            return outcome
        log.exception("job %s (%s) failed", run.job_id, kind)
        return _ended(run, JobStatus.failed, error=job_error(exc, f"the {kind} job"))
    return _ended(run, JobStatus.succeeded, result=result)


def run_job(job_id: int, kind: str, worker: str) -> Outcome:
    """Run the first queued job of ``kind``'s queue (see ``claim_next``) to its end; returns
    the final status (or ``skipped``/``deferred``/``requeued``/``lost``)."""
    if SHUTTING_DOWN.is_set():
        return _hand_back(job_id)
    settings = get_settings()
    with get_sessionmaker()() as session:
        run = claim_next(session, job_id, worker, settings, queue_kinds(kind))
        if run is None:
            log.info("no claimable job for the token of job %s (done, cancelled, running)", job_id)
            return "skipped"
        claimed_kind = session.scalar(select(Job.kind).where(Job.id == run.job_id))
    if claimed_kind is None:
        raise RuntimeError(f"job {run.job_id} was deleted right after it was claimed")
    return _execute(run, str(claimed_kind), settings)


def run_review_sync(
    job_id: int, _ctx: JobContext, settings: Settings, _storage: Storage
) -> dict[str, Any]:
    """The review sync's runner: push tasks to Label Studio and pull verdicts."""
    from workers.review_sync import sync_project

    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"review sync job {job_id} was deleted while it ran")
        project_id = ReviewSyncPayload.model_validate(job.params).project_id
    return sync_project(project_id, settings)


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or 'worker'}:{os.getpid()}"


def _queued_job_task(task: Task, job_id: int, spec: KindSpec) -> Outcome:
    return run_job(job_id, spec.kind, _worker_name(task))


def _review_sync_task(task: Task, job_id: int, spec: KindSpec) -> Outcome:
    """Push tasks to Label Studio and pull verdicts. It runs the job its message names (not the
    queue's first: a retry waits its delay). Label Studio down: the job goes back to ``queued``
    with the reason and is retried later (nothing is lost: tasks are in the database and every
    step is idempotent), up to ``review_sync_attempts`` times; a cancel asked meanwhile ends it
    cancelled instead."""
    from service.label_studio import LabelStudioUnavailable

    if SHUTTING_DOWN.is_set():
        return _hand_back(job_id)
    settings = get_settings()
    with get_sessionmaker()() as session:
        run = claim(session, job_id, _worker_name(task), settings)
    if run is None:
        return "skipped"

    def retry_later(run: Run, exc: Exception) -> Outcome | None:
        if not isinstance(exc, LabelStudioUnavailable):
            return None
        if run.attempt >= settings.review_sync_attempts:
            return _ended(run, JobStatus.failed, error=f"Label Studio unavailable: {exc}")
        wait = settings.review_sync_retry_s
        error = f"Label Studio unavailable ({exc}); attempt {run.attempt}, retry in {wait:g} s"
        outcome = requeue(run, error, counts_as_attempt=True)
        if outcome != "requeued":
            return outcome
        task.apply_async((job_id,), countdown=wait, queue=spec.queue)
        return "retrying"

    return _execute(run, spec.kind, settings, recover=retry_later)


def _register(spec: KindSpec) -> Task:
    body = _review_sync_task if spec.kind == JobKind.review_sync else _queued_job_task

    def task(self: Task, job_id: int) -> Outcome:
        return body(self, job_id, spec)

    task.__name__ = task.__qualname__ = str(spec.kind)
    registered: Task = app.task(name=spec.task, bind=True)(task)
    return registered


# One Celery task per registered job kind, by the registry's task name.
CELERY_TASKS: dict[str, Task] = {str(kind): _register(spec) for kind, spec in KINDS.items()}


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


@worker_process_init.connect
def _threads(**_: Any) -> None:
    """The process that runs the jobs (the solo pool's worker, or each prefork child; never the
    prefork parent, which must not start torch before it forks) gets the thread count
    :func:`ml.runtime.choose_threads` picks: the ``threads`` setting, else ``OMP_NUM_THREADS``,
    else the usable cores less the machine's load. Logged at INFO."""
    configure_threads(get_settings().threads, say=log.info)


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
