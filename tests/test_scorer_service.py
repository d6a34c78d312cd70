"""Plausibility scorers through the service, without a worker: the verdicts a scorer learns
(each image's majority, ties implausible, over every project of the domain), ``POST``/``GET
/scorers`` (404/409 that say what to do, readers only: reviewers 403), the retrain rule and its
idempotence, ``POST /generate?filter=plausible`` (409 without a scorer, 422 for bad filter
values, the filter recorded on the batch), the dashboard page and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import Service
from factories import add_batch, add_dataset, add_image, add_model, add_review, add_review_task
from test_blinding import key
from typer.testing import CliRunner

from ml.scorer import fit_scorer
from service.config import get_settings
from service.criteria import add_version, latest
from service.db.models import Batch, Job, JobKind, JobStatus, Scorer
from service.db.session import get_sessionmaker
from service.reviews import project_for
from service.scorers import due_domains, retrain_due, reviewed_count, reviewed_images

ANN = iter(range(1, 10**6))


def reviewed(n: int, domain: str = "toy", votes: list[list[bool]] | None = None) -> int:
    """A ready model of a ``domain`` dataset with ``n`` stored images, each reviewed in the
    domain's current project (``votes[i]``: the verdicts of image i's reviewers; default one
    reviewer, alternating); returns the model id."""
    rng = np.random.default_rng(n)
    with get_sessionmaker()() as s:
        ds = add_dataset(s, classes=["lymphocyte", "neutrophil"], domain=domain)
        model = add_model(s, ds, checkpoint_path="models/x/checkpoint.pt")
        batch = add_batch(s, model, n=n)
        criteria = latest(s, domain)
        assert criteria is not None
        project = project_for(s, criteria)
        for i in range(n):
            from factories import png_bytes

            data = png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            task = add_review_task(s, project, add_image(s, batch, index=i, data=data, store=True))
            for r, verdict in enumerate(votes[i] if votes else [i % 2 == 0]):
                add_review(s, task, ls_annotation_id=next(ANN), reviewer=f"r{r}", plausible=verdict)
        s.commit()
        return model.id


TINY = "protomed-tiny-vit|untrained-seed0|gelu|float32"  # the test settings' encoder


def add_scorer(
    domain: str = "toy", n_images: int = 60, version: int = 1, encoder: str = TINY
) -> int:
    """A scorer row with a real report (fitted on synthetic embeddings), no worker needed."""
    rng = np.random.default_rng(version)
    x = rng.normal(size=(60, 8))
    y = (x[:, 0] > 0).astype(int)
    _fitted, metrics = fit_scorer(x, y, ["lymphocyte", "neutrophil"] * 30, "tiny|untrained")
    with get_sessionmaker()() as s:
        row = Scorer(
            domain=domain,
            version=version,
            encoder=encoder,
            artefact_key=f"scorers/{domain}/v{version}.safetensors",
            n_images=n_images,
            n_plausible=metrics.cv.n_plausible,
            metrics=metrics.model_dump(mode="json"),
        )
        s.add(row)
        s.commit()
        return row.id


def test_an_image_is_plausible_when_most_of_its_reviewers_said_so(service: Service) -> None:
    votes = [[True], [False], [True, False], [True, True, False], [False, False, True]]
    reviewed(5, votes=votes)
    with get_sessionmaker()() as s:
        # a new criteria version is a second project of the same domain: its verdicts count too
        project = project_for(s, add_version(s, "toy", "v2", [{"key": "shape", "label": "Shape"}]))
        img = reviewed_images(s, "toy")[0]
        from service.db.models import Image

        image = s.get(Image, img.image_id)
        assert image is not None
        add_review(
            s,
            add_review_task(s, project, image),
            ls_annotation_id=next(ANN),
            reviewer="other",
            plausible=False,
        )
        s.commit()
        got = reviewed_images(s, "toy")
        assert reviewed_count(s, "toy") == 5
    # image 0: [True] + another project's False = a tie = implausible; image 2: tie; image 3: 2/3
    assert [r.plausible for r in got] == [False, False, False, True, False]
    assert [r.reviews for r in got] == [2, 1, 2, 3, 3]


def test_scorer_requests_before_there_is_one(service: Service) -> None:
    admin = service.admin
    reviewer, viewer = key(service, "reviewer"), key(service, "viewer")
    assert service.client.get("/scorers", headers=admin).json() == []
    r = service.client.post("/scorers", json={"domain": "nope"}, headers=admin)
    assert r.status_code == 404 and "known:" in r.text and "toy" in r.text, r.text
    r = service.client.post("/scorers", json={"domain": "toy"}, headers=admin)
    assert r.status_code == 409 and "0 reviewed images" in r.text and "at least 20" in r.text
    r = service.client.post("/scorers", json={"domain": "toy", "x": 1}, headers=admin)
    assert r.status_code == 422
    for method, url in (("get", "/scorers"), ("get", "/scorers/1"), ("post", "/scorers")):
        r = service.client.request(method, url, json={"domain": "toy"}, headers=reviewer)
        assert r.status_code == 403 and "reviewer" in r.text, (url, r.text)
    r = service.client.post("/scorers", json={"domain": "toy"}, headers=viewer)
    assert r.status_code == 403
    r = service.client.get("/scorers/7", headers=viewer)
    assert r.status_code == 404 and "GET /scorers" in r.text

    reviewed(24)
    r = service.client.post("/scorers", json={"domain": "toy"}, headers=admin)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "score" and job["params"] == {"domain": "toy"}
    again = service.client.post("/scorers", json={"domain": "toy"}, headers=admin)
    assert again.status_code == 409 and f"job {job['id']}" in again.text


def test_a_learned_scorer_needs_a_model_trained_with_a_learned_encoder(service, monkeypatch):
    """With the learned encoder for scorers and no model of the domain trained with one, the
    score job fails saying what to do, and no scorer is stored."""
    from workers.tasks import run_job

    reviewed(24)  # its model has no codebook
    monkeypatch.setenv("PROTOMED_SCORER_ENCODER", "learned")
    get_settings.cache_clear()
    r = service.client.post("/scorers", json={"domain": "toy"}, headers=service.admin)
    assert r.status_code == 202, r.text
    assert run_job(r.json()["id"], "score", "test@host:1") == "failed"
    job = service.client.get(f"/jobs/{r.json()['id']}", headers=service.admin).json()
    assert "no ready model of domain 'toy' was trained with a learned encoder" in job["error"]
    assert "PROTOMED_SCORER_ENCODER=clip" in job["error"]
    with get_sessionmaker()() as s:
        assert s.query(Scorer).count() == 0


def test_retraining_is_queued_once_enough_new_verdicts_arrived(service: Service) -> None:
    settings = get_settings()
    reviewed(settings.scorer_min_images - 1)
    with get_sessionmaker()() as s:
        assert due_domains(s, settings) == []  # too few for a first scorer
    reviewed(1)
    with get_sessionmaker()() as s:
        assert due_domains(s, settings) == ["toy"]
        first = retrain_due(s, settings)
        assert [j.params for j in first] == [{"domain": "toy"}]
        assert retrain_due(s, settings) == []  # idempotent: one is queued already
        job = s.get(Job, first[0].id)
        assert job is not None
        job.status = JobStatus.succeeded
        s.commit()
    add_scorer(n_images=settings.scorer_min_images)
    with get_sessionmaker()() as s:
        assert due_domains(s, settings) == []  # the scorer covers every reviewed image
    reviewed(settings.scorer_retrain_after - 1)
    with get_sessionmaker()() as s:
        assert due_domains(s, settings) == []
    reviewed(1)
    with get_sessionmaker()() as s:
        assert due_domains(s, settings) == ["toy"]
        assert len(retrain_due(s, settings)) == 1
        assert retrain_due(s, settings) == []
        jobs = s.query(Job).filter(Job.kind == JobKind.score).all()
        assert len(jobs) == 2


def test_generate_with_the_plausible_filter(service: Service) -> None:
    admin, url = service.admin, "/generate"
    with get_sessionmaker()() as s:
        plain = add_model(s, add_dataset(s, classes=["a"]), checkpoint_path="m/c.pt").id
        s.commit()
    toy = reviewed(4)
    base = {"class": "lymphocyte", "n": 5, "model_id": toy}
    r = service.client.post(url, params={**base, "filter": "plausible"}, headers=admin)
    assert r.status_code == 409 and "no plausibility scorer yet" in r.text, r.text
    detail = r.json()["detail"]
    assert 'POST /scorers {"domain": "toy"}' in detail and "protomed scorer train toy" in detail
    r = service.client.post(
        url, params={"class": "a", "model_id": plain, "filter": "plausible"}, headers=admin
    )
    assert r.status_code == 409 and "no review domain" in r.text, r.text
    bad = [
        ({"filter": "best"}, "filter"),
        ({"threshold": 0.5}, "only with filter=plausible"),
        ({"oversample": 2}, "only with filter=plausible"),
        ({"filter": "plausible", "threshold": 1.5}, "threshold"),
        ({"filter": "plausible", "oversample": 0}, "oversample"),
        ({"filter": "plausible", "oversample": 11}, "oversample must be between 1 and 10"),
        ({"filter": "plausible", "n": 400, "oversample": 3}, "at most 1000 per request"),
    ]
    for params, message in bad:
        r = service.client.post(url, params={**base, **params}, headers=admin)
        assert r.status_code == 422 and message in r.text, (params, r.text)
    with get_sessionmaker()() as s:
        assert s.query(Batch).count() == 1  # nothing was created by a refused request

    add_scorer(encoder="ViT-L-14|openai|quickgelu|float16")
    r = service.client.post(url, params={**base, "filter": "plausible"}, headers=admin)
    assert r.status_code == 409 and "trained on ViT-L-14 embeddings" in r.text, r.text
    scorer = add_scorer(version=2)  # the newest version counts
    r = service.client.post(
        url, params={**base, "filter": "plausible", "threshold": 0.6}, headers=admin
    )
    assert r.status_code == 202, r.text
    batch = r.json()["batch"]
    assert batch["filter"] == {"kind": "plausible", "oversample": 3, "threshold": 0.6}
    assert batch["drawn"] is None and batch["scorer_id"] is None  # set when the job ran
    r = service.client.post(url, params=base, headers=admin)
    assert r.status_code == 202 and r.json()["batch"]["filter"] is None
    assert scorer


def test_scorer_reads_dashboard_and_cli(service: Service) -> None:
    from protomed_cli.main import app

    old, new = add_scorer(version=1), add_scorer(version=2)
    admin, viewer = service.admin, key(service, "viewer")
    listed = service.client.get("/scorers", params={"domain": "toy"}, headers=viewer).json()
    assert [(s["id"], s["latest"]) for s in listed] == [(new, True), (old, False)]
    one = service.client.get(f"/scorers/{old}", headers=viewer).json()
    cv = one["metrics"]["cv"]
    assert cv["auc"] > 0.9 and len(cv["auc_ci"]) == 2 and cv["n"] == 60
    assert sum(b["count"] for b in cv["calibration"]) == 60 and one["n_images"] == 60

    page = service.client.get(f"/ui/scorers/{old}", headers=admin)
    assert page.status_code == 200
    assert f"{cv['auc']:.3f}" in page.text and 'id="calibration-chart"' in page.text
    assert page.text.count('class="bin"') == len(cv["calibration"])
    reviewer = key(service, "reviewer")
    assert service.client.get(f"/ui/scorers/{old}", headers=reviewer).status_code == 403
    assert "No scorer with id 999" in service.client.get("/ui/scorers/999", headers=admin).text
    home = service.client.get("/ui", headers=admin).text
    assert 'id="scorers"' in home and f"/ui/scorers/{new}" in home

    runner = CliRunner()
    r = runner.invoke(app, ["scorer", "show", str(old)])
    assert r.exit_code == 0, r.output
    assert f"AUC: {cv['auc']:.3f}" in r.output and "trained on 60 reviewed images" in r.output
    rows = [ln for ln in r.output.splitlines() if ln.startswith("  0.")]
    assert len(rows) == len(cv["calibration"])
    r = runner.invoke(app, ["scorer", "list"])
    assert r.exit_code == 0 and r.output.count("toy") == 2
    r = runner.invoke(app, ["scorer", "show", "999"])
    assert r.exit_code == 2 and r.output.startswith("error: no scorer with id 999"), r.output
    r = runner.invoke(app, ["scorer", "train", "nope"])
    assert r.exit_code == 2 and "unknown review domain 'nope'" in r.output, r.output


@pytest.mark.parametrize("missing", ["threshold"])
def test_batch_filter_refuses_unknown_fields(missing: str) -> None:
    from pydantic import ValidationError

    from service.payloads import BatchFilter

    with pytest.raises(ValidationError):
        BatchFilter.model_validate({"kind": "plausible", "oversample": 2, "top": 3})
    assert BatchFilter(oversample=2).model_dump()[missing] is None


def test_the_scorer_page_in_a_real_browser(service: Service, tmp_path: Path) -> None:
    """The scorer page in Chromium after logging in: the AUC, one point per calibration bin
    placed at its observed share (SVG y grows downwards), the diagonal, the bins table."""
    from browser import dashboard
    from test_dashboard import shot_path

    scorer_id = add_scorer()
    cv = service.client.get(f"/scorers/{scorer_id}", headers=service.admin).json()["metrics"]["cv"]
    with dashboard(service.env, tmp_path / "api.log", f"/ui/scorers/{scorer_id}") as page:
        assert f"{cv['auc']:.3f}" in page.locator("#scorer-auc").inner_text()
        assert "Untrained encoder" in page.locator("#untrained-caveat").inner_text()
        ys = [
            float(c.get_attribute("cy") or "nan")
            for c in page.locator("#calibration-chart circle").all()
        ]
        observed = [b["observed"] for b in cv["calibration"]]
        assert ys == pytest.approx([16 + 240 * (1 - o) for o in observed])
        assert page.locator("#calibration-bins tbody tr").count() == len(observed)
        page.screenshot(path=shot_path(tmp_path, "dashboard_scorer.png"), full_page=True)
