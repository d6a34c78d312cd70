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

from ml.errors import Conflict, NotFound, UserError
from service.db.models import Batch, Job, JobKind, Model
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


# Where a route may still answer with fastapi's HTTPException: about HTTP itself (who is asking,
# how big the body is, what a file route can serve), never about the stored state, whose rules
# are the service core's (ml.errors, answered by api/errors.py). Keyed by the enclosing function.
HTTP_ONLY = {
    ("api/routes/datasets.py", "_too_large"): "413: the upload's body is over the size limit",
    ("api/routes/datasets.py", "_unpack"): "413: the uploaded archive unpacks over the limits",
    ("api/routes/reviews.py", "webhook_secret"): "403: the webhook's shared secret (auth)",
    ("api/routes/reviews.py", "review_image"): "404s of a file route whose token is the key",
    ("api/routes/images.py", "get_image"): "404: a file route's object missing from storage",
    ("api/routes/batches.py", "audit_nearest"): "404: a file route's object missing from storage",
    ("api/routes/dashboard.py", "ui_reader"): "303 to the login page, 403 for reviewer keys",
    ("api/routes/dashboard.py", "same_origin"): "403: cross-site form posts (login CSRF)",
    ("api/routes/dashboard.py", "optional_id"): "422: a page's malformed id filter, shown on it",
    (
        "api/routes/dashboard.py",
        "equivalence_margin",
    ): "422: a page's malformed margin, shown on it",
    ("api/routes/dashboard.py", "report_page"): "a filter error handed to the page that shows it",
}


def _http_exceptions_in_routes() -> set[tuple[str, str]]:
    """(module, enclosing function) of every ``HTTPException(...)`` in api/routes."""
    found = set()
    for where, tree in _trees(("api/routes",)):
        inside: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and _named(node.func, "HTTPException"):
                        found.add((where, fn.name))
                        inside.add(id(node))
        for node in ast.walk(tree):
            called = isinstance(node, ast.Call) and _named(node.func, "HTTPException")
            if called and id(node) not in inside:
                found.add((where, "<module>"))
    return found


def test_routes_raise_http_errors_only_about_http() -> None:
    """Domain rules are refused by the service core with ``ml.errors``; a route builds an
    ``HTTPException`` only where :data:`HTTP_ONLY` says why (and every entry is still used, so
    the list only shrinks)."""
    assert _http_exceptions_in_routes() == set(HTTP_ONLY)


def test_typed_errors_keep_their_statuses() -> None:
    """The audit and scorer refusals are ``UserError`` subclasses, answered by the one handler
    with the status their class says."""
    from service.audits import AuditNotReady, AuditUnavailable, NoAuditYet

    assert issubclass(AuditUnavailable, UserError)
    assert issubclass(NoAuditYet, NotFound) and NoAuditYet.status == 404
    assert issubclass(AuditNotReady, Conflict) and AuditNotReady.status == 409


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


def _stored(job_ids: list[int]) -> list[tuple[Any, ...]]:
    """What a train job stored that does not depend on who asked or when."""
    with get_sessionmaker()() as session:
        jobs = [session.get(Job, i) for i in job_ids]
        out = []
        for job in jobs:
            assert job is not None and job.model is not None
            model = job.model
            out.append((job.kind, job.params, model.mode, model.config, model.classes))
        return out


def test_training_and_evaluation_are_one_service_function_each(service: Service) -> None:
    """``POST /jobs/train`` stores what :func:`service.training.request_training` stores for
    the same request, and both refuse alike; so does ``POST /jobs/evaluate`` with
    :func:`service.evaluations.request_evaluation`."""
    from factories import add_dataset, create

    from ml.errors import Invalid
    from service.config import get_settings
    from service.evaluations import EvaluateRequest, request_evaluation
    from service.training import TrainRequest, request_training

    ds = create(add_dataset)
    body = {"dataset_id": ds, "preset": "tiny", "overrides": {"max_steps": 3}, "seed": 4}
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    by_route = [j["id"] for j in r.json()["jobs"]]
    with get_sessionmaker()() as session:
        jobs = request_training(session, get_settings(), TrainRequest(**body), "direct")
        direct = [j.id for j in jobs]
    assert _stored(by_route) == _stored(direct) and len(direct) == 2

    bad = {**body, "classes": ["basophil", "alien"]}
    r = service.client.post("/jobs/train", json=bad, headers=service.admin)
    with get_sessionmaker()() as session, pytest.raises(Invalid) as refused:
        request_training(session, get_settings(), TrainRequest(**bad), "direct")
    assert r.status_code == 422 and r.json()["detail"] == str(refused.value)

    with get_sessionmaker()() as session:
        models = [session.scalars(select(Job.model_id).where(Job.id == i)).one() for i in by_route]
        assert all(session.get(Model, m) is not None for m in models)
    pending = {"baseline_model_id": models[1], "prototype_model_id": models[0]}
    r = service.client.post("/jobs/evaluate", json=pending, headers=service.admin)
    with get_sessionmaker()() as session, pytest.raises(Conflict) as not_ready:
        request_evaluation(session, get_settings(), EvaluateRequest(**pending), "direct")
    assert r.status_code == 409 and r.json()["detail"] == str(not_ready.value)
    assert "not ready" in str(not_ready.value)
    _validate_every_job()


def test_the_cli_and_the_route_train_a_scorer_alike(service: Service) -> None:
    """``protomed scorer train`` and ``POST /scorers`` both call
    :func:`service.scorers.request_scorer`: the same refusals, word for word."""
    from protomed_cli.main import app

    runner = CliRunner()
    for domain in ("nope", "blood"):  # unknown: 404; no reviewed images yet: 409
        r = service.client.post("/scorers", json={"domain": domain}, headers=service.admin)
        cli = runner.invoke(app, ["scorer", "train", domain])
        assert r.status_code in (404, 409) and cli.exit_code == 2, (r.text, cli.output)
        assert cli.output.strip() == f"error: {r.json()['detail']}", (cli.output, r.text)
    assert not _validate_every_job()
