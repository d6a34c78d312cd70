"""The job API in-process (real SQLite database, real local storage, Celery's SQLite-backed
queue with no worker): submitting, validating, listing and cancelling jobs, and every bad input
of training and generation answering 4xx without changing the database."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from factories import add_batch, add_dataset, add_image, add_model, create
from pydantic import TypeAdapter
from sqlalchemy import func, select

from service.db.models import Batch, Job, Model, ModelStatus
from service.db.session import get_sessionmaker

CLASSES = ["basophil", "eosinophil", "lymphocyte"]


def new_model(dataset_id: int, **extra: Any) -> int:
    return create(
        add_model, dataset_id=dataset_id, checkpoint_path="models/x/checkpoint.pt", **extra
    )


def counts() -> dict[str, int]:
    with get_sessionmaker()() as s:
        return {
            t.__name__: s.scalar(select(func.count()).select_from(t)) for t in (Job, Model, Batch)
        }


def test_train_both_modes_queues_two_jobs_and_models(service) -> None:
    ds = create(add_dataset)
    body = {"dataset_id": ds, "mode": "both", "preset": "tiny", "overrides": {"max_steps": 3}}
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    out = r.json()
    assert [m["mode"] for m in out["models"]] == ["prototype", "baseline"]
    assert all(m["status"] == "pending" and m["classes"] == CLASSES for m in out["models"])
    assert all(m["config"]["max_steps"] == 3 for m in out["models"])
    jobs = out["jobs"]
    assert [j["status"] for j in jobs] == ["queued", "queued"]
    assert jobs[0]["params"]["selection"] == jobs[1]["params"]["selection"]  # same split
    assert jobs[0]["requested_by"] == "admin (bootstrap)"
    got = service.client.get(f"/jobs/{jobs[0]['id']}", headers=service.admin).json()
    assert got["id"] == jobs[0]["id"] and got["links"]["model"].endswith(
        f"/models/{out['models'][0]['id']}"
    )
    listed = service.client.get("/jobs", params={"kind": "train"}, headers=service.admin).json()
    assert [j["id"] for j in listed] == [jobs[1]["id"], jobs[0]["id"]]
    assert counts() == {"Job": 2, "Model": 2, "Batch": 0}


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"dataset_id": 999}, 404, "no dataset with id 999"),
        ({"mode": "fancy"}, 422, "prototype"),
        ({"preset": "huge"}, 422, "cpu-small"),
        ({"overrides": {"lr": -1}}, 422, "lr"),
        ({"overrides": {"no_such_field": 1}}, 422, "no_such_field"),
        ({"classes": ["basophil", "alien"]}, 422, "alien"),
        ({"classes": ["basophil"]}, 422, "at least two"),
        ({"n_per_class": 0}, 422, "n_per_class"),
        ({"surprise": True}, 422, "surprise"),
    ],
)
def test_bad_training_requests_change_nothing(service, body, code, needle) -> None:
    ds = create(add_dataset)
    before = counts()
    r = service.client.post(
        "/jobs/train", json={"dataset_id": ds, "preset": "tiny", **body}, headers=service.admin
    )
    assert r.status_code == code, r.text
    assert needle in r.text
    assert counts() == before


def test_malformed_json_and_missing_or_wrong_keys(service) -> None:
    ds = create(add_dataset)
    before = counts()
    r = service.client.post(
        "/jobs/train",
        content=b"{not json",
        headers={**service.admin, "content-type": "application/json"},
    )
    assert r.status_code == 422 and "json" in r.text.lower()
    r = service.client.post("/jobs/train", json={"dataset_id": ds})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = service.client.post(
        "/jobs/train", json={"dataset_id": ds}, headers={"Authorization": "Bearer pm_wrong"}
    )
    assert r.status_code == 401 and "unknown" in r.json()["detail"]
    reviewer = service.client.post(
        "/keys", json={"name": "rev", "role": "reviewer"}, headers=service.admin
    ).json()
    r = service.client.post(
        "/jobs/train",
        json={"dataset_id": ds},
        headers={"Authorization": f"Bearer {reviewer['key']}"},
    )
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    # a revoked key stops working
    service.client.post(f"/keys/{reviewer['id']}/revoke", headers=service.admin)
    r = service.client.get("/keys", headers={"Authorization": f"Bearer {reviewer['key']}"})
    assert r.status_code == 401
    assert counts() == before


def test_reads_need_an_admin_or_viewer_key(service) -> None:
    """Reads are locked by default: nobody reads without a key, a viewer reads results but
    writes nothing, a reviewer reads only criteria and review projects (blinding)."""
    ds = create(add_dataset)
    model = new_model(ds)

    def make(role: str) -> dict[str, str]:
        r = service.client.post("/keys", json={"name": role, "role": role}, headers=service.admin)
        assert r.status_code == 201 and r.json()["role"] == role, r.text
        return {"Authorization": f"Bearer {r.json()['key']}"}

    viewer, reviewer = make("viewer"), make("reviewer")
    reads = [
        "/datasets",
        f"/datasets/{ds}",
        "/models",
        f"/models/{model}",
        "/jobs",
        "/reports/plausibility",
    ]
    for url in reads:
        anonymous = service.client.get(url)
        assert anonymous.status_code == 401 and "API key is required" in anonymous.text, url
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert service.client.get(url, headers=viewer).status_code == 200, url
        denied = service.client.get(url, headers=reviewer)
        assert denied.status_code == 403 and "admin or viewer" in denied.text, url
    for url in ("/criteria", "/reviews/projects"):
        assert service.client.get(url).status_code == 401
        assert service.client.get(url, headers=reviewer).status_code == 200
        assert service.client.get(url, headers=viewer).status_code == 200
    before = counts()
    r = service.client.post("/jobs/train", json={"dataset_id": ds}, headers=viewer)
    assert r.status_code == 403 and "needs an admin key" in r.text
    assert service.client.get("/keys", headers=viewer).status_code == 403
    assert counts() == before
    bad = service.client.post("/keys", json={"name": "x", "role": "owner"}, headers=service.admin)
    assert bad.status_code == 422 and "viewer" in bad.text
    # the CLI makes viewer keys too, and names the roles when given another
    from typer.testing import CliRunner

    from protomed_cli.main import app

    made = CliRunner().invoke(app, ["create-key", "lab", "--role", "viewer"])
    assert made.exit_code == 0, made.output
    token = {"Authorization": f"Bearer {made.output.strip()}"}
    assert service.client.get("/models", headers=token).status_code == 200
    wrong = CliRunner().invoke(app, ["create-key", "lab", "--role", "owner"])
    assert wrong.exit_code != 0 and "admin, viewer, reviewer" in wrong.output


def test_generate_picks_latest_ready_model_and_validates(service) -> None:
    ds = create(add_dataset)
    new_model(ds)
    newest = new_model(ds)
    new_model(ds, status=ModelStatus.training)
    r = service.client.post(
        "/generate", params={"class": "eosinophil", "n": 8, "dataset_id": ds}, headers=service.admin
    )
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["batch"]["model_id"] == newest and out["batch"]["n"] == 8
    assert out["job"]["kind"] == "sample" and out["job"]["params"] == {
        "batch_id": out["batch"]["id"]
    }
    assert out["job"]["links"]["batch"].endswith(f"/batches/{out['batch']['id']}")
    # the default sampler is SDE-DPM-Solver++ at 20 steps; DDIM defaults to the seed's 50
    assert (out["batch"]["scheduler"], out["batch"]["steps"]) == ("dpm++sde", 20)
    r = service.client.post(
        "/generate", params={"class": "eosinophil", "scheduler": "ddim"}, headers=service.admin
    )
    assert (r.json()["batch"]["scheduler"], r.json()["batch"]["steps"]) == ("ddim", 50)
    before = counts()
    cases = [
        ({"class": "mel", "n": 8}, 422, "basophil, eosinophil, lymphocyte"),
        ({"class": "eosinophil", "n": 0}, 422, "between 1 and 1000"),
        ({"class": "eosinophil", "n": 1001}, 422, "between 1 and 1000"),
        ({"class": "eosinophil", "n": "many"}, 422, "n"),
        ({"class": "eosinophil", "model_id": 999}, 404, "no model with id 999"),
        ({"class": "eosinophil", "dataset_id": 999}, 404, "no dataset with id 999"),
        ({"class": "eosinophil", "scheduler": "euler"}, 422, "ddim"),
        ({"n": 4}, 422, "class"),
    ]
    for params, code, needle in cases:
        r = service.client.post("/generate", params=params, headers=service.admin)
        assert r.status_code == code, (params, r.text)
        assert needle in r.text, (params, r.text)
    training = new_model(ds, status=ModelStatus.training)
    r = service.client.post(
        "/generate", params={"class": "eosinophil", "model_id": training}, headers=service.admin
    )
    assert r.status_code == 409 and "not ready" in r.text
    assert counts()["Batch"] == before["Batch"] and counts()["Job"] == before["Job"]


def test_cancel_queued_job_and_refuse_cancelling_twice(service) -> None:
    ds = create(add_dataset)
    r = service.client.post(
        "/jobs/train",
        json={"dataset_id": ds, "mode": "baseline", "preset": "tiny"},
        headers=service.admin,
    )
    job = r.json()["jobs"][0]
    r = service.client.post(f"/jobs/{job['id']}/cancel", headers=service.admin)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    model = service.client.get(f"/models/{r.json()['model_id']}", headers=service.admin).json()
    assert model["status"] == "cancelled"
    r = service.client.post(f"/jobs/{job['id']}/cancel", headers=service.admin)
    assert r.status_code == 409 and "already finished" in r.text
    assert service.client.post("/jobs/4242/cancel", headers=service.admin).status_code == 404


def test_broker_down_is_503_and_leaves_nothing(service, monkeypatch) -> None:
    from conftest import reset_service_caches

    ds = create(add_dataset)
    new_model(ds)
    before = counts()
    monkeypatch.setenv("PROTOMED_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    reset_service_caches()
    r = service.client.post("/generate", params={"class": "basophil"}, headers=service.admin)
    assert r.status_code == 503, r.text
    assert r.json()["component"] == "broker" and r.headers["retry-after"]
    r = service.client.post(
        "/jobs/train", json={"dataset_id": ds, "preset": "tiny"}, headers=service.admin
    )
    assert r.status_code == 503
    assert counts() == before
    ready = service.client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
    assert ready.json()["checks"]["database"] == "ok"


def test_database_down_is_503_then_retry_works(service, monkeypatch) -> None:
    from conftest import reset_service_caches

    ds = create(add_dataset)
    good = service.env["PROTOMED_DATABASE_URL"]
    monkeypatch.setenv("PROTOMED_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/gone")
    reset_service_caches()
    for method, url, kwargs in [
        ("get", "/jobs", {"headers": service.admin}),
        ("post", "/jobs/train", {"json": {"dataset_id": ds}, "headers": service.admin}),
    ]:
        r = service.client.request(method, url, **kwargs)
        assert r.status_code == 503, r.text
        assert r.json()["component"] == "database" and "retry" in r.json()["detail"]
        assert r.headers["retry-after"]
    ready = service.client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
    monkeypatch.setenv("PROTOMED_DATABASE_URL", good)  # the database is back: the retry works
    reset_service_caches()
    r = service.client.post(
        "/jobs/train", json={"dataset_id": ds, "preset": "tiny"}, headers=service.admin
    )
    assert r.status_code == 202, r.text


def test_storage_down_is_503(service, monkeypatch) -> None:
    from conftest import reset_service_caches

    ds = create(add_dataset)
    model = new_model(ds)
    with get_sessionmaker()() as s:
        batch = add_batch(s, model_id=model, class_name="basophil", steps=5, seed=None)
        image_id = add_image(s, batch).id
        s.commit()
    blocker = service.tmp / "not-a-folder"
    blocker.write_text("storage root is a file")
    monkeypatch.setenv("PROTOMED_STORAGE_DIR", str(blocker))
    reset_service_caches()
    r = service.client.get(f"/images/{image_id}", headers=service.admin)
    assert r.status_code == 503 and r.json()["component"] == "storage", r.text
    ready = service.client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("error")


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("get", "/jobs/2147483648", {}),
        ("post", "/jobs/9223372036854775808/cancel", {}),
        ("get", "/models", {"params": {"dataset_id": 2**31}}),
        ("get", "/jobs", {"params": {"offset": 2**63}}),
        ("post", "/generate", {"params": {"class": "basophil", "seed": 2**31}}),
        ("post", "/keys/2147483648/revoke", {}),
        ("post", "/jobs/train", {"content": b'{"dataset_id": 1, "overrides": {"lr": Infinity}}'}),
        ("post", "/jobs/train", {"content": b'{"dataset_id": 2147483648}'}),
        ("post", "/datasets", {"json": {"name": "x", "path": "0" * 300}}),
    ],
)
def test_values_the_database_cannot_hold_are_422(service, method, url, kwargs) -> None:
    """Found by the OpenAPI fuzzer: out-of-range ids, non-finite floats, over-long paths."""
    create(add_dataset)
    new_model(1)
    before = counts()
    headers = {**service.admin, "content-type": "application/json"}
    r = service.client.request(method, url, headers=headers, **kwargs)
    assert r.status_code == 422, r.text
    assert counts() == before


def _request_body_schemas(openapi: dict[str, Any]) -> set[str]:
    """The component names the OpenAPI document uses as JSON request bodies."""
    names = set()
    for ops in openapi["paths"].values():
        for op in ops.values():
            content = op.get("requestBody", {}).get("content", {})
            ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
            if ref:
                names.add(ref.rsplit("/", 1)[-1])
    return names


def _documented_examples(prop: dict[str, Any]) -> list[Any]:
    """A property's ``examples`` plus any JSON object its description gives after "e.g."."""
    found = list(prop.get("examples", []))
    for snippet in re.findall(r"e\.g\. (\{.*?\})", prop.get("description", "")):
        found.append(json.loads(snippet))  # an example a reader copies must be JSON
    return found


def test_every_request_body_example_validates_against_its_own_model(service) -> None:
    """Each example in the OpenAPI document's request bodies is accepted by the field it
    documents; the training overrides' examples are accepted by the real endpoint too."""
    import sys

    from pydantic import BaseModel

    def model_named(name: str) -> type[BaseModel] | None:
        """Request models live in api/schemas.py and beside their action in service/."""
        for key, module in sorted(sys.modules.items()):
            if key == "api.schemas" or key.startswith("service."):
                found = getattr(module, name, None)
                if isinstance(found, type) and issubclass(found, BaseModel):
                    return found
        return None

    openapi = service.client.get("/openapi.json").json()
    checked = 0
    for name in sorted(_request_body_schemas(openapi)):
        model = model_named(name)
        if model is None:
            continue
        for field, prop in openapi["components"]["schemas"][name].get("properties", {}).items():
            for example in _documented_examples(prop):
                TypeAdapter(model.model_fields[field].annotation).validate_python(example)
                checked += 1
    overrides = openapi["components"]["schemas"]["TrainRequest"]["properties"]["overrides"]
    examples = _documented_examples(overrides)
    assert examples and checked >= len(examples)
    ds = create(add_dataset)
    for example in examples:
        body = {"dataset_id": ds, "mode": "baseline", "preset": "tiny", "overrides": example}
        r = service.client.post("/jobs/train", json=body, headers=service.admin)
        assert r.status_code == 202, (example, r.text)


@pytest.mark.parametrize(
    ("name", "needle"),
    [("steps", "did you mean max_steps?"), ("zzz", "fields are: attention_heads")],
)
def test_an_unknown_override_names_the_valid_fields(service, name, needle) -> None:
    ds = create(add_dataset)
    body = {"dataset_id": ds, "preset": "tiny", "overrides": {name: 2000}}
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text
    assert "max_steps" in r.json()["detail"]
