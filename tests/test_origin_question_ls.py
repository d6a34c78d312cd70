"""The "real or synthetic?" question through a real Label Studio (skips without one, as
test_reviews.py, whose servers, worker and reviewers this module starts for itself): a review
request with ``ask_origin`` creates a project of its own whose interface asks it, annotations
posted through Label Studio's API with origin answers come back by webhook, and the report
scores them."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from service_procs import wait_job
from test_reviews import (
    AUTH,
    CLASSES,
    Base,
    base,
    broker,
    checker_result,
    ls_tasks,
    seed_batches,
)
from waiting import wait_until

from service.criteria import annotation_result, parse_result

pytestmark = pytest.mark.slow
__all__ = ["base", "broker"]  # the module fixtures, used here by name


def test_origin_question_end_to_end(base: Base) -> None:
    dataset, batches, _ = seed_batches(base.env)
    ids = [batches[(m, c)] for m in ("baseline", "prototype") for c in CLASSES]
    r = base.api.post("/reviews", json={"batch_ids": ids, "ask_origin": True}, headers=AUTH)
    assert r.status_code == 202, r.text
    project = r.json()["project"]
    assert project["origin_question"] is True
    wait_job(base.api, r.json()["job"]["id"], worker=base.worker, timeout=120)
    projects = base.api.get("/reviews/projects", headers=AUTH).json()
    (asked,) = [p for p in projects if p["id"] == project["id"]]
    ls_project = base.ls.projects.get(asked["ls_project_id"])
    names = [c.get("name") for c in ET.fromstring(ls_project.label_config).findall("Choices")]
    assert names[-3:] == ["overall", "origin", "origin_confidence"]

    tasks = ls_tasks(base, asked["ls_project_id"])[:4]
    assert len(tasks) == 4
    answers = [(True, 3), (False, 1), (True, 2), (True, 1)]  # every image here is synthetic
    expected = []
    for task, (answered, confidence) in zip(tasks, answers, strict=True):
        png = base.api.get(task["data"]["image"]).content
        plain, _ = checker_result(png, task["data"]["expected_class"], False)
        keys = [i["from_name"][5:] for i in plain if i["from_name"].startswith("crit_")]
        criteria = parse_result(plain, keys)["criteria"]
        result = annotation_result(
            criteria, answered_synthetic=answered, origin_confidence=confidence
        )
        base.ls.annotations.create(task["id"], result=result, completed_by=base.reviewers[0])
        expected.append(answered)

    def scored() -> dict | None:
        rep = base.api.get(
            "/reports/plausibility", params={"dataset_id": str(dataset)}, headers=AUTH
        ).json()
        d = rep.get("discrimination")
        return d if d is not None and d["pooled"]["n"] == 4 else None

    d = wait_until(scored, timeout=120, what="4 origin answers in the report")
    pooled = d["pooled"]
    assert (pooled["synthetic"], pooled["real"]) == (4, 0)
    assert pooled["sensitivity"]["k"] == sum(expected) == 3
    assert pooled["specificity"] is None and pooled["auc"] is None  # no real image here
    assert pooled["claim"] == "not shown to be indistinguishable"
    (reader,) = d["readers"]  # one reader: by e-mail where Label Studio gave it, else by id
    assert reader in {base.emails[0], str(base.reviewers[0])}
