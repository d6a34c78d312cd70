"""An expert study against a real Label Studio (started by .ci/run; skips without it, like
test_reviews): the study's own project has maximum_annotations = overlap and uniform sampling;
two readers who signed up through the organisation's invite link submit their own annotations
with their own tokens; the sync pulls them and the report says the study is complete."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from factories import add_batch, add_dataset, add_image, add_model, png_bytes, service_context
from ls_readers import Reader, invite_token, sign_up
from service_procs import wait_job
from test_reviews import (
    AUTH,
    CLASSES,
    Base,
    base,
    broker,
    ls_settings,
    seed_batches,
    verdict_result,
)

pytestmark = pytest.mark.slow
__all__ = ["base", "broker"]  # module fixtures shared with test_reviews


@pytest.fixture(scope="module")
def readers(base: Base) -> Iterator[list[Reader]]:
    url, token = ls_settings()
    invite = invite_token(url, token)
    made = [sign_up(url, invite) for _ in range(2)]
    try:
        yield made
    finally:
        for r in made:
            r.api.close()


def test_two_readers_complete_a_study(base: Base, readers: list[Reader]) -> None:
    _, batches, _ = seed_batches(base.env)
    ids = [batches[(m, c)] for m, c in sorted(batches)][:2]
    body = {
        "name": "e2e study",
        "batch_ids": ids,
        "readers": [r.email for r in readers],
        "overlap": 2,
    }
    r = base.api.post("/studies", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    created = r.json()
    wait_job(base.api, created["job_id"], worker=base.worker, timeout=120)
    study = base.api.get(f"/studies/{created['study']['id']}", headers=AUTH).json()
    ls_project = study["ls_project_id"]
    assert ls_project is not None
    project = base.ls.projects.get(ls_project)
    assert project.maximum_annotations == 2 and project.sampling == "Uniform sampling"
    assert project.show_skip_button is False
    tasks = base.ls.tasks.list(project=ls_project, fields="task_only")
    task_ids = [t.id for t in tasks]
    assert len(task_ids) == created["added"] == 12
    for i, reader in enumerate(readers):
        for n, task in enumerate(task_ids):
            plausible = (n + i) % 3 != 0
            ann = reader.api.post(
                f"/api/tasks/{task}/annotations/", json={"result": verdict_result(base, plausible)}
            )
            assert ann.status_code == 201, ann.text
    jobs = base.api.post("/reviews/sync", headers=AUTH).json()
    for job in jobs:
        wait_job(base.api, job["id"], worker=base.worker)
    rep = base.api.get(f"/studies/{study['id']}/report", headers=AUTH).json()
    assert rep["progress"]["complete"] is True, rep["progress"]
    assert rep["study"]["status"] == "complete"
    assert {p["reader"]: p["reads"] for p in rep["progress"]["readers"]} == {
        r.email: 12 for r in readers
    }
    assert rep["progress"]["not_counted"]["flagged"] == 0
    assert rep["pooled"]["agreement"]["kappa_units"] == 12


SPLIT = {"layout": "folder", "n_per_class": 5, "n_heldout": 2, "image_size": 32, "seed": 0}


def seed_with_heldout(env: dict[str, str]) -> tuple[int, list[int]]:
    """A toy dataset on disk under the service's data root (8 cells per class), a baseline and a
    prototype model whose recorded split trains on 5 of them (so 3 per class are held out), and
    per model and class of CLASSES a 3-image batch of drawn cells; returns the dataset id and
    the batch ids."""
    from ml.data.toy import TOY_CLASSES, draw_cell, write_toy_dataset
    from service.db.session import get_sessionmaker

    data = Path(json.loads(env["PROTOMED_DATA_ROOTS"])[0])
    root = write_toy_dataset(data / f"toy-{uuid.uuid4().hex[:8]}", n_per_class=8, size=32, seed=3)
    rng = np.random.default_rng(1)
    ids = []
    with service_context(env), get_sessionmaker()() as s:
        ds = add_dataset(s, root=str(root), classes=list(TOY_CLASSES), domain="toy")
        selection = {**SPLIT, "root": str(root), "classes": list(TOY_CLASSES)}
        for mode in ("baseline", "prototype"):
            model = add_model(s, ds, mode=mode, metrics={"selection": selection})
            for cls in CLASSES:
                batch = add_batch(s, model, class_name=cls, n=3, guidance=2)
                for i in range(3):
                    add_image(
                        s, batch, index=i, data=png_bytes(draw_cell(cls, rng, 32)), store=True
                    )
                ids.append(batch.id)
        s.commit()
        return ds.id, ids


def real_tasks(env: dict[str, str], ls_project: int) -> dict[int, bool]:
    """The truth a reader never sees: Label Studio task id -> whether its image is a real
    control."""
    from sqlalchemy import select

    from service.db.models import Batch, BatchSource, Image, ReviewProject, ReviewTask
    from service.db.session import get_sessionmaker

    with service_context(env), get_sessionmaker()() as s:
        rows = s.execute(
            select(ReviewTask.ls_task_id, Batch.source)
            .join(ReviewProject, ReviewTask.project_id == ReviewProject.id)
            .join(Image, ReviewTask.image_id == Image.id)
            .join(Batch, Image.batch_id == Batch.id)
            .where(ReviewProject.ls_project_id == ls_project)
        ).all()
    return {int(t): source == BatchSource.control for t, source in rows if t is not None}


def test_a_study_with_controls_and_the_origin_question(base: Base, readers: list[Reader]) -> None:
    """Controls, ask_origin and two readers at once: each reader posts plausibility and "real
    or synthetic?" with their own token (reader 1 always right, reader 2 always "synthetic");
    the report has the real rates, each model minus real and the readers' discrimination."""
    from service.criteria import annotation_result

    dataset, ids = seed_with_heldout(base.env)
    body = {
        "name": "e2e study with controls",
        "batch_ids": ids,
        "readers": [r.email for r in readers],
        "overlap": 2,
        "controls": {"dataset_id": dataset, "per_class": 2, "seed": 5},
        "ask_origin": True,
    }
    r = base.api.post("/studies", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["added"] == 12 + 4 and len(created["control_batch_ids"]) == 2
    assert 0 <= created["png_size_auc"] <= 1
    wait_job(base.api, created["job_id"], worker=base.worker, timeout=120)
    study = base.api.get(f"/studies/{created['study']['id']}", headers=AUTH).json()
    project = base.ls.projects.get(study["ls_project_id"])
    assert 'name="origin"' in project.label_config
    truth = real_tasks(base.env, study["ls_project_id"])
    assert len(truth) == 16 and sum(truth.values()) == 4
    keys = [c["key"] for c in base.api.get("/criteria/toy").json()["criteria"]]
    for i, reader in enumerate(readers):
        for n, (task, real) in enumerate(sorted(truth.items())):
            plausible = (n + i) % 4 != 0
            crits = dict.fromkeys(keys, "pass" if plausible else "fail")
            synthetic = not real if i == 0 else True
            result = annotation_result(crits, answered_synthetic=synthetic, origin_confidence=3)
            ann = reader.api.post(f"/api/tasks/{task}/annotations/", json={"result": result})
            assert ann.status_code == 201, ann.text
    for job in base.api.post("/reviews/sync", headers=AUTH).json():
        wait_job(base.api, job["id"], worker=base.worker)
    rep = base.api.get(f"/studies/{study['id']}/report", headers=AUTH).json()
    assert rep["progress"]["complete"] is True, rep["progress"]
    assert {p["reader"]: p["reads"] for p in rep["progress"]["readers"]} == {
        r.email: 16 for r in readers
    }
    assert [c["class"] for c in rep["classes"]] == sorted(CLASSES)
    for row in rep["classes"]:
        assert row["real"]["images"] == 2 and len(row["versus_real"]) == 2, row
        for mid, diff in row["versus_real"].items():
            rate = row["models"][mid]["plausible"] / row["models"][mid]["images"]
            assert diff["value"] == pytest.approx(rate - row["real"]["rate"])
    assert rep["pooled"]["real"]["images"] == 4
    d = rep["plausibility"]["discrimination"]
    assert d is not None and d["pooled"]["n"] == 32
    assert (d["pooled"]["synthetic"], d["pooled"]["real"]) == (24, 8)
    assert d["pooled"]["accuracy"]["k"] == 16 + 12
    by_reader = d["readers"]
    assert set(by_reader) == {r.email for r in readers}
    first, second = (by_reader[r.email] for r in readers)
    assert first["accuracy"]["k"] == 16 and first["auc"] == 1.0
    assert second["accuracy"]["k"] == 12 and second["specificity"]["k"] == 0
    assert second["auc"] == 0.5
    assert all(s["claim"] == "not shown to be indistinguishable" for s in by_reader.values())
