"""Races between the parties that change a job's state: the API (cancel), the worker running it
(claim, heartbeat, finish, re-queue), another worker and the reaper. Each test interleaves two
sessions by hand on a real database (PostgreSQL and SQLite): one party's statement is made to
run between another's read and its write, through a hook on the engine that fires after a
chosen statement, so no test waits or depends on timing.

The rule under test (``service.job_state``): every transition is one UPDATE whose WHERE clause
names the state it expects, the run a worker holds included (its name and attempt), so the
party that lost a race writes nothing, and a worker that lost its job notices and stops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, fresh_postgres, make_service
from factories import add_dataset, add_model
from sqlalchemy import event, select, update

from service.config import get_settings
from service.db.models import Job, JobStatus, Model, ModelStatus, utc_now
from service.db.session import get_engine, get_sessionmaker

# ---- the parties, through the public functions of the job-state module ---------------------
from service.job_state import Run, finish, job_error, reap
from workers.lifecycle import JobContext, JobStopped


def _claim(job_id: int, worker: str) -> Run | None:
    from service.job_state import claim

    with get_sessionmaker()() as session:
        return claim(session, job_id, worker, get_settings())


def _claim_next(token: int, worker: str, kinds: list[str]) -> int | None:
    from service.job_state import claim_next

    with get_sessionmaker()() as session:
        run = claim_next(session, token, worker, get_settings(), kinds)
    return None if run is None else run.job_id


def _context(run: Run) -> JobContext:
    return JobContext(run, get_settings(), time_limit_s=3600)


def _beat(ctx: JobContext) -> None:
    ctx.beat()


def _finish(run: Run, status: JobStatus, **kw: Any) -> bool:
    return finish(run, status, **kw)


def _reap() -> dict[str, list[int]]:
    return reap(get_settings(), lambda _job: None)


def _review_sync_task() -> Any:
    from workers.tasks import CELERY_TASKS

    return CELERY_TASKS["review_sync"]


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def svc(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """The in-process API on SQLite or on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        with make_service(tmp_path, monkeypatch) as service:
            yield service
        return
    with (
        fresh_postgres() as url,
        make_service(tmp_path, monkeypatch, PROTOMED_DATABASE_URL=url) as service,
    ):
        yield service


def _add_job(kind: str = "train") -> int:
    """A queued job (a train job gets a pending model of a dataset with no files)."""
    with get_sessionmaker()() as session:
        model_id = None
        if kind == "train":
            model_id = add_model(session, add_dataset(session), status=ModelStatus.pending).id
        params = {"project_id": 1} if kind == "review_sync" else {}
        job = Job(kind=kind, params=params, model_id=model_id)
        session.add(job)
        session.commit()
        return job.id


def _row(job_id: int) -> Job:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _model_status(job_id: int) -> ModelStatus | None:
    with get_sessionmaker()() as session:
        return session.scalar(select(Model.status).join(Job).where(Job.id == job_id))


def _silence(job_id: int) -> None:
    """The job's worker stopped beating long ago (as if killed)."""
    old = utc_now() - timedelta(seconds=get_settings().heartbeat_timeout_s * 2)
    with get_sessionmaker()() as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))
        session.commit()


@contextmanager
def after_statement(starts: str, contains: str, action: Callable[[], None]) -> Iterator[list[str]]:
    """Run ``action`` (another party's move, on its own connection) right after the first
    statement beginning with ``starts`` and holding ``contains`` has executed: a hand-made
    interleaving at a chosen point, deterministic on any machine."""
    fired: list[str] = []

    def hook(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        if fired or not words or words[0].upper() != starts:
            return
        if contains not in statement.replace('"', ""):
            return
        fired.append(statement)
        action()

    engine = get_engine()
    event.listen(engine, "after_cursor_execute", hook)
    try:
        yield fired
    finally:
        event.remove(engine, "after_cursor_execute", hook)


def _cancel(svc: Service, job_id: int) -> dict[str, Any]:
    r = svc.client.post(f"/jobs/{job_id}/cancel", headers=svc.admin)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the races ----------------------------------------------------------------------------------


def test_claim_between_the_cancels_read_and_write(svc: Service) -> None:
    """The API read the job queued, a worker claimed it, then the cancel wrote: the cancel must
    become a request to the running worker (not a cancelled row under a running worker), and
    the worker stops at its next heartbeat and ends the job and its model cancelled."""
    job_id = _add_job("train")
    runs: list[Run | None] = []
    with after_statement("SELECT", "jobs", lambda: runs.append(_claim(job_id, "w:1"))) as fired:
        body = _cancel(svc, job_id)
    assert fired and runs and runs[0] is not None
    assert (body["status"], body["cancel_requested"]) == ("running", True), body
    row = _row(job_id)
    assert (row.status, row.worker, row.finished_at) == (JobStatus.running, "w:1", None)
    assert _model_status(job_id) != ModelStatus.cancelled
    ctx = _context(runs[0])
    _beat(ctx)
    with pytest.raises(JobStopped) as stopped:
        ctx.check()
    assert stopped.value.cancelled
    assert _finish(runs[0], JobStatus.cancelled) is not False
    assert _row(job_id).status == JobStatus.cancelled
    assert _model_status(job_id) == ModelStatus.cancelled


def test_cancel_between_a_claims_pick_and_its_update(svc: Service) -> None:
    """A worker picked the first queued job, the API cancelled it, then the worker's claim ran:
    the claim must not take the cancelled job (it takes the next one)."""
    first, second = _add_job("sample"), _add_job("sample")
    with after_statement("SELECT", "ORDER BY jobs.id", lambda: _cancel(svc, first)) as fired:
        got = _claim_next(second, "w:1", ["sample"])
    assert fired
    assert got == second
    assert _row(first).status == JobStatus.cancelled


def test_cancelled_job_of_a_dead_worker_is_not_run_again(svc: Service) -> None:
    """Cancel asked of a running job whose worker then died: a redelivered message must not run
    it again, and the reaper ends it cancelled (what the user asked), with its model."""
    job_id = _add_job("train")
    assert _claim(job_id, "w:1") is not None
    assert _cancel(svc, job_id)["cancel_requested"] is True
    _silence(job_id)
    assert _claim(job_id, "w:2") is None
    _reap()
    row = _row(job_id)
    assert row.status == JobStatus.cancelled, (row.status, row.error)
    assert _model_status(job_id) == ModelStatus.cancelled


@pytest.mark.parametrize("second_worker", ["w:1", "w:2"])
def test_heartbeat_after_reap_and_reclaim(svc: Service, second_worker: str) -> None:
    """The worker's job was reaped (its heartbeat looked dead) and claimed again, by another
    worker or by the same worker name: the old run's heartbeat writes nothing and the run stops
    with "lost ownership" at its next check."""
    job_id = _add_job("sample")
    old = _claim(job_id, "w:1")
    assert old is not None
    ctx = _context(old)
    _silence(job_id)
    assert job_id in _reap()["requeued"]
    assert _claim(job_id, second_worker) is not None
    before = _row(job_id)
    ctx.report(0.5)
    _beat(ctx)
    with pytest.raises(JobStopped, match="lost ownership"):
        ctx.check()
    after = _row(job_id)
    assert (after.progress, after.heartbeat_at) == (before.progress, before.heartbeat_at)
    assert (after.worker, after.attempts) == (second_worker, 2)


def test_finish_after_losing_the_job(svc: Service) -> None:
    """A worker finishing a job that was reaped and re-run by another writes nothing: neither
    the job nor its model (the new run owns both)."""
    job_id = _add_job("train")
    old = _claim(job_id, "w:1")
    assert old is not None
    _silence(job_id)
    _reap()
    assert _claim(job_id, "w:2") is not None
    assert not _finish(old, JobStatus.succeeded, result={"from": "the lost run"})
    assert not _finish(old, JobStatus.failed, error="the lost run failed")
    row = _row(job_id)
    assert (row.status, row.worker, row.result, row.error) == (JobStatus.running, "w:2", None, None)
    assert _model_status(job_id) == ModelStatus.training  # the new run's, not ready or failed


def test_a_lost_run_writes_nothing_besides_its_job(svc: Service) -> None:
    """What a job writes besides its own row (a trained model's files and metrics) goes through
    ``JobContext.owned_session``: committed while the run owns the job, refused once it lost it
    (reaped and re-run), and the run stops."""
    job_id = _add_job("train")
    old = _claim(job_id, "w:1")
    assert old is not None
    ctx = _context(old)
    with ctx.owned_session() as session:
        session.execute(update(Model).values(metrics={"run": 1}))
    _silence(job_id)
    _reap()
    assert _claim(job_id, "w:2") is not None
    with pytest.raises(JobStopped, match="lost ownership"), ctx.owned_session() as session:
        session.execute(update(Model).values(metrics={"run": "lost"}))
    with get_sessionmaker()() as session:
        assert session.scalar(select(Model.metrics)) == {"run": 1}
    with pytest.raises(JobStopped, match="lost ownership"):
        ctx.check()


def test_review_sync_requeue_after_cancel(svc: Service, monkeypatch) -> None:
    """Label Studio was down while the user cancelled the running review sync: the sync's
    re-queue must not put a cancelled job back in the queue (it would wait there forever, as a
    queued job with a cancel request is never claimed): it ends cancelled."""
    import workers.review_sync
    from service.label_studio import LabelStudioUnavailable

    job_id = _add_job("review_sync")

    def cancelled_while_down(*_: Any, **__: Any) -> dict[str, Any]:
        _cancel(svc, job_id)
        raise LabelStudioUnavailable("connection refused")

    monkeypatch.setattr(workers.review_sync, "sync_project", cancelled_while_down)
    _review_sync_task()(job_id)
    row = _row(job_id)
    assert row.status == JobStatus.cancelled, (row.status, row.error, row.cancel_requested)


def test_late_heartbeat_between_the_reapers_read_and_write(svc: Service) -> None:
    """The reaper read the job as silent, then the worker's heartbeat came in, then the reaper
    wrote: the live worker keeps its job (nothing re-queued), and its heartbeats still count."""
    job_id = _add_job("sample")
    run = _claim(job_id, "w:1")
    assert run is not None
    ctx = _context(run)
    _silence(job_id)
    with after_statement("SELECT", "jobs", lambda: _beat(ctx)) as fired:
        out = _reap()
    assert fired
    assert out == {"requeued": [], "failed": []} or job_id not in out["requeued"], out
    row = _row(job_id)
    assert (row.status, row.worker, row.attempts) == (JobStatus.running, "w:1", 1)
    ctx.check()  # still its job
    assert _finish(run, JobStatus.succeeded, result={}) is not False
    assert _row(job_id).status == JobStatus.succeeded


# ---- errors a job shows its readers ------------------------------------------------------------


def test_database_errors_never_reach_the_job_error(svc: Service) -> None:
    """A real SQLAlchemy error (SQL and driver text inside) becomes a short message naming the
    stage; the SQL stays in the worker log."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    with get_sessionmaker()() as session, pytest.raises(SQLAlchemyError) as caught:
        session.execute(text("SELECT secret_column FROM no_such_table"))
    message = job_error(caught.value, "train")
    assert message == "database error in train (see the worker log)"
    assert "no_such_table" not in message and "SELECT" not in message
    assert job_error(ValueError("bad value"), "train") == "ValueError: bad value"
