"""Expert studies without Label Studio (the request stops at the queued sync job): refusals,
and progress, agreement and the report from hand-built reads of two named readers, a reader the
study does not name and a read written in a reader's name. Kappa and alpha are computed by
hand in the test."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Service, reset_service_caches
from factories import add_review
from sqlalchemy import select
from test_review_controls import seed_study

from service.db.models import BatchSource, ReviewProject, ReviewTask, Study, StudyStatus
from service.db.session import get_sessionmaker
from service.studies import refresh_status

A, B, OTHER = "reader-a@lab.org", "reader-b@lab.org", "someone@lab.org"


@pytest.fixture
def ls(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service with a Label Studio address set (never reached)."""
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    return service


def post(service: Service, body: dict[str, Any]) -> Any:
    return service.client.post("/studies", json=body, headers=service.admin)


def body(batches: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": "pilot", "batch_ids": batches, "readers": [A, B], "overlap": 2, **extra}


def test_refusals(ls: Service) -> None:
    batches, _, _ = seed_study(ls, images=2)
    assert post(ls, body([*batches, 999_999])).status_code == 404
    r = post(ls, body(batches, overlap=3))
    assert r.status_code == 422 and "overlap" in r.text
    r = post(ls, body(batches, readers=[A, A.upper()]))
    assert r.status_code == 422 and "more than once" in r.text
    assert post(ls, body(batches, readers=["not-an-email"])).status_code == 422
    assert post(ls, body(batches, readers=[])).status_code == 422
    with get_sessionmaker()() as s:
        assert s.scalars(select(Study)).all() == []


def test_no_label_studio_is_a_conflict(service: Service) -> None:
    batches, _, _ = seed_study(service, images=2)
    r = post(service, body(batches))
    assert r.status_code == 409 and "Label Studio" in r.text


# (reader A, reader B) on the study's six images, in image id order
VERDICTS = [(True, True), (True, False), (False, False), (True, True), (False, True), (True, True)]


def test_progress_agreement_and_report(ls: Service) -> None:
    batches, dataset_id, _ = seed_study(ls, images=2)
    controls = {"dataset_id": dataset_id, "per_class": 2, "seed": 1}
    r = post(ls, body(batches, controls=controls, ask_origin=True))
    assert r.status_code == 202, r.text
    created = r.json()
    study_id = created["study"]["id"]
    assert created["added"] == 6 and len(created["control_batch_ids"]) == 1
    assert created["study"]["readers"] == [A, B] and created["study"]["ask_origin"] is True
    with get_sessionmaker()() as s:
        project = s.scalar(select(ReviewProject).where(ReviewProject.study_id == study_id))
        assert project is not None
        tasks = sorted(project.tasks, key=lambda t: t.image_id)
        assert len(tasks) == 6
        real = [t.image.batch.source == BatchSource.control for t in tasks]
        ann = iter(range(1, 100))
        for task, (a, b) in zip(tasks, VERDICTS, strict=True):
            add_review(
                s, task, ls_annotation_id=next(ann), reviewer="1", plausible=a, reviewer_email=A
            )
            if task is not tasks[-1]:
                add_review(
                    s,
                    task,
                    ls_annotation_id=next(ann),
                    reviewer="2",
                    plausible=b,
                    reviewer_email=B.upper(),
                )
        # a reader the study does not name, and a read in A's name written by someone else
        add_review(
            s,
            tasks[0],
            ls_annotation_id=next(ann),
            reviewer="3",
            plausible=False,
            reviewer_email=OTHER,
        )
        add_review(
            s,
            tasks[1],
            ls_annotation_id=next(ann),
            reviewer="1",
            plausible=False,
            reviewer_email=A,
            flagged=True,
        )
        s.commit()
        last = tasks[-1]

    progress = ls.client.get(f"/studies/{study_id}/report", headers=ls.admin).json()["progress"]
    assert progress["complete"] is False and progress["complete_images"] == 5
    assert progress["reads_needed"] == 12 and progress["reads_counted"] == 11
    by_reader = {p["reader"]: p for p in progress["readers"]}
    assert by_reader[A]["reads"] == 6 and by_reader[B]["reads"] == 5
    assert by_reader[B]["open_to_reader"] == 1 and by_reader[A]["open_to_reader"] == 0
    assert progress["not_counted"]["other_readers"] == 1
    assert progress["not_counted"]["other_reader_ids"] == [OTHER]
    assert progress["not_counted"]["flagged"] == 1

    with get_sessionmaker()() as s:
        task = s.get(ReviewTask, last.id)
        assert task is not None
        add_review(
            s, task, ls_annotation_id=500, reviewer="2", plausible=VERDICTS[-1][1], reviewer_email=B
        )
        project = s.scalar(select(ReviewProject).where(ReviewProject.study_id == study_id))
        assert project is not None
        refresh_status(s, project)
        s.commit()
        study = s.get(Study, study_id)
        assert study is not None and study.status == StudyStatus.complete

    rep = ls.client.get(f"/studies/{study_id}/report", headers=ls.admin).json()
    assert rep["progress"]["complete"] is True and rep["study"]["status"] == "complete"
    # by hand: 6 images x 2 readers, 4 agree. Fleiss: P = 4/6, p(yes) = 8/12, Pe = 5/9,
    # kappa = (2/3 - 5/9) / (4/9) = 0.25. Alpha: coincidences yes-yes 6, no-no 2, yes-no 2+2
    # (n = 12, n_yes = 8, n_no = 4): Do = 4/12, De = 2*8*4 / (12*11), alpha = 1 - Do/De = 0.3125.
    pooled = rep["pooled"]["agreement"]
    assert pooled["kappa"] == pytest.approx(0.25) and pooled["kappa_units"] == 6
    assert pooled["alpha"] == pytest.approx(0.3125) and pooled["alpha_reads"] == 12
    (cls,) = rep["classes"]
    assert cls["agreement"] == pooled
    # majority with a tie implausible: plausible only where both readers said so
    both = [a and b for a, b in VERDICTS]
    real_plausible = sum(p for p, is_real in zip(both, real, strict=True) if is_real)
    assert cls["real"]["images"] == 2 and cls["real"]["plausible"] == real_plausible
    synthetic = sum(cls["models"][str(m["id"])]["plausible"] for m in rep["models"])
    assert synthetic == sum(both) - real_plausible
    assert sum(cls["models"][str(m["id"])]["images"] for m in rep["models"]) == 4
    assert set(cls["versus_real"]) == {str(m["id"]) for m in rep["models"]}
    assert rep["plausibility"]["flagged"] == 0  # the flagged read is left out, not counted

    csv_text = ls.client.get(f"/studies/{study_id}/report?format=csv", headers=ls.admin).text
    assert "Fleiss kappa" in csv_text and "0.250" in csv_text and "0.312" in csv_text
    assert f"{A},6," in csv_text and "by readers the study does not name,1" in csv_text

    page = ls.client.get(f"/ui/studies/{study_id}", headers=ls.admin)
    assert page.status_code == 200
    assert 'id="study-chart"' in page.text and "real images" in page.text
    assert 'data-reader="reader-a@lab.org"' in page.text and "0.250" in page.text

    listed = ls.client.get("/studies", headers=ls.admin).json()
    assert [s["id"] for s in listed] == [study_id]
    assert ls.client.get(f"/studies/{study_id}", headers=ls.admin).json()["overlap"] == 2
    assert ls.client.get("/studies/999", headers=ls.admin).status_code == 404
    model_id = rep["models"][0]["id"]
    card = ls.client.get(f"/models/{model_id}/card", headers=ls.admin).json()
    assert card["studies"] == [study_id]


def test_a_study_gets_its_own_project_beside_the_shared_one(ls: Service) -> None:
    batches, _, _ = seed_study(ls, images=2)
    assert (
        ls.client.post("/reviews", json={"batch_ids": batches}, headers=ls.admin).status_code == 202
    )
    assert post(ls, body(batches)).status_code == 202
    assert post(ls, body(batches, name="second")).status_code == 202
    projects = ls.client.get("/reviews/projects", headers=ls.admin).json()
    assert len(projects) == 3 and {p["tasks"] for p in projects} == {4}


def test_a_study_that_asks_origin_gets_a_project_that_asks_it(ls: Service) -> None:
    """``ask_origin`` reaches the study's own project (whose Label Studio interface then asks
    "real or synthetic?"); a study without it gets a project that does not ask."""
    batches, _, _ = seed_study(ls, images=2)
    asked = post(ls, body(batches, ask_origin=True))
    plain = post(ls, body(batches, name="plain"))
    assert asked.status_code == plain.status_code == 202, (asked.text, plain.text)
    with get_sessionmaker()() as s:
        flags = {
            st.name: st.project.origin_question
            for st in s.scalars(select(Study))
            if st.project is not None
        }
    assert flags == {"pilot": True, "plain": False}


def test_openapi_publishes_the_study_schemas() -> None:
    from api.main import create_app

    spec = create_app().openapi()
    assert {"/studies", "/studies/{study_id}", "/studies/{study_id}/report"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"StudyRequest", "StudyReport", "StudyProgress", "ReaderProgress"} <= set(schemas)
