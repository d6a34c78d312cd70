"""``POST /jobs/evaluate`` and ``GET /reports/evaluation`` in-process: every bad request is a
clear 4xx that stores nothing (the run itself is in test_service_e2e); an external test set's
classes are checked at the request; the report publishes its schema and returns a stored typed
result as it was stored."""

from __future__ import annotations

import pytest
from factories import add_batch, add_dataset, add_image, add_model
from sqlalchemy import func, select

from api.schemas import EvaluationReport
from ml.schemas.evaluation import EvaluationResult
from service.db.models import Job, JobKind, JobStatus, utc_now
from service.db.session import get_sessionmaker


def seed() -> dict[str, int]:
    ids: dict[str, int] = {}
    with get_sessionmaker()() as s:
        for name in ("a", "b"):
            ds = add_dataset(s, name=name, root="/x", classes=["x", "y"], counts={"x": 5, "y": 5})
            ids[f"{name}-dataset"] = ds.id
            for mode, status in (
                ("baseline", "ready"),
                ("prototype", "ready"),
                ("prototype", "training"),
            ):
                m = add_model(s, ds, mode=mode, status=status)
                b = add_batch(s, m, class_name="x", steps=5, seed=None)
                add_image(s, b, key=f"k/{name}{mode}{status}")
                ids[f"{name}-{mode}-{status}"] = m.id
                ids[f"{name}-{mode}-{status}-batch"] = b.id
        for name, classes in (("only-x", ["x"]), ("x-y-z", ["x", "y", "z"])):  # test sets
            ds = add_dataset(s, name=name, root=f"/{name}", classes=classes)
            ids[name] = ds.id
        ids["no-y-images"] = add_dataset(s, classes=["x", "y"], counts={"x": 5, "y": 0}).id
        s.commit()
    return ids


def jobs() -> int:
    with get_sessionmaker()() as s:
        return s.scalar(select(func.count(Job.id))) or 0


def test_evaluation_requests(service) -> None:
    ids = seed()
    ok = {
        "baseline_model_id": ids["a-baseline-ready"],
        "prototype_model_id": ids["a-prototype-ready"],
    }
    cases = [
        ({**ok, "baseline_model_id": 999}, 404, "no model with id 999"),
        ({**ok, "baseline_model_id": ids["a-prototype-ready"]}, 422, "not baseline"),
        ({**ok, "prototype_model_id": ids["a-prototype-training"]}, 409, "not ready"),
        ({**ok, "prototype_model_id": ids["b-prototype-ready"]}, 422, "different datasets"),
        (
            {**ok, "baseline_batch_ids": [ids["b-baseline-ready-batch"]]},
            422,
            "is from dataset",
        ),  # a batch from another dataset
        (
            {**ok, "prototype_batch_ids": [ids["a-baseline-ready-batch"]]},
            422,
            "not the prototype model",
        ),
        ({**ok, "prototype_batch_ids": [4242]}, 404, "no batch with id 4242"),
        ({**ok, "seeds": []}, 422, "seeds"),
        ({**ok, "backbone": "vgg"}, 422, "resnext50"),
        ({**ok, "test_dataset_id": 999}, 404, "no dataset with id 999"),
        (
            {**ok, "test_dataset_id": ids["only-x"]},
            422,
            "has no images of the models' class(es) ['y']: a test set must have every one of "
            "['x', 'y'] (it has ['x']; its other classes are ignored)",
        ),
        ({**ok, "test_dataset_id": ids["no-y-images"]}, 422, "class(es) ['y']"),
        (
            {**ok, "test_dataset_id": ids["a-dataset"]},
            422,
            "is the dataset the models were trained on",
        ),
    ]
    for body, code, needle in cases:
        r = service.client.post("/jobs/evaluate", json=body, headers=service.admin)
        assert r.status_code == code and needle in r.text, (body, r.text)
    assert jobs() == 0
    assert service.client.post("/jobs/evaluate", json=ok).status_code == 401
    r = service.client.post("/jobs/evaluate", json=ok, headers=service.admin)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "evaluate" and job["params"]["models"] == {
        "baseline": ids["a-baseline-ready"],
        "prototype": ids["a-prototype-ready"],
    }
    assert job["params"]["config"]["seeds"] == [0, 1, 2]
    assert job["params"]["test_dataset_id"] is None  # the held-out part
    external = {**ok, "test_dataset_id": ids["x-y-z"]}  # an extra class is no error
    r = service.client.post("/jobs/evaluate", json=external, headers=service.admin)
    assert r.status_code == 202 and r.json()["params"]["test_dataset_id"] == ids["x-y-z"], r.text


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_no_evaluation_yet_is_404(service, fmt: str) -> None:
    r = service.client.get("/reports/evaluation", params={"format": fmt}, headers=service.admin)
    assert r.status_code == 404 and "POST /jobs/evaluate" in r.text


def test_openapi_publishes_the_evaluation_report(service) -> None:
    spec = service.client.get("/openapi.json").json()
    ok = spec["paths"]["/reports/evaluation"]["get"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/EvaluationReport"}
    assert "text/csv" in ok
    schemas = spec["components"]["schemas"]
    props = schemas["EvaluationReport"]["properties"]
    assert {"job_id", "params", "finished_at", "test_set", "downstream", "distribution"} <= set(
        props
    )
    assert {"source", "n_per_class", "total", "dataset_id"} <= set(
        schemas["TestSetInfo"]["properties"]
    )
    body = spec["paths"]["/jobs/evaluate"]["post"]["requestBody"]["content"]["application/json"]
    request = schemas[body["schema"]["$ref"].rsplit("/", 1)[1]]
    assert "test_dataset_id" in request["properties"]


def stored_result() -> dict:
    """A complete result as the worker stores it (``model_dump(mode="json")``)."""
    scores = {"precision": 0.5, "recall": 0.25, "f1": 0.125, "accuracy": 0.75}
    run = {
        **scores,
        "seed": 0,
        "support": [3, 2],
        "confusion": [[2, 1], [1, 1]],
        "per_class": {
            c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for c in ("x", "y")
        },
    }
    dist = {"fd": 1.5, "precision": None, "recall": 0.5, "n_real": 6, "n_fake": 5}
    return EvaluationResult.model_validate(
        {
            "classes": ["x", "y"],
            "selection": {"layout": "folder"},
            "n_train": {"x": 3, "y": 3},
            "n_heldout": {"x": 0, "y": 0},
            "test_set": {
                "source": "external",
                "name": "site-b",
                "path": "/data/site-b",
                "dataset_id": 7,
                "layout": "folder",
                "n_per_class": {"x": 3, "y": 2},
                "total": 5,
                "ignored_classes": ["z"],
            },
            "reference": "external test set site-b",
            "encoder": "tiny|untrained",
            "config": {"seeds": [0]},
            "models": {"baseline": {"path": "/b", "step": 3, "mode": "baseline"}},
            "downstream": {
                "classes": ["x", "y"],
                "seeds": [0],
                "n_test": 5,
                "config": {},
                "sets": {
                    "real": {
                        "n_train": 6,
                        "runs": [run],
                        "mean": scores,
                        "std": scores,
                        "per_class_f1": {"x": 0.5, "y": 0.5},
                    }
                },
            },
            "distribution": {
                "real train": {
                    "classes": ["x", "y"],
                    "k": 3,
                    "overall": dist,
                    "per_class": {"x": dist, "y": dist},
                }
            },
            "seconds": 1.5,
        }
    ).model_dump(mode="json")


def test_report_returns_the_stored_result(service) -> None:
    ids = seed()
    stored = stored_result()
    params = {
        "dataset_id": ids["a-dataset"],
        "models": {"baseline": 1, "prototype": 2},
        "config": {"seeds": [0]},
        "test_dataset_id": ids["x-y-z"],
    }
    with get_sessionmaker()() as s:
        job = Job(
            kind=JobKind.evaluate,
            status=JobStatus.succeeded,
            params=params,
            result=stored,
            finished_at=utc_now(),
        )
        s.add(job)
        s.commit()
        job_id = job.id
    r = service.client.get("/reports/evaluation", headers=service.admin)
    assert r.status_code == 200, r.text
    report = EvaluationReport.model_validate(r.json())
    assert report.job_id == job_id and report.params.test_dataset_id == ids["x-y-z"]
    assert report.model_dump(mode="json", exclude={"job_id", "params", "finished_at"}) == stored
    assert report.test_set is not None and report.test_set.ignored_classes == ["z"]
    csv = service.client.get(
        "/reports/evaluation", params={"format": "csv"}, headers=service.admin
    ).text
    assert csv.splitlines()[1] == "real,50.00,50.00,25.00,25.00,12.50,12.50,6"
    assert "real train,1.5000,,0.5000,,6,5" in csv  # absent statistics are empty cells
