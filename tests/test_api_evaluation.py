"""``POST /jobs/evaluate`` and ``GET /reports/evaluation`` in-process: every bad request is a
clear 4xx that stores nothing (the run itself is in test_service_e2e)."""

from __future__ import annotations

import pytest
from factories import add_batch, add_dataset, add_image, add_model
from sqlalchemy import func, select

from service.db.models import Job
from service.db.session import get_sessionmaker


def seed() -> dict[str, int]:
    ids: dict[str, int] = {}
    with get_sessionmaker()() as s:
        for name in ("a", "b"):
            ds = add_dataset(s, name=name, root="/x", classes=["x", "y"], counts={"x": 5, "y": 5})
            for mode, status in (("baseline", "ready"), ("prototype", "ready"),
                                 ("prototype", "training")):  # fmt: skip
                m = add_model(s, ds, mode=mode, status=status)
                b = add_batch(s, m, class_name="x", steps=5, seed=None)
                add_image(s, b, key=f"k/{name}{mode}{status}")
                ids[f"{name}-{mode}-{status}"] = m.id
                ids[f"{name}-{mode}-{status}-batch"] = b.id
        s.commit()
    return ids


def jobs() -> int:
    with get_sessionmaker()() as s:
        return s.scalar(select(func.count(Job.id))) or 0


def test_evaluation_requests(service) -> None:
    ids = seed()
    ok = {"baseline_model_id": ids["a-baseline-ready"],
          "prototype_model_id": ids["a-prototype-ready"]}  # fmt: skip
    cases = [
        ({**ok, "baseline_model_id": 999}, 404, "no model with id 999"),
        ({**ok, "baseline_model_id": ids["a-prototype-ready"]}, 422, "not baseline"),
        ({**ok, "prototype_model_id": ids["a-prototype-training"]}, 409, "not ready"),
        ({**ok, "prototype_model_id": ids["b-prototype-ready"]}, 422, "different datasets"),
        ({**ok, "baseline_batch_ids": [ids["b-baseline-ready-batch"]]}, 422,
         "is from dataset"),  # a batch from another dataset
        ({**ok, "prototype_batch_ids": [ids["a-baseline-ready-batch"]]}, 422,
         "not the prototype model"),
        ({**ok, "prototype_batch_ids": [4242]}, 404, "no batch with id 4242"),
        ({**ok, "seeds": []}, 422, "seeds"),
        ({**ok, "backbone": "vgg"}, 422, "resnext50"),
    ]  # fmt: skip
    for body, code, needle in cases:
        r = service.client.post("/jobs/evaluate", json=body, headers=service.admin)
        assert r.status_code == code and needle in r.text, (body, r.text)
    assert jobs() == 0
    assert service.client.post("/jobs/evaluate", json=ok).status_code == 401
    r = service.client.post("/jobs/evaluate", json=ok, headers=service.admin)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "evaluate" and job["params"]["models"] == {
        "baseline": ids["a-baseline-ready"], "prototype": ids["a-prototype-ready"]}  # fmt: skip
    assert job["params"]["config"]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_no_evaluation_yet_is_404(service, fmt: str) -> None:
    r = service.client.get("/reports/evaluation", params={"format": fmt}, headers=service.admin)
    assert r.status_code == 404 and "POST /jobs/evaluate" in r.text
