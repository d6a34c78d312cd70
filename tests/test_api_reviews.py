"""Review endpoints in-process (no Label Studio needed): criteria sets and their versions, the
labelling interface, the seed's rule, and every bad review request answering 4xx without
changing anything. The Label Studio round trip is in test_reviews.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from seed import review_batches
from sqlalchemy import func, select

from api.criteria import annotation_result, label_config, parse_result
from api.db.models import ReviewTask
from api.db.session import get_sessionmaker
from ml.toy import CRITERIA


def test_default_criteria_sets_and_versions(service) -> None:
    sets = service.client.get("/criteria", headers=service.admin).json()
    assert {s["domain"] for s in sets} == {"bone-marrow", "blood", "dermatoscopy", "toy"}
    assert all(s["version"] == 1 for s in sets)
    toy = service.client.get("/criteria/toy", headers=service.admin).json()
    assert [c["key"] for c in toy["criteria"]] == list(CRITERIA)  # the checker's criteria
    marrow = service.client.get("/criteria/bone-marrow", headers=service.admin).json()
    assert len(marrow["criteria"]) == 7  # the seed's seven bone-marrow criteria
    assert (
        len(service.client.get("/criteria/dermatoscopy", headers=service.admin).json()["criteria"])
        == 5
    )
    r = service.client.get("/criteria/retina", headers=service.admin)
    assert r.status_code == 404 and "bone-marrow" in r.text
    crits = [{"key": "asymmetry", "label": "Asymmetry"}, {"key": "border", "label": "Border"}]
    body = {"title": "Dermatoscopy, edited", "criteria": crits}
    r = service.client.post("/criteria/dermatoscopy", json=body, headers=service.admin)
    assert r.status_code == 201 and r.json()["version"] == 2
    assert (
        service.client.get("/criteria/dermatoscopy", headers=service.admin).json()["version"] == 2
    )
    bad = [
        ({**body, "criteria": [body["criteria"][0]] * 2}, "unique"),
        ({**body, "criteria": [{"key": "Bad Key", "label": "x"}]}, "key"),
        ({**body, "criteria": []}, "criteria"),
    ]
    for payload, needle in bad:
        r = service.client.post("/criteria/dermatoscopy", json=payload, headers=service.admin)
        assert r.status_code == 422 and needle in r.text
    assert service.client.post("/criteria/dermatoscopy", json=body).status_code == 401
    assert (
        len(service.client.get("/criteria", headers=service.admin).json()) == 5
    )  # nothing else was stored


def test_label_config_and_the_seeds_rule() -> None:
    crits = [{"key": "cell_size", "label": "Cell size"}, {"key": "granules", "label": "Gran<ules"}]
    root = ET.fromstring(label_config(crits))
    names = [c.get("name") for c in root.iter("Choices")]
    assert names == ["crit_cell_size", "crit_granules", "overall"]
    assert [c.get("value") for c in root.iter("Choice")][:3] == ["pass", "fail", "na"]
    assert "$expected_class" in label_config(crits) and root.find("Image").get("value") == "$image"

    def result(cell: str, gran: str, overall: str) -> list[dict]:
        return [
            {"from_name": "crit_cell_size", "value": {"choices": [cell]}},
            {"from_name": "crit_granules", "value": {"choices": [gran]}},
            {"from_name": "overall", "value": {"choices": [overall]}},
            {"from_name": "comment", "value": {"text": ["odd halo"]}},
        ]

    keys = ["cell_size", "granules"]
    assert parse_result(result("pass", "na", "plausible"), keys)["plausible"] is True
    one_fail = parse_result(result("fail", "pass", "plausible"), keys)  # the rule overrides
    assert one_fail["plausible"] is False and one_fail["criteria"]["cell_size"] == "fail"
    assert parse_result(result("pass", "pass", "implausible"), keys)["plausible"] is False
    assert parse_result(result("pass", "pass", "plausible"), keys)["comment"] == "odd halo"
    back = parse_result(annotation_result({"cell_size": "pass", "granules": "fail"}), keys)
    assert back["criteria"] == {"cell_size": "pass", "granules": "fail"}
    assert back["overall"] == "implausible" and back["plausible"] is False


def seed(domain: str | None = "toy", images: int = 3) -> list[int]:
    """A dataset with two ready models of both modes and one batch each."""
    with get_sessionmaker()() as s:
        return review_batches(s, domain, images)


def task_count() -> int:
    with get_sessionmaker()() as s:
        return s.scalar(select(func.count(ReviewTask.id))) or 0


def test_review_requests(service, monkeypatch) -> None:
    from conftest import reset_service_caches

    batches = seed()
    r = service.client.post("/reviews", json={"batch_ids": batches}, headers=service.admin)
    assert r.status_code == 409 and "PROTOMED_LABEL_STUDIO_URL" in r.text
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    nodomain = seed(domain=None)
    empty = seed(domain="toy-empty", images=0)
    cases = [
        ({"batch_ids": [4242]}, 404, "no batch with id 4242"),
        ({"batch_ids": nodomain}, 422, "give 'domain'"),
        ({"batch_ids": nodomain, "domain": "retina"}, 422, "known: blood, bone-marrow"),
        ({"batch_ids": empty, "domain": "toy"}, 422, "has no images"),
        ({"batch_ids": []}, 422, "batch_ids"),
        ({"batch_ids": [2**31]}, 422, "batch_ids"),
    ]
    for body, code, needle in cases:
        r = service.client.post("/reviews", json=body, headers=service.admin)
        assert r.status_code == code and needle in r.text, (body, r.text)
    assert task_count() == 0
    r = service.client.post("/reviews", json={"batch_ids": batches}, headers=service.admin)
    assert r.status_code == 202, r.text
    assert r.json()["added"] == 6 and r.json()["job"]["kind"] == "review_sync"
    again = service.client.post("/reviews", json={"batch_ids": batches}, headers=service.admin)
    assert again.json()["added"] == 0 and task_count() == 6  # no image twice in a project
    with get_sessionmaker()() as s:
        tasks = s.scalars(select(ReviewTask).order_by(ReviewTask.position)).all()
        tokens = [t.token for t in tasks]
        first = tasks[0].image
        png = __import__("api.storage", fromlist=["x"]).get_storage().get_bytes(first.storage_key)
    assert len(set(tokens)) == 6 and all(len(t) >= 32 for t in tokens)
    img = service.client.get(f"/review-images/{tokens[0]}")  # no key: Label Studio's editor
    assert img.status_code == 200 and img.content != png  # re-encoded (test_blinding.py)
    assert img.content.startswith(b"\x89PNG") and len(img.content) > 50
    assert img.headers["access-control-allow-origin"] == "*"  # Label Studio loads it via CORS
    assert service.client.get("/review-images/not-a-token").status_code == 404


def test_webhook_refused_without_configured_secret(service) -> None:
    payload = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]}
    r = service.client.post("/reviews/webhook", json=payload, headers={"X-Protomed-Secret": "x"})
    assert r.status_code == 403


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_empty_report(service, fmt: str) -> None:
    r = service.client.get("/reports/plausibility", params={"format": fmt}, headers=service.admin)
    assert r.status_code == 200
    if fmt == "json":
        assert r.json()["classes"] == [] and r.json()["agreement"] is None
    else:
        assert r.text.startswith("class")
    assert (
        service.client.get(
            "/reports/plausibility", params={"models": "x"}, headers=service.admin
        ).status_code
        == 422
    )
