"""An expert study against a real Label Studio (started by .ci/run; skips without it, like
test_reviews): the study's own project has maximum_annotations = overlap and uniform sampling;
two readers who signed up through the organisation's invite link submit their own annotations
with their own tokens; the sync pulls them and the report says the study is complete."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ls_readers import Reader, invite_token, sign_up
from service_procs import wait_job
from test_reviews import AUTH, Base, base, broker, ls_settings, seed_batches, verdict_result

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
