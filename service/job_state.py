"""Every change of a job's state, in one place: claim, heartbeat, cancel, re-queue, finish, reap.

Several parties write a job row: the API (cancel), the worker running it, another worker whose
message was redelivered, and every worker's reaper. Each transition here is therefore one
UPDATE whose WHERE clause names the state it expects, so the party that lost a race changes
nothing (its UPDATE matches no row) instead of writing over the winner. A worker's hold on a job
is a :class:`Run`: the job, the worker's name and the attempt its claim started. The attempt
tells two runs by the same worker name apart (a job reaped and claimed again gets the next
attempt), so a run that lost its job, to the reaper or to another worker, writes nothing: its
heartbeat reports the loss (the job stops, see ``workers.lifecycle.JobContext``), its finish and
re-queue are no-ops that log it.

A train job's model row follows its job (pending, training, ready, failed, cancelled) in the same
transaction, and only when the job's own transition matched.

Torch-free and web-free: the API (cancel) and the workers both import it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

from sqlalchemy import ColumnElement, CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from ml.errors import Conflict, NotFound
from service.config import Settings
from service.db.models import Job, JobKind, JobStatus, Model, ModelStatus, utc_now
from service.db.session import get_sessionmaker
from service.rows import get_row

log = logging.getLogger(__name__)

TERMINAL = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)
# What a train job's model becomes when its job ends (other kinds' models are not theirs).
MODEL_WHEN = {
    JobStatus.succeeded: ModelStatus.ready,
    JobStatus.failed: ModelStatus.failed,
    JobStatus.cancelled: ModelStatus.cancelled,
}
# Libraries whose exception text may carry SQL, parameters or connection details.
_DATABASE_MODULES = ("sqlalchemy", "psycopg", "psycopg2", "sqlite3", "_sqlite3")


@dataclass(frozen=True)
class Run:
    """One run of a job: who claimed it, and which attempt that claim started."""

    job_id: int
    worker: str
    attempt: int


@dataclass(frozen=True)
class Beat:
    """What a heartbeat learnt: the run still owns its job, is asked to stop, is over time."""

    owned: bool
    cancel_requested: bool = False
    over_time: bool = False


CancelOutcome = Literal["cancelled", "requested", "finished", "missing"]
RequeueOutcome = Literal["requeued", "cancelled", "lost"]


def _owned(run: Run) -> tuple[ColumnElement[bool], ...]:
    """The WHERE clause of every write a run makes: the job is still running as this run."""
    return (
        Job.id == run.job_id,
        Job.status == JobStatus.running,
        Job.worker == run.worker,
        Job.attempts == run.attempt,
    )


def _update(session: Session, where: Sequence[ColumnElement[bool]], **values: Any) -> bool:
    """One conditional UPDATE of a job; whether it matched (then it is the only one that did)."""
    result = cast(
        "CursorResult[Any]",  # DML executes to a CursorResult; Session.execute is typed Result
        session.execute(
            update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
        ),
    )
    return result.rowcount == 1


def _set_model(session: Session, job_id: int, status: ModelStatus) -> None:
    """The model of a train job follows its job; call only after the job's UPDATE matched, in
    its transaction. Other kinds (an evaluation names its prototype model) leave it alone."""
    owner = (
        select(Job.model_id).where(Job.id == job_id, Job.kind == JobKind.train).scalar_subquery()
    )
    session.execute(
        update(Model)
        .where(Model.id == owner)
        .values(status=status)
        .execution_options(synchronize_session=False)
    )


def _stale_before(settings: Settings) -> Any:
    return utc_now() - timedelta(seconds=settings.heartbeat_timeout_s)


def claim(session: Session, job_id: int, worker: str, settings: Settings) -> Run | None:
    """Take a job: queued, or running with a dead worker (not past ``max_attempts``); never
    one whose cancel was asked for (a cancelled job of a dead worker is the reaper's)."""
    now = utc_now()
    claimable = and_(
        Job.cancel_requested.is_(False),
        or_(
            Job.status == JobStatus.queued,
            and_(
                Job.status == JobStatus.running,
                Job.heartbeat_at < _stale_before(settings),
                Job.attempts < settings.max_attempts,
            ),
        ),
    )
    taken = {
        "status": JobStatus.running,
        "worker": worker,
        "heartbeat_at": now,
        "attempts": Job.attempts + 1,
        "started_at": now,
        "error": None,
    }
    attempt = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(**taken)
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).scalar()
    if attempt is None:
        session.rollback()
        return None
    _set_model(session, job_id, ModelStatus.training)
    session.commit()
    return Run(job_id, worker, attempt)


def claim_next(
    session: Session, job_id: int, worker: str, settings: Settings, kinds: Sequence[str]
) -> Run | None:
    """Claim the job a message names if its worker died (a redelivered message), else the first
    queued job of ``kinds`` (the message's queue) in submission order; ``None``: nothing to
    do (the token's job was cancelled, or run from an earlier token)."""
    if session.scalar(select(Job.status).where(Job.id == job_id)) == JobStatus.running:
        run = claim(session, job_id, worker, settings)
        if run is not None:
            return run
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
        session.rollback()  # end the read: the claim is its own transaction
        if first is None:
            return None
        run = claim(session, first, worker, settings)
        if run is not None:
            return run
    return None


def heartbeat(
    run: Run, time_limit_s: float, progress: tuple[float, float | None] | None = None
) -> Beat:
    """Refresh the run's heartbeat (and progress) if it still owns its job; learn whether it
    must stop. The time limit counts from the claim's ``started_at`` in the database."""
    values: dict[str, Any] = {"heartbeat_at": utc_now()}
    if progress is not None:
        values["progress"], values["eta_s"] = progress
    began = utc_now() - timedelta(seconds=time_limit_s)
    with get_sessionmaker()() as session:
        row = session.execute(
            update(Job)
            .where(*_owned(run))
            .values(**values)
            .returning(Job.cancel_requested, Job.started_at < began)
            .execution_options(synchronize_session=False)
        ).first()
        session.commit()
    if row is None:
        log.warning("job %s: run %s lost ownership (reaped or cancelled)", run.job_id, run)
        return Beat(owned=False)
    return Beat(owned=True, cancel_requested=bool(row[0]), over_time=bool(row[1]))


def cancel(session: Session, job_id: int) -> CancelOutcome:
    """Cancel a queued job at once (with its model), or ask a running job's worker to stop.
    Each try is a conditional UPDATE: a job claimed, re-queued or finished meanwhile is seen in
    its new state and handled as such, never written back from a stale read."""
    for _ in range(10):  # each miss means the job moved on; it can only do so a few times
        cancelled = _update(
            session,
            (Job.id == job_id, Job.status == JobStatus.queued),
            status=JobStatus.cancelled,
            finished_at=utc_now(),
            cancel_requested=True,
            worker=None,
            eta_s=None,
        )
        if cancelled:
            _set_model(session, job_id, ModelStatus.cancelled)
            session.commit()
            return "cancelled"
        if _update(
            session, (Job.id == job_id, Job.status == JobStatus.running), cancel_requested=True
        ):
            session.commit()
            return "requested"
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        session.rollback()
        if status is None:
            return "missing"
        if status in TERMINAL:
            return "finished"
    raise RuntimeError(f"job {job_id} kept changing state while it was being cancelled")


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel the job (:func:`cancel`) and return it as it is now: :class:`NotFound` if there
    is no such job (or it vanished meanwhile), :class:`Conflict` if it had already finished."""
    job = get_row(session, Job, job_id)
    outcome = cancel(session, job_id)
    if outcome == "missing":
        raise NotFound(f"job {job_id} not found")
    session.refresh(job)  # the cancel wrote with UPDATEs: read back what the job is now
    if outcome == "finished":
        raise Conflict(f"job {job_id} already finished ({job.status})")
    return job


def requeue(
    run: Run, error: str, *, counts_as_attempt: bool, note_progress: bool = False
) -> RequeueOutcome:
    """Put the run's job back in the queue at its place (same row, same id); a cancel asked
    meanwhile ends it cancelled instead (a queued job with a cancel request is never claimed).
    ``counts_as_attempt=False``: an interrupted run (worker shutting down) is not held against
    the job. The caller publishes a token when the job was re-queued."""
    with get_sessionmaker()() as session:
        if note_progress:
            progress = session.scalar(select(Job.progress).where(*_owned(run)))
            error = f"{error}; re-queued at {progress or 0.0:.0%}"
        values: dict[str, Any] = {
            "status": JobStatus.queued,
            "worker": None,
            "eta_s": None,
            "error": error,
        }
        if not counts_as_attempt:
            values["attempts"] = Job.attempts - 1
        outcome: RequeueOutcome = "lost"
        if _update(session, (*_owned(run), Job.cancel_requested.is_(False)), **values):
            outcome = "requeued"
            _set_model(session, run.job_id, ModelStatus.pending)
        elif _update(
            session,
            (*_owned(run), Job.cancel_requested.is_(True)),
            status=JobStatus.cancelled,
            finished_at=utc_now(),
            eta_s=None,
        ):
            outcome = "cancelled"
            _set_model(session, run.job_id, ModelStatus.cancelled)
        session.commit()
    if outcome == "lost":
        log.warning(
            "job %s: run %s lost ownership; re-queue (%s) not written", run.job_id, run, error
        )
    else:
        log.warning("job %s %s (%s)", run.job_id, outcome, error)
    return outcome


def finish(
    run: Run,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """Write how the run ended (a train job's model follows); ``False``, writing nothing, when
    the run no longer owns its job (reaped and claimed by another run, or gone)."""
    values: dict[str, Any] = {"status": status, "finished_at": utc_now(), "error": error}
    if result is not None:
        values["result"] = result
    if status == JobStatus.succeeded:
        values["progress"], values["eta_s"] = 1.0, 0.0
    with get_sessionmaker()() as session:
        owned = _update(session, _owned(run), **values)
        if owned:
            _set_model(session, run.job_id, MODEL_WHEN[status])
        session.commit()
    if not owned:
        log.warning("job %s: run %s lost ownership; %s not written", run.job_id, run, status)
    return owned


class NotOwned(Exception):
    """The run no longer owns its job: what it meant to write was not written."""


@contextmanager
def owned_session(run: Run) -> Iterator[Session]:
    """A transaction for a run's own rows (a trained model's files and metrics) that commits
    only while the run owns its job: it first touches the job under the run's WHERE clause,
    which on PostgreSQL also locks the row until the commit, so no reap or claim comes between
    (SQLite serialises writers). Raises :class:`NotOwned`, writing nothing, once it lost it."""
    with get_sessionmaker()() as session:
        if not _update(session, _owned(run), heartbeat_at=utc_now()):
            session.rollback()
            raise NotOwned(f"job {run.job_id}: run {run} lost ownership")
        yield session
        session.commit()


def job_error(exc: BaseException, stage: str) -> str:
    """The error a job shows API readers for an unexpected exception. Database errors carry SQL,
    parameters and driver text: readers get a short message, the worker's log the traceback."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.split(".")[0] in _DATABASE_MODULES:
            return f"database error in {stage} (see the worker log)"
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__}: {exc}"[:4000]


Released = dict[str, list[int]]


def _released(
    why: str, attempts: int, cancel_asked: bool, settings: Settings
) -> tuple[str, ModelStatus, dict[str, Any]]:
    """What a run that lost its worker becomes: cancelled (asked for), re-queued (attempts
    left) or failed; its key in the reaper's report, its model's status, the job's values."""
    if cancel_asked:
        ended = {"status": JobStatus.cancelled, "finished_at": utc_now()}
        return "cancelled", ModelStatus.cancelled, {**ended, "error": f"{why}; cancelled"}
    if attempts < settings.max_attempts:
        again = {"status": JobStatus.queued, "worker": None, "eta_s": None}
        return "requeued", ModelStatus.pending, {**again, "error": f"{why}; re-queued"}
    ended = {"status": JobStatus.failed, "finished_at": utc_now()}
    return "failed", ModelStatus.failed, {**ended, "error": f"{why} after {attempts} attempt(s)"}


def _release(
    settings: Settings,
    requeue_job: Callable[[Job], None],
    where: ColumnElement[bool],
    lost: Callable[[str | None], str],
) -> Released:
    """Runs matching ``where`` lose their job: cancelled if a cancel was asked, else re-queued
    (attempts left) or failed. Each write names the run it read and ``where`` again, so a run
    that proved alive meanwhile (a late heartbeat) or moved on keeps its job."""
    out: Released = {"requeued": [], "failed": [], "cancelled": []}
    with get_sessionmaker()() as session:
        found = session.execute(
            select(Job.id, Job.worker, Job.attempts, Job.cancel_requested).where(
                Job.status == JobStatus.running, where
            )
        ).all()
        for job_id, worker, attempts, cancel_asked in found:
            run, why = Run(job_id, worker or "", attempts), lost(worker)
            same = (*_owned(run), where, Job.cancel_requested.is_(cancel_asked))
            key, model, values = _released(why, attempts, cancel_asked, settings)
            done = _update(session, same, **values)
            if done:
                _set_model(session, job_id, model)
                out[key].append(job_id)
        session.commit()
        for job_id in out["requeued"]:
            job = session.get(Job, job_id)
            if job is not None:
                requeue_job(job)
    return out


def reap(settings: Settings, requeue_job: Callable[[Job], None]) -> Released:
    """Release running jobs whose worker stopped beating (see :func:`_release`)."""
    wait = f"{settings.heartbeat_timeout_s:.0f} s"
    out = _release(
        settings,
        requeue_job,
        Job.heartbeat_at < _stale_before(settings),
        lambda worker: f"worker {worker} stopped answering (no heartbeat for {wait})",
    )
    if any(out.values()):
        log.warning("reaper: %s", out)
    return out


def release_worker(
    settings: Settings, worker: str, requeue_job: Callable[[Job], None], why: str
) -> Released:
    """A worker process known to be gone (its supervisor saw it exit): its running jobs are
    released now (a re-run counts as an attempt: it may have crashed) instead of after the
    heartbeat timeout."""
    out = _release(settings, requeue_job, Job.worker == worker, lambda _w: f"worker {worker} {why}")
    if any(out.values()):
        log.warning("released jobs of %s: %s", worker, out)
    return out
