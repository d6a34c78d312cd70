"""The registry of job kinds (``service.job_kinds``) is complete and says what the rest of the
service does: every kind has an entry whose runner imports on a worker, and whose payload model
reads back the params the API writes for a job of that kind. And a job's error never shows its
readers the SQL or driver text of a database error."""

from __future__ import annotations

import pytest
from conftest import Service, reset_service_caches
from factories import review_batches
from sqlalchemy import select, text
from test_scorer_service import reviewed

from ml.data.toy import write_toy_dataset
from service.db.models import Job, JobKind
from service.db.session import get_sessionmaker
from service.job_kinds import KINDS, RETIRED, KindSpec, spec_for


def test_every_kind_has_one_entry_whose_runner_imports() -> None:
    assert set(KINDS) | RETIRED == set(JobKind) and not set(KINDS) & RETIRED
    assert len({spec.task for spec in KINDS.values()}) == len(KINDS)  # one task per kind
    for kind, spec in KINDS.items():
        assert spec.kind == kind and spec_for(str(kind)) is spec
        assert callable(spec.load_runner()), spec.runner
    for kind in (*RETIRED, "bogus"):
        with pytest.raises(ValueError, match="no runner for job kind"):
            spec_for(kind)


def test_the_workers_register_one_task_per_kind() -> None:
    from workers.celery_app import app
    from workers.tasks import CELERY_TASKS

    assert set(CELERY_TASKS) == {str(k) for k in KINDS}
    for kind, spec in KINDS.items():
        assert CELERY_TASKS[str(kind)].name == spec.task and spec.task in app.tasks


def _submit_one_of_each(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job of every kind, each submitted through the API route that makes it."""

    def post(url: str, code: int = 202, **kw: object) -> dict:
        r = svc.client.post(url, headers=svc.admin, **kw)  # type: ignore[arg-type]
        assert r.status_code == code, (url, r.text)
        return r.json()

    write_toy_dataset(svc.data_root / "toy", n_per_class=8, size=32, seed=0)
    dataset = post("/datasets", 201, json={"name": "toy", "path": "toy"})
    post(
        "/jobs/train",
        json={
            "dataset_id": dataset["id"],
            "mode": "both",
            "preset": "cpu-small",
            "n_per_class": 6,
            "n_heldout": 2,
        },
    )  # a split 8 per class hold

    with get_sessionmaker()() as session:
        base, proto = review_batches(session)
    models = {
        m: svc.client.get(f"/batches/{b}", headers=svc.admin).json()["model_id"]
        for m, b in (("baseline", base), ("prototype", proto))
    }
    post("/generate", params={"class": "a", "n": 2, "model_id": models["baseline"]})
    post("/jobs/evaluate", json={f"{m}_model_id": i for m, i in models.items()})
    post(f"/batches/{base}/audit")
    reviewed(24)
    post("/scorers", json={"domain": "toy"})
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens
    reset_service_caches()
    post("/reviews", json={"batch_ids": [base, proto]})


def test_each_payload_model_reads_the_params_the_api_wrote(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    _submit_one_of_each(service, monkeypatch)
    with get_sessionmaker()() as session:
        jobs = session.scalars(select(Job)).all()
    assert {j.kind for j in jobs} == set(KINDS)
    for job in jobs:
        spec_for(job.kind).payload.model_validate(job.params)


def test_a_database_error_in_a_job_shows_no_sql(
    service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A runner hitting a real database error: the job fails with a short message naming the
    job, and the SQL is only in the worker's log."""
    from workers.tasks import run_job

    with get_sessionmaker()() as session:
        (batch, _) = review_batches(session)
    r = service.client.post(f"/batches/{batch}/audit", headers=service.admin)
    assert r.status_code == 202, r.text

    def broken(*_: object) -> dict[str, object]:
        with get_sessionmaker()() as session:
            session.execute(text("UPDATE no_such_table SET secret_column = 1"))
        return {}

    monkeypatch.setattr(KindSpec, "load_runner", lambda _spec: broken)
    assert run_job(r.json()["id"], "audit", "test@host:1") == "failed"
    job = service.client.get(f"/jobs/{r.json()['id']}", headers=service.admin).json()
    assert job["error"] == "database error in the audit job (see the worker log)", job
    assert "no_such_table" in caplog.text  # the traceback, for whoever reads the worker log


def test_job_rows_are_built_in_one_place() -> None:
    """Every job row comes from ``service.job_kinds.new_job`` (its params checked against the
    kind's payload model): no ``Job(`` constructor call anywhere else in the product."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    calls = [
        f"{path.relative_to(repo)}:{n}"
        for pkg in ("api", "service", "workers", "protomed_cli", "ml")
        for path in sorted((repo / pkg).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"(?<![\w.])Job\(", line) and "class Job(" not in line
    ]
    assert len(calls) == 1 and calls[0].startswith("service/job_kinds.py:"), calls


def test_new_job_takes_only_its_kinds_payload() -> None:
    from service.job_kinds import new_job, set_payload
    from service.payloads import ReviewSyncPayload, SamplePayload, ScorePayload

    job = new_job(JobKind.score, ScorePayload(domain="toy"), requested_by="t")
    assert job.params == {"domain": "toy"} and job.kind == JobKind.score
    with pytest.raises(TypeError, match="a score job takes ScorePayload, not ReviewSyncPayload"):
        new_job(JobKind.score, ReviewSyncPayload(project_id=1), requested_by="t")
    sample = new_job(JobKind.sample, None, requested_by="t")  # its batch id comes after a flush
    assert sample.params is None
    set_payload(sample, SamplePayload(batch_id=3))
    assert sample.params == {"batch_id": 3}
    with pytest.raises(TypeError, match="a sample job takes SamplePayload"):
        set_payload(sample, ScorePayload(domain="toy"))
