"""Review endpoints in-process (no Label Studio needed): criteria sets and their versions, the
labelling interface, the seed's rule, and every bad review request answering 4xx without
changing anything. The Label Studio round trip is in test_reviews.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from factories import add_review, review_batches
from sqlalchemy import func, select

from ml.data.toy import CRITERIA
from service.criteria import annotation_result, label_config, parse_result
from service.db.models import ReviewTask
from service.db.session import get_sessionmaker


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
    # Label Studio stores whatever its API is sent (any user can post results outside the
    # labelling interface): choices outside the interface's, or of the wrong type, count as not
    # given, and no shape of result makes the verdict (or the report) fail; a verdict not given
    # is incomplete (None), never plausible.
    odd = [
        {"from_name": "crit_cell_size", "value": {"choices": ["maybe"]}},
        {"from_name": "crit_granules", "value": {"choices": [{"x": 1}]}},
        {"from_name": "overall", "value": {"choices": [["plausible"]]}},
        {"from_name": "comment", "value": {"text": [1, None, "ok"]}},
        {"from_name": ["crit_cell_size"], "value": "fail"},
        {"from_name": "crit_granules", "value": {"choices": "fail"}},
        "not an item",
        None,
    ]
    got = parse_result(odd, keys)
    assert got == {
        "criteria": {},
        "overall": None,
        "comment": "ok",
        "plausible": None,
        "answered_synthetic": None,
        "origin_confidence": None,
    }
    assert parse_result({"not": "a list"}, keys)["criteria"] == {}  # type: ignore[arg-type]


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
        png = (
            __import__("service.storage", fromlist=["x"]).get_storage().get_bytes(first.storage_key)
        )
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


SECRET = "webhook-secret-for-tests"
HOOK = {"X-Protomed-Secret": SECRET}


@pytest.fixture
def hooked(service, monkeypatch):
    """The service with a webhook secret, and a Label Studio address where nothing listens
    (port 9, discard): a webhook that needs Label Studio finds it unreachable."""
    from conftest import reset_service_caches

    monkeypatch.setenv("PROTOMED_REVIEW_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_TOKEN", "unused-token")
    reset_service_caches()
    return service


def created(ann: object) -> dict:
    return {"action": "ANNOTATION_CREATED", "annotation": ann}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (created({"id": "abc"}), "annotation.id"),
        (created({"id": 10**25}), "annotation.id"),
        (created({"id": 2**31}), "2147483647"),
        (created({"id": 0}), "annotation.id"),
        (created({"id": 1.5}), "annotation.id"),
        (created({"id": True}), "annotation.id"),
        (created({"id": None}), "annotation.id"),
        (created({"task": 1}), "annotation.id"),
        (created([{"id": 1}]), "annotation"),
        (created("1"), "annotation"),
        ({"action": "ANNOTATION_UPDATED"}, "annotation"),
        ({"annotation": {"id": 1}}, "action"),
        ({"action": "PROJECT_DELETED", "project": {"id": 1}}, "ANNOTATIONS_DELETED"),
        ({"action": 7, "annotation": {"id": 1}}, "action"),
        ({"action": "ANNOTATIONS_DELETED"}, "annotations"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": {"id": 1}}, "annotations"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": ["1"]}, "annotations"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "abc"}]}, "annotations"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 10**25}]}, "annotations"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{}]}, "annotations"),
        ([{"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}], "body"),
        ("ANNOTATION_CREATED", "body"),
    ],
)
def test_malformed_webhook_bodies_answer_422(hooked, body: object, needle: str) -> None:
    """Whatever a caller holding the secret posts, a malformed event is a 422 naming the field
    (never a 500), and nothing is stored or queued."""
    r = hooked.client.post("/reviews/webhook", json=body, headers=HOOK)
    assert r.status_code == 422, (body, r.status_code, r.text)
    said = " ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in r.json()["detail"])
    assert needle in said, (body, said)
    assert job_count() == 0


def test_webhook_secret_is_checked_before_the_body(hooked) -> None:
    for headers in ({}, {"X-Protomed-Secret": "guess"}):
        r = hooked.client.post("/reviews/webhook", json=created({"id": "abc"}), headers=headers)
        assert r.status_code == 403 and "X-Protomed-Secret" in r.text
    r = hooked.client.post("/reviews/webhook", content=b"{not json", headers=HOOK)
    assert r.status_code == 422


def job_count() -> int:
    from service.db.models import Job

    with get_sessionmaker()() as s:
        return s.scalar(select(func.count(Job.id))) or 0


def reviewed_project() -> list[int]:
    """A project that has reached Label Studio (project 77, tasks 1000...) with two stored
    verdicts, annotations 5 (reviewer 7, alice) and 6 (reviewer 8, bob), on the same image
    of the baseline batch. Returns the two annotation ids."""
    from service.reviews import request_review

    batches = seed()
    with get_sessionmaker()() as s:
        project, tasks = request_review(s, batches, None)
        project.ls_project_id = 77
        for i, task in enumerate(tasks):
            task.ls_task_id = 1000 + i
        first = min(tasks, key=lambda t: t.image_id)
        for ann, user, email in ((5, "7", "Alice@Example.org"), (6, "8", "bob@example.org")):
            add_review(s, first, ls_annotation_id=ann, reviewer=user, reviewer_email=email)
        s.commit()
    return [5, 6]


def verdicts() -> dict[int, tuple]:
    from service.db.models import Review

    with get_sessionmaker()() as s:
        rows = s.scalars(select(Review)).all()
        return {r.ls_annotation_id: (r.task_id, r.reviewer, r.plausible, r.criteria) for r in rows}


def test_webhook_while_label_studio_is_unreachable_queues_a_pull(hooked) -> None:
    """Label Studio never resends a webhook: when protomed cannot read the annotation back, it
    answers 202 with a review_sync job that pulls once Label Studio answers, changes nothing
    itself, and does not pile up jobs for a burst of events."""
    from service.db.models import Job

    reviewed_project()
    before = verdicts()
    # an unknown annotation's deletion needs no reading: nothing of ours to remove
    gone = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 999}, {"id": 999}]}
    r = hooked.client.post("/reviews/webhook", json=gone, headers=HOOK)
    assert r.status_code == 200, r.text
    assert r.json() | {"detail": None} == {
        "action": "ANNOTATIONS_DELETED",
        "applied": 0,
        "removed": 0,
        "ignored": 1,
        "queued": [],
        "detail": None,
    }
    assert job_count() == 0
    forged = {"action": "ANNOTATION_UPDATED", "annotation": {"id": 5, "result": [], "task": 1000}}
    r = hooked.client.post("/reviews/webhook", json=forged, headers=HOOK)
    assert r.status_code == 202, r.text
    queued = r.json()["queued"]
    assert len(queued) == 1 and "Label Studio could not be read" in r.json()["detail"]
    for body in (forged, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 5}]}):
        r = hooked.client.post("/reviews/webhook", json=body, headers=HOOK)
        assert r.status_code == 202 and r.json()["queued"] == queued, r.text
    with get_sessionmaker()() as s:
        jobs = s.scalars(select(Job)).all()
        assert [(j.id, j.kind, j.status, j.requested_by) for j in jobs] == [
            (queued[0], "review_sync", "queued", "webhook")
        ]
    assert verdicts() == before


def test_bulk_deletion_event_is_left_to_a_pull(hooked, monkeypatch) -> None:
    """An event naming more annotations than MAX_WEBHOOK_READS (a bulk deletion in Label
    Studio) is not read one by one: a pull of the projects decides, and nothing is removed on
    the event's word."""
    import api.routes.reviews as routes

    monkeypatch.setattr(routes, "MAX_WEBHOOK_READS", 1)
    ids = reviewed_project()
    before = verdicts()
    body = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids]}
    r = hooked.client.post("/reviews/webhook", json=body, headers=HOOK)
    assert r.status_code == 202 and len(r.json()["queued"]) == 1, r.text
    assert "pulled" in r.json()["detail"] and r.json()["removed"] == 0
    assert verdicts() == before and job_count() == 1


def test_report_reviewer_filter_takes_the_id_or_the_email(service) -> None:
    reviewed_project()

    def reviews(who: str) -> int:
        r = service.client.get(
            "/reports/plausibility", params={"reviewer": who}, headers=service.admin
        )
        assert r.status_code == 200, r.text
        return sum(m["reviews"] for m in r.json()["average"]["pooled"].values())

    assert reviews("7") == reviews("Alice@Example.org") == reviews("alice@example.org") == 1
    assert reviews("8") == reviews("bob@example.org") == 1
    assert reviews("carol@example.org") == reviews("9") == 0


def test_label_studio_errors_are_told_without_its_headers() -> None:
    """The sdk's ApiError text carries Label Studio's response headers (a session cookie):
    job errors and webhook answers give the status only."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    from service.label_studio import reason

    exc = ApiError(status_code=502, headers={"set-cookie": "sessionid=s3cr3t"}, body="bad gw")
    assert reason(exc) == "Label Studio answered 502"
    assert "s3cr3t" in str(exc)  # what was told before
    assert reason(httpx.ConnectError("[Errno 111] Connection refused")) == (
        "[Errno 111] Connection refused"
    )
