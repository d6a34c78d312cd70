"""Each user action is written once, in the service core: the routes and the CLI call the same
function, so they check the same rules and store the same rows. Checked by reading the source
(no job row built, no HTTP error raised outside their one place) and by running actions both
ways and comparing what they stored."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, reset_service_caches
from sqlalchemy import select
from test_sweeps import OUTCOMES, ready_model, reviewed_sweep
from typer.testing import CliRunner

from service.db.models import Batch, Job, JobKind
from service.db.session import get_sessionmaker
from service.job_kinds import spec_for
from service.payloads import ReviewSyncPayload

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("api", "service", "workers", "protomed_cli")


def _trees(packages: tuple[str, ...]) -> list[tuple[str, ast.AST]]:
    return [
        (str(path.relative_to(REPO)), ast.parse(path.read_text(), filename=str(path)))
        for pkg in packages
        for path in sorted((REPO / pkg).rglob("*.py"))
    ]


def _named(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Name) and node.id == name) or (
        isinstance(node, ast.Attribute) and node.attr == name
    )


def test_job_rows_are_constructed_only_in_job_kinds() -> None:
    """``Job(...)`` is called in ``service/job_kinds.py`` alone (by ``new_job``), so every
    stored job's params went through its kind's payload model."""
    calls = [
        f"{where}:{node.lineno}"
        for where, tree in _trees(PRODUCT)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _named(node.func, "Job")
    ]
    assert calls and all(c.startswith("service/job_kinds.py:") for c in calls), calls


def test_http_errors_stay_in_the_api() -> None:
    """Outside ``api/`` nothing imports or raises ``HTTPException``: the service core raises
    ``ml.errors`` (the API translates them once), so the CLI gets the same rules."""
    found = []
    for where, tree in _trees(("service", "workers", "protomed_cli", "ml")):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(
                a.name == "HTTPException" for a in node.names
            ):
                found.append(f"{where}:{node.lineno} imports HTTPException")
            elif isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if _named(exc, "HTTPException"):
                    found.append(f"{where}:{node.lineno} raises HTTPException")
    assert not found, found


def _validate_every_job() -> list[Job]:
    """Every stored job's params parse as its kind's payload model (what its worker reads)."""
    with get_sessionmaker()() as session:
        jobs = list(session.scalars(select(Job)))
    for job in jobs:
        spec_for(job.kind).payload.model_validate(job.params)
    return jobs


def test_the_cli_and_the_route_send_a_sweep_to_review_alike(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from protomed_cli.main import app

    by_route, by_cli = reviewed_sweep(service, OUTCOMES), reviewed_sweep(service, OUTCOMES)
    runner = CliRunner()
    r = runner.invoke(app, ["sweep", "review", str(by_cli)])  # the same refusal both ways
    assert r.exit_code == 2 and "PROTOMED_LABEL_STUDIO_URL" in r.output, r.output
    r = service.client.post(f"/sweeps/{by_route}/review", headers=service.admin)
    assert r.status_code == 409 and "PROTOMED_LABEL_STUDIO_URL" in r.text
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # never reached
    reset_service_caches()
    r = runner.invoke(app, ["sweep", "review", "4242"])
    assert r.exit_code == 2 and "no sweep with id 4242" in r.output, r.output
    r = service.client.post(f"/sweeps/{by_route}/review", headers=service.admin)
    assert r.status_code == 202, r.text
    route_job = r.json()["job"]["id"]
    r = runner.invoke(app, ["sweep", "review", str(by_cli)])
    assert r.exit_code == 0, r.output
    cli_job = int(r.output.rsplit("sync job ", 1)[1])
    with get_sessionmaker()() as session:
        rows = session.scalars(select(Job).where(Job.id.in_([route_job, cli_job])))
        jobs = {j.id: j for j in rows}
        project = ReviewSyncPayload.model_validate(jobs[route_job].params).project_id
        for job in jobs.values():
            assert job.kind == JobKind.review_sync
            assert job.params == ReviewSyncPayload(project_id=project).model_dump(mode="json")
        assert jobs[cli_job].requested_by == "cli" and len(jobs) == 2
    _validate_every_job()


def _generated(service: Service, **kw: Any) -> dict[str, Any]:
    r = service.client.post("/generate", headers=service.admin, **kw)
    assert r.status_code == 202, r.text
    out = r.json()
    batch = {
        k: out["batch"][k]
        for k in ("class_name", "n", "guidance", "steps", "seed", "scheduler", "model_id")
    }
    return {"batch": batch, "source": out["guidance_source"], "kind": out["job"]["kind"]}


def test_generate_takes_a_body_or_the_same_query(service: Service) -> None:
    model = ready_model()
    fields = {"class": "lymphocyte", "n": 3, "model_id": model, "seed": 5, "scheduler": "ddim"}
    by_body = _generated(service, json=fields)
    by_query = _generated(service, params=fields)
    assert by_body == by_query
    assert by_body["batch"]["steps"] == 50 and by_body["kind"] == "sample"
    with get_sessionmaker()() as session:
        batches = session.scalars(select(Batch).order_by(Batch.id.desc()).limit(2)).all()
        assert [b.job.params for b in batches] == [{"batch_id": b.id} for b in batches]
    # the same rules, the same answers, whichever form
    for bad, code, needle in (
        ({"class": "eosinophil", "model_id": model}, 422, "unknown class 'eosinophil'"),
        ({"class": "lymphocyte", "n": 0, "model_id": model}, 422, "between 1 and"),
        ({"class": "lymphocyte", "model_id": 4242}, 404, "no model with id 4242"),
        ({"class": "lymphocyte", "threshold": 0.5, "model_id": model}, 422, "filter=plausible"),
    ):
        body, query = (
            service.client.post("/generate", headers=service.admin, **{k: bad})
            for k in ("json", "params")
        )
        assert body.status_code == query.status_code == code, (bad, body.text, query.text)
        assert body.json() == query.json() and needle in body.text, (bad, body.text)
    # a malformed body is FastAPI's 422, naming the field
    for bad, field in (
        ({"class": "lymphocyte", "n": "many"}, "n"),
        ({"n": 2}, "class"),
        ({"class": "lymphocyte", "colour": "red"}, "colour"),
        ({"class": "lymphocyte", "guidance": 99}, "guidance"),
    ):
        r = service.client.post("/generate", headers=service.admin, json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert any(e["loc"][-1] == field for e in r.json()["detail"]), (bad, r.text)
    r = service.client.post("/generate", headers=service.admin, params={"n": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "class"], r.text
    r = service.client.post("/generate", headers=service.admin, json=fields, params={"n": 2})
    assert r.status_code == 422 and "not both" in r.text, r.text
    jobs = _validate_every_job()
    assert len(jobs) == 2  # nothing refused was stored
