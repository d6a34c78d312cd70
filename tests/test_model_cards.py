"""Model cards (GET /models/{id}/card, the dashboard's card page, ``protomed card``): training
data with its licence carried over, encoder, configuration, training time, expert plausibility
with the image as unit, intended use and limits; and a dataset's licence recorded at
registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from conftest import REPO, Service
from factories import add_batch, add_image, add_model, add_review, add_review_task, create

from ml.data.toy import write_toy_dataset
from service.db.models import Job, JobKind, JobStatus, Model, utc_now
from service.db.session import get_sessionmaker

LICENCE = "CC BY-NC-SA 4.0"
NASTY = "<script>alert('x')</script>"
ENCODER = "ViT-B-32/untrained(seed=0)"
SHA = "ab" * 32
EVALUATION = {"job_id": 99, "as": "prototype", "f1": 0.42, "fd": 0.031}


def register(service: Service, name: str, licence: str | None, n_per_class: int = 2) -> dict:
    write_toy_dataset(service.data_root / name, n_per_class=n_per_class, size=16, seed=0)
    body = {"name": name, "path": name, **({"licence": licence} if licence else {})}
    r = service.client.post("/datasets", json=body, headers=service.admin)
    assert r.status_code == 201, r.text
    return r.json()


def trained_model(dataset_id: int, verdicts: list[list[bool]]) -> int:
    """A ready prototype model of the dataset, trained by a finished job of 90 s, with one
    batch of class 'lymphocyte' whose image i got the verdicts ``verdicts[i]`` (one per
    reviewer)."""
    start = utc_now() - timedelta(minutes=5)

    def build(session):  # type: ignore[no-untyped-def]
        metrics = {
            "steps": 40,
            "final_loss": 0.0123,
            "encoder": ENCODER,
            "checkpoint_sha256": SHA,
            "prototypes": {"k": 2},
            "selection": {"n_per_class": 30, "n_heldout": 10, "seed": 3},
            "evaluations": [EVALUATION],
        }
        model = add_model(
            session,
            dataset_id=dataset_id,
            mode="prototype",
            preset="cpu-small",
            config={"image_size": 32, "lr": 0.001},
            metrics=metrics,
            classes=["lymphocyte", "neutrophil"],
        )
        session.add(
            Job(
                kind=JobKind.train,
                model=model,
                status=JobStatus.succeeded,
                started_at=start,
                finished_at=start + timedelta(seconds=90),
            )
        )
        batch = add_batch(session, model, class_name="lymphocyte", n=max(1, len(verdicts)))
        from service.criteria import ensure_defaults, latest
        from service.reviews import project_for

        ensure_defaults(session)
        project = project_for(session, latest(session, "toy"))  # one per criteria set
        for i, votes in enumerate(verdicts):
            task = add_review_task(session, project, add_image(session, batch, index=i))
            for r, ok in enumerate(votes):
                add_review(
                    session,
                    task,
                    ls_annotation_id=10_000 * model.id + 100 * i + r,
                    reviewer=f"r{r}",
                    plausible=ok,
                )
        return model

    return create(build)


def test_a_dataset_licence_is_recorded_and_carried_into_the_card(service: Service) -> None:
    ds = register(service, "toy", LICENCE)
    assert (
        service.client.get(f"/datasets/{ds['id']}", headers=service.admin).json()["licence"]
        == LICENCE
    )
    # 3 images; three reviewers agree on each: 2 of 3 plausible, counted per image
    model_id = trained_model(ds["id"], [[True] * 3, [True] * 3, [False] * 3])
    r = service.client.get(f"/models/{model_id}/card", headers=service.admin)
    assert r.status_code == 200, r.text
    card = r.json()
    data, training = card["training_data"], card["training"]
    assert data["licence"] == LICENCE and data["name"] == "toy"
    assert (data["n_per_class"], data["n_heldout"], data["split_seed"]) == (30, 10, 3)
    assert "non-commercial use only" in card["licence_notice"]
    assert "same licence" in card["licence_notice"] and LICENCE in card["licence_notice"]
    assert training["encoder"] == ENCODER and training["checkpoint_sha256"] == SHA
    assert training["seconds"] == 90 and training["steps"] == 40
    assert "K=2" in training["class_table"]
    assert card["evaluations"] == [{"job_id": 99, "role": "prototype", "f1": 0.42, "fd": 0.031}]
    [row] = card["plausibility"]
    assert (row["class_name"], row["images"], row["plausible"]) == ("lymphocyte", 3, 2)
    from scipy.stats import binomtest

    ci = binomtest(2, 3).proportion_ci(method="wilson")
    assert row["ci"] == pytest.approx([ci.low, ci.high])  # images, not 9 verdicts
    assert any("UNTRAINED" in limit for limit in card["limits"])
    assert "diagnosis" in " ".join(card["limits"]) and "synthetic" in card["intended_use"]
    assert card["guidance"] == {} and card["sweeps"] == []
    put = service.client.put(
        f"/models/{model_id}/guidance",
        json={"defaults": {"lymphocyte": 3.5}},
        headers=service.admin,
    )
    assert put.status_code == 200, put.text
    card = service.client.get(f"/models/{model_id}/card", headers=service.admin).json()
    assert card["guidance"] == {"lymphocyte": 3.5}  # the scale /generate uses

    md = service.client.get(f"/models/{model_id}/card?format=markdown", headers=service.admin)
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    for needle in (
        "## Training data",
        f"- Licence: {LICENCE}",
        "## Expert plausibility",
        "| lymphocyte | 3 | 2 | 66.7% |",
        "## Limits",
        f"Checkpoint sha256: {SHA}",
        "- Per-class defaults: lymphocyte 3.5",
        "Training time: 1.5 min",
        "No audit yet",
    ):
        assert needle in md.text, needle


def test_no_licence_says_so_and_the_card_is_guarded(service: Service) -> None:
    ds = register(service, "nolicence", None)
    model_id = trained_model(ds["id"], [])
    card = service.client.get(f"/models/{model_id}/card", headers=service.admin).json()
    assert card["training_data"]["licence"] is None
    assert "was not recorded" in card["licence_notice"] and card["plausibility"] == []
    r = service.client.get("/models/424242/card", headers=service.admin)
    assert r.status_code == 404 and "no model with id 424242" in r.text
    made = service.client.post(
        "/keys", json={"name": "rev", "role": "reviewer"}, headers=service.admin
    )
    reviewer = {"Authorization": f"Bearer {made.json()['key']}"}
    assert service.client.get(f"/models/{model_id}/card", headers=reviewer).status_code == 403
    assert service.client.get(f"/models/{model_id}/card").status_code == 401
    bad = service.client.get(f"/models/{model_id}/card?format=pdf", headers=service.admin)
    assert bad.status_code == 422 and "markdown" in bad.text
    schema = service.client.app.openapi()["paths"]["/models/{model_id}/card"]["get"]
    ref = schema["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ModelCard")


def test_dashboard_card_page_escapes_stored_text(service: Service) -> None:
    ds = register(service, "nasty", NASTY)
    model_id = trained_model(ds["id"], [[True]])
    page = service.client.get(f"/ui/models/{model_id}/card", headers=service.admin)
    assert page.status_code == 200
    assert "<h2>Training data</h2>" in page.text and "<table>" in page.text
    assert NASTY not in page.text and "&lt;script&gt;" in page.text
    model_page = service.client.get(f"/ui/models/{model_id}", headers=service.admin).text
    assert f"/ui/models/{model_id}/card" in model_page


def test_cli_prints_the_card(service: Service) -> None:
    ds = register(service, "cli", LICENCE)
    model_id = trained_model(ds["id"], [[True, False]])
    env = {**os.environ, **service.env, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "protomed_cli", "card"]
    out = subprocess.run([*cmd, str(model_id)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"# Model card: protomed model {model_id} (prototype)")
    assert f"- Licence: {LICENCE}" in out.stdout and "| lymphocyte | 1 | 0 | 0.0% |" in out.stdout
    as_json = subprocess.run(
        [*cmd, str(model_id), "--format", "json"], env=env, capture_output=True, text=True
    )
    assert json.loads(as_json.stdout)["training_data"]["licence"] == LICENCE
    missing = subprocess.run([*cmd, "424242"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no model with id 424242")
    assert "Traceback" not in missing.stderr
    with get_sessionmaker()() as s:  # nothing was written by reading a card
        assert s.get(Model, model_id) is not None


@pytest.mark.slow
def test_card_page_in_a_browser_runs_no_stored_markup(service: Service, tmp_path) -> None:
    """In Chromium: a licence string that would run script if rendered as HTML shows as text
    and runs nothing; a plain card renders its tables (the README's picture)."""
    from browser import dashboard
    from test_dashboard import shot_path

    attack = '<img src=x onerror="window.pwned=1">'
    nasty = trained_model(register(service, "attack", attack)["id"], [[True]])
    votes = [[True, True], [True, False], [False, False], [True, True], [True], [False, True]]
    plain = trained_model(register(service, "cells-demo", LICENCE, 40)["id"], votes)
    with dashboard(service.env, tmp_path / "api.log", f"/ui/models/{nasty}/card") as page:
        page.wait_for_load_state("load")
        assert page.evaluate("window.pwned") is None  # the onerror never ran
        assert page.locator("main img, article img").count() == 0
        assert attack in page.locator("body").inner_text()  # shown as the text it is
        page.goto(f"/ui/models/{plain}/card")
        assert page.locator("h2", has_text="Training data").count() == 1
        body = page.locator("body").inner_text()
        assert "non-commercial" in body and "lymphocyte" in body
        page.screenshot(path=shot_path(tmp_path, "dashboard_card.png"), full_page=True)
