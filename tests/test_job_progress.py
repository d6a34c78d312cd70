"""A job's life inside the worker, in-process on the embedded stack (SQLite database and
broker): a worker that is shutting down takes no job, jobs run in submission order whatever
order their messages arrive in, and progress moves through every stage with an ETA that is the
measured rate extrapolated. No test here depends on the machine's speed: real runs are checked
on the values reported, not on durations, and the ETA arithmetic on an injected clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from celery.signals import worker_shutting_down
from conftest import Service

from ml.data.toy import write_toy_dataset
from service import job_state
from workers import lifecycle
from workers.progress import StagedProgress


@pytest.fixture
def shutdown_flags() -> Iterator[None]:
    """Celery's shutdown signal sets process-wide flags: clear them for the next tests."""
    from workers import tasks

    yield
    lifecycle.SHUTTING_DOWN.clear()
    tasks._stop_reaper.clear()


def _toy_jobs(svc: Service, count: int, **overrides: object) -> list[int]:
    write_toy_dataset(svc.data_root / "toy", n_per_class=8, size=32, seed=0)
    r = svc.client.post("/datasets", json={"name": "toy", "path": "toy"}, headers=svc.admin)
    assert r.status_code == 201, r.text
    body = {
        "dataset_id": r.json()["id"],
        "mode": "baseline",
        "preset": "cpu-small",
        "n_per_class": 8,
        "n_heldout": 0,
        "overrides": {"max_steps": 3, "batch_size": 4, **overrides},
    }
    ids = []
    for _ in range(count):
        r = svc.client.post("/jobs/train", json=body, headers=svc.admin)
        assert r.status_code == 202, r.text
        ids.append(r.json()["jobs"][0]["id"])
    return ids


def _messages(svc: Service) -> int:
    with sqlite3.connect(svc.tmp / "broker.db") as db:
        return db.execute("SELECT count(*) FROM kombu_message").fetchone()[0]


def _job(svc: Service, job_id: int) -> dict:
    return svc.client.get(f"/jobs/{job_id}", headers=svc.admin).json()


def test_worker_shutting_down_takes_no_new_job(service: Service, shutdown_flags: None) -> None:
    """Celery still hands a solo worker one more message after a warm shutdown began; the
    task must leave its job queued (no attempt used) and put the token back for the next
    worker."""
    from workers.tasks import run_job

    (job_id,) = _toy_jobs(service, 1)
    before = _messages(service)
    worker_shutting_down.send(sender="test@host", sig="SIGTERM", how="Warm", exitcode=0)
    assert run_job(job_id, "train", "test@host:1") == "deferred"
    job = _job(service, job_id)
    assert (job["status"], job["attempts"], job["started_at"]) == ("queued", 0, None), job
    assert _messages(service) == before + 1  # a token for the next worker


def test_interrupted_job_is_requeued_at_its_place(service: Service) -> None:
    """Whatever message a worker receives, it runs the first queued job: an interrupted job,
    re-queued (same row), runs before the jobs submitted after it."""
    from service.config import get_settings
    from service.db.session import get_sessionmaker

    first, second, third = _toy_jobs(service, 3)
    settings = get_settings()

    def claim_next(worker: str) -> int | None:
        with get_sessionmaker()() as session:
            run = job_state.claim_next(session, third, worker, settings, ["train"])
        return None if run is None else run.job_id

    with get_sessionmaker()() as session:
        run = job_state.claim_next(session, third, "w:1", settings, ["train"])
    assert run is not None and run.job_id == first
    assert lifecycle.requeue_interrupted(run, lifecycle.INTERRUPTED)
    job = _job(service, first)
    assert (job["status"], job["attempts"]) == ("queued", 0) and "interrupted" in job["error"]
    assert claim_next("w:2") == first  # the token of the last job still runs the first
    assert claim_next("w:2") == second


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, float, float | None]]:
    """Every stage update of real runs: (stage, stage fraction, job fraction, ETA)."""
    seen: list[tuple[str, float, float, float | None]] = []
    update = StagedProgress.update

    def recording(self: StagedProgress, stage: str, done: float, total: float) -> None:
        update(self, stage, done, total)
        seen.append((stage, done / total if total else 1.0, self.fraction, self.eta_s))

    monkeypatch.setattr(StagedProgress, "update", recording)
    return seen


def _check_stage(seen: list, stage: str) -> None:
    parts = [p for s, p, _f, _e in seen if s == stage]
    assert parts, f"stage {stage} reported nothing: {seen}"
    assert parts == sorted(parts), (stage, parts)
    assert any(0 < p < 1 for p in parts), f"{stage} went {parts}: no intermediate value"


def test_progress_moves_through_every_stage(service: Service, monkeypatch) -> None:
    """A real training run (embedding 40 images in two batches, 200 prototype epochs, 3
    training steps) and a real sampling run (2 batches of 4 denoising steps): every stage
    reports values between its start and end, the job's fraction never goes back, and the
    ETA is known from the first measurement on and 0 at the end."""
    from workers.tasks import run_job

    seen = _record(monkeypatch)
    (job_id,) = _toy_jobs(service, 1)
    assert run_job(job_id, "train", "test@host:1") == "succeeded", _job(service, job_id)
    for stage in ("embed", "prototypes", "train"):
        _check_stage(seen, stage)
    fractions = [f for _s, _p, f, _e in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(0.2 < f < 0.9 for f in fractions)
    etas = [e for s, p, _f, e in seen if s == "train" and 0 < p < 1]
    assert etas and all(e is not None and e > 0 for e in etas), etas
    assert seen[-1][3] == 0.0

    seen.clear()
    classes = service.client.get("/datasets/1", headers=service.admin).json()["classes"]
    r = service.client.post(
        "/generate",
        params={"class": classes[0], "n": 6, "steps": 4, "mode": "baseline"},
        headers=service.admin,
    )
    assert r.status_code == 202, r.text
    sample_job = r.json()["job"]["id"]
    assert run_job(sample_job, "sample", "test@host:1") == "succeeded", _job(service, sample_job)
    for stage in ("sample", "store"):
        _check_stage(seen, stage)
    fractions = [f for _s, _p, f, _e in seen]
    assert fractions == sorted(fractions) and fractions[-1] > 0.9


def test_eta_is_the_measured_rate_over_every_stage_left() -> None:
    """With a fake clock: a job whose stages run at a steady rate gets the true remaining time
    (not the current stage's alone); a resumed stage is timed on this run's units only; before
    anything is measured the ETA is unknown rather than a guess."""
    now = [0.0]
    reports: list[tuple[float, float | None]] = []
    p = StagedProgress(
        {"embed": 1, "train": 3}, lambda f, e: reports.append((f, e)), clock=lambda: now[0]
    )
    p.update("embed", 0, 10)
    assert reports[-1] == (0.0, None)
    now[0] = 5.0  # embedding: 1 s per image, 10 s in all; training (3x the weight) 30 s
    p.update("embed", 5, 10)
    assert reports[-1] == (0.125, pytest.approx(5.0 + 30.0))
    now[0] = 10.0
    p.update("train", 0, 100)
    assert reports[-1] == (0.25, pytest.approx(30.0))
    now[0] = 25.0
    p.update("train", 50, 100)
    assert reports[-1] == (0.625, pytest.approx(15.0))

    resumed = StagedProgress(
        {"train": 1}, lambda f, e: reports.append((f, e)), clock=lambda: now[0]
    )
    resumed.update("train", 90, 100)  # a re-run from a checkpoint at step 90
    now[0] += 2.0
    resumed.update("train", 92, 100)  # 1 s per step measured: 8 s left, not 2 * 8 / 92
    assert reports[-1] == (0.92, pytest.approx(8.0))
    resumed.update("train", 91, 100)  # never backwards
    assert reports[-1][0] == 0.92
