"""Guidance sweeps without a worker: the report's counting and the recommendation rule on
hand-made verdicts with known Wilson bounds, the diversity figure, the API's refusals (bad
scales, unknown class, model not ready, too many images, reviewer keys), the report, apply and
the per-class defaults as POST /generate uses them, the dashboard page, the CLI, and the
migration on PostgreSQL and SQLite. The whole loop with a worker and Label Studio is
tests/test_sweep_e2e.py."""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from conftest import Service, alembic_config, make_service, reset_service_caches
from factories import (
    add_dataset,
    add_image,
    add_model,
    add_review,
    add_review_task,
    png_bytes,
)
from sqlalchemy import inspect, select, text
from test_blinding import key
from typer.testing import CliRunner

from service.db.models import Batch, Job, JobStatus, ReviewSample, ReviewTask, Sweep
from service.db.session import get_sessionmaker, make_engine
from service.reports import Judgement
from service.sweep_report import (
    Cell,
    mean_pairwise_distance,
    pixels,
    sweep_report,
)

CLASSES = ("lymphocyte", "neutrophil")
ANNOTATIONS = itertools.count(1)  # Label Studio annotation ids, unique per process

# --- the report's counting and the rule, on hand-made verdicts ------------------------------------

# Wilson 95% intervals as published (e.g. Newcombe 1998, Table I; Brown, Cai & DasGupta 2001)
WILSON = {
    (5, 10): (0.2366, 0.7634),
    (8, 10): (0.4902, 0.9433),
    (10, 10): (0.7225, 1.0),
    (4, 5): (0.3755, 0.9638),
    (16, 20): (0.5840, 0.9193),
}


def verdicts(batch: int, votes: list[list[bool]], start: int = 0) -> list[Judgement]:
    """One list of reviewers' votes per image (image ids from ``batch * 1000 + start``)."""
    return [
        Judgement(batch * 1000 + start + i, "c", 1, "", f"r{r}", ok, {})
        for i, image in enumerate(votes)
        for r, ok in enumerate(image)
    ]


def one_class(counts: dict[float, tuple[int, int]], min_images: int = 5) -> Any:
    """A sweep report of one class from (plausible, images) per scale, one reviewer each."""
    cells, judged = [], {}
    for b, (scale, (k, n)) in enumerate(counts.items(), start=1):
        cells.append(Cell("c", scale, b, n, None))
        judged[b] = verdicts(b, [[True]] * k + [[False]] * (n - k))
    rep = sweep_report(
        sweep_id=1,
        model_id=1,
        classes=["c"],
        scales=list(counts),
        n=10,
        seed=0,
        steps=20,
        scheduler="dpm++sde",
        cells=cells,
        judgements=judged,
        min_images=min_images,
    )
    return rep.classes[0]


def test_highest_wilson_lower_bound_wins_and_a_tie_goes_to_the_smaller_scale() -> None:
    row = one_class({1.0: (5, 10), 2.0: (8, 10), 5.0: (10, 10), 3.5: (10, 10)})
    assert [e.scale for e in row.scales] == [1.0, 2.0, 3.5, 5.0]  # sorted
    for e in row.scales:
        p = e.plausibility
        assert p.ci == pytest.approx(WILSON[(p.plausible, p.images)], abs=1e-4)
    # 3.5 and 5 tie at 10/10: the smaller scale keeps more diversity
    assert row.recommended == 3.5
    # 10/10's lower bound (72%) does not clear 8/10's upper one (94%): no clear winner
    assert row.separated is False and "not a clear winner" in row.reason
    assert "10/10 plausible at 3.5" in row.reason


def test_a_surer_rate_beats_the_same_rate_on_fewer_images() -> None:
    """80% of 20 images (lower bound 58%) beats 80% of 5 (38%): the bound, not the rate."""
    row = one_class({1.0: (4, 5), 2.0: (16, 20)})
    assert row.recommended == 2.0
    assert row.scales[0].plausibility.ci == pytest.approx(WILSON[(4, 5)], abs=1e-4)


def test_a_clear_winner_is_called_separated() -> None:
    row = one_class({1.0: (0, 10), 3.0: (10, 10)})
    assert row.recommended == 3.0 and row.separated is True


def test_no_recommendation_with_too_few_images_or_nothing_plausible() -> None:
    few = one_class({1.0: (4, 4), 2.0: (3, 10)})  # 4 images < 5 at scale 1
    assert few.recommended is None and few.separated is None
    assert few.reason.startswith("1 of 2 scales have 5 or more reviewed images")
    none = one_class({1.0: (0, 10), 2.0: (0, 10)})
    assert none.recommended is None and "no image" in none.reason
    assert one_class({1.0: (4, 4), 2.0: (3, 4)}, min_images=4).recommended == 1.0


def test_the_image_is_the_unit_majority_of_its_reviewers_a_tie_implausible() -> None:
    votes = [
        [True, True, False],  # 2 of 3: plausible
        [True, False],  # a tie: implausible
        [True, True],  # plausible
        [False, False, True],  # implausible
        [False],  # implausible
    ]
    js = verdicts(1, votes)
    js += [Judgement(1000, "c", 1, "", "r0", True, {})]  # r0 again on image 1000: counts once
    rep = sweep_report(
        sweep_id=1,
        model_id=1,
        classes=["c"],
        scales=[1.0, 2.0],
        n=5,
        seed=0,
        steps=20,
        scheduler="ddim",
        cells=[Cell("c", 1.0, 1, 5, 0.25), Cell("c", 2.0, 2, 5, None)],
        judgements={1: js},
        min_images=1,
    )
    cell, empty = rep.classes[0].scales
    p = cell.plausibility
    assert (p.images, p.plausible, p.ties, p.reviews) == (5, 2, 1, len(js))
    assert p.rate == pytest.approx(0.4) and cell.diversity == 0.25
    assert (empty.plausibility.images, empty.plausibility.rate) == (0, None)
    assert empty.plausibility.ci == (0.0, 1.0)
    assert "tie counts as implausible" in rep.methods.consensus


def test_diversity_is_the_mean_pairwise_rms_pixel_distance() -> None:
    grey = np.full((4, 4, 3), 64, np.uint8)
    same = [pixels(png_bytes(grey)) for _ in range(3)]
    assert mean_pairwise_distance(same) == 0.0
    assert mean_pairwise_distance(same[:1]) is None
    lighter = pixels(png_bytes(grey + 51))  # 51/255 = 0.2 brighter everywhere
    # pairs: (grey, grey) 0, (grey, lighter) 0.2 twice
    assert mean_pairwise_distance([*same[:2], lighter]) == pytest.approx(0.4 / 3)
    with pytest.raises(ValueError, match="differ in size"):
        mean_pairwise_distance([same[0], pixels(png_bytes(np.zeros((2, 2, 3), np.uint8)))])


# --- through the API ------------------------------------------------------------------------------


def ready_model(status: str = "ready") -> int:
    """A toy-domain dataset and a model of it (no checkpoint needed: no worker runs here)."""
    with get_sessionmaker()() as s:
        ds = add_dataset(s, classes=CLASSES, domain="toy")
        model = add_model(s, ds, status=status, checkpoint_path="models/x/checkpoint.pt")
        s.commit()
        return model.id


def start(service: Service, model: int, **body: Any) -> Any:
    return service.client.post(f"/models/{model}/sweeps", json=body, headers=service.admin)


@pytest.fixture
def small_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    with make_service(tmp_path, monkeypatch, PROTOMED_MAX_IMAGES_PER_REQUEST="20") as svc:
        yield svc


def test_a_sweep_refuses_what_it_cannot_do(small_limit: Service) -> None:
    service, model = small_limit, ready_model()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"scales": [2.0]}, 422, "scales"),  # one scale compares nothing
        ({"scales": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, 422, "scales"),
        ({"scales": [1.0, 1.0]}, 422, "distinct"),
        ({"scales": [1.0, 25.0]}, 422, "less than or equal to 20"),
        ({"scales": [-1.0, 2.0]}, 422, "greater than or equal to 0"),
        ({"classes": ["eosinophil"]}, 422, "unknown class 'eosinophil'; model"),
        ({"classes": ["lymphocyte", "lymphocyte"]}, 422, "must not repeat"),
        ({"classes": []}, 422, "classes"),
        ({"n": 0}, 422, "n"),
        ({"n": 3}, 422, "2 classes x 4 scales x 3 images = 24, over the limit of 20"),
        ({"scheduler": "euler"}, 422, "scheduler"),
        ({"guidance": 2}, 422, "guidance"),  # no stray fields
    ]
    for body, code, needle in cases:
        r = start(service, model, **body)
        assert r.status_code == code and needle in r.text, (body, r.status_code, r.text)
    r = start(service, ready_model(status="training"), n=1)
    assert r.status_code == 409 and "is training, not ready" in r.text
    assert start(service, 4242, n=1).status_code == 404
    with get_sessionmaker()() as s:  # nothing was left behind by the refusals
        assert s.scalar(select(Sweep.id)) is None and s.scalar(select(Batch.id)) is None


def test_a_sweep_queues_one_paired_batch_per_class_and_scale(service: Service) -> None:
    model = ready_model()
    r = start(service, model, scales=[5, 1, 2.5], n=3, seed=7, scheduler="ddim")
    assert r.status_code == 202, r.text
    sweep, jobs = r.json()["sweep"], r.json()["jobs"]
    assert sweep["scales"] == [1.0, 2.5, 5.0] and sweep["classes"] == list(CLASSES)
    assert sweep["steps"] == 50 and sweep["n"] == 3 and sweep["seed"] == 7
    cells = [(b["class_name"], b["scale"]) for b in sweep["batches"]]
    assert cells == [(c, s) for c in CLASSES for s in (1.0, 2.5, 5.0)]
    assert len(jobs) == 6 and {j["kind"] for j in jobs} == {"sample"}
    assert {j["status"] for j in jobs} == {"queued"}
    for b in sweep["batches"]:
        batch = service.client.get(f"/batches/{b['batch_id']}", headers=service.admin).json()
        # paired: the same seed at every scale, only the guidance differs
        assert (batch["seed"], batch["guidance"], batch["sweep_id"]) == (7, b["scale"], sweep["id"])
    assert service.client.get(f"/sweeps/{sweep['id']}", headers=service.admin).json() == sweep
    listed = service.client.get(f"/models/{model}/sweeps", headers=service.admin).json()
    assert [s["id"] for s in listed] == [sweep["id"]]
    r = start(service, model)  # defaults: every class at 1, 2, 3.5, 5, 8 images each
    assert r.status_code == 202 and r.json()["sweep"]["scales"] == [1.0, 2.0, 3.5, 5.0]
    assert len(r.json()["jobs"]) == 8 and r.json()["sweep"]["n"] == 8


def reviewed_sweep(service: Service, outcomes: dict[tuple[str, float], list[bool]]) -> int:
    """A sweep whose batches hold stored images, each reviewed once with the given verdict
    (as Label Studio's verdicts come in): built in the database, no worker."""
    model = ready_model()
    scales = sorted({s for _, s in outcomes})
    r = start(service, model, scales=scales, n=len(next(iter(outcomes.values()))))
    assert r.status_code == 202, r.text
    sweep_id = r.json()["sweep"]["id"]
    rng = np.random.default_rng(0)
    with get_sessionmaker()() as s:
        from service.criteria import latest
        from service.reviews import project_for

        criteria = latest(s, "toy")
        assert criteria is not None
        project = project_for(s, criteria)
        sweep = s.get(Sweep, sweep_id)
        assert sweep is not None
        for batch in sweep.batches:
            for i, ok in enumerate(outcomes[(batch.class_name, batch.guidance)]):
                pixels_ = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                img = add_image(s, batch, index=i, data=png_bytes(pixels_), store=True)
                task = add_review_task(s, project, img)
                add_review(s, task, ls_annotation_id=next(ANNOTATIONS), reviewer="7", plausible=ok)
            assert batch.job is not None
            batch.job.status = JobStatus.succeeded
        s.commit()
    return sweep_id


OUTCOMES = {
    ("lymphocyte", 1.0): [True] * 2 + [False] * 4,
    ("lymphocyte", 3.0): [True] * 6,
    ("neutrophil", 1.0): [True] * 5 + [False],
    ("neutrophil", 3.0): [True] * 5 + [False],
}


def test_report_apply_and_generate_with_the_class_defaults(service: Service) -> None:
    sweep_id = reviewed_sweep(service, OUTCOMES)
    admin = service.admin
    rep = service.client.get(f"/sweeps/{sweep_id}/report", headers=admin).json()
    rows = {c["class"]: c for c in rep["classes"]}
    got = {
        (c, e["scale"]): (e["plausibility"]["plausible"], e["plausibility"]["images"])
        for c, row in rows.items()
        for e in row["scales"]
    }
    assert got == {k: (sum(v), len(v)) for k, v in OUTCOMES.items()}
    assert all(e["diversity"] > 0.1 for row in rows.values() for e in row["scales"])
    assert rows["lymphocyte"]["recommended"] == 3.0
    assert rows["neutrophil"]["recommended"] == 1.0  # 5/6 at both: the smaller scale
    assert "Wilson 95% lower bound" in rep["methods"]["rule"] and rep["min_images"] == 5
    csv_text = service.client.get(f"/sweeps/{sweep_id}/report?format=csv", headers=admin).text
    table = list(csv.reader(io.StringIO(csv_text)))
    assert table[0][:3] == ["class", "guidance", "batch"]
    assert ["lymphocyte", "3", *table[2][2:6], "6", "0", "100.00"] == table[2][:9]
    assert table[2][-1] == "yes" and table[1][-1] == ""

    model = rep["model_id"]
    generate = {"class": "lymphocyte", "n": 1, "model_id": model}
    r = service.client.post("/generate", params=generate, headers=admin)
    assert (r.json()["batch"]["guidance"], r.json()["guidance_source"]) == (2.0, "global default")
    r = service.client.post(f"/sweeps/{sweep_id}/apply", headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["set"] == {"lymphocyte": 3.0, "neutrophil": 1.0}
    guidance = service.client.get(f"/models/{model}/guidance", headers=admin).json()
    assert guidance == {
        "model_id": model,
        "defaults": {"lymphocyte": 3.0, "neutrophil": 1.0},
        "fallback": 2.0,
    }
    r = service.client.post("/generate", params=generate, headers=admin)
    assert r.status_code == 202 and r.json()["batch"]["guidance"] == 3.0
    assert r.json()["guidance_source"] == "model default"
    r = service.client.post("/generate", params={**generate, "guidance": 0.5}, headers=admin)
    assert (r.json()["batch"]["guidance"], r.json()["guidance_source"]) == (0.5, "query")
    # by hand: an override for one class, the other class falls back to the global default
    r = service.client.put(
        f"/models/{model}/guidance", json={"defaults": {"neutrophil": 4}}, headers=admin
    )
    assert r.status_code == 200 and r.json()["defaults"] == {"neutrophil": 4.0}
    r = service.client.post("/generate", params=generate, headers=admin)
    assert (r.json()["batch"]["guidance"], r.json()["guidance_source"]) == (2.0, "global default")
    r = service.client.post(
        f"/sweeps/{sweep_id}/apply", json={"scales": {"lymphocyte": 1.5}}, headers=admin
    )
    assert r.json()["defaults"] == {"neutrophil": 4.0, "lymphocyte": 1.5}
    for body, needle in (
        ({"defaults": {"eosinophil": 2}}, "unknown class 'eosinophil'"),
        ({"defaults": {"neutrophil": 21}}, "less than or equal to 20"),
        ({"defaults": {"neutrophil": 2}, "extra": 1}, "extra"),
    ):
        r = service.client.put(f"/models/{model}/guidance", json=body, headers=admin)
        assert r.status_code == 422 and needle in r.text, r.text
    r = service.client.post(f"/sweeps/{sweep_id}/apply", json={"scales": {"x": 1}}, headers=admin)
    assert r.status_code == 422 and "unknown class 'x'" in r.text
    assert service.client.get(f"/models/{model}/guidance", headers=admin).json()["defaults"] == {
        "neutrophil": 4.0,
        "lymphocyte": 1.5,
    }

    page = service.client.get(f"/ui/sweeps/{sweep_id}", headers=admin)
    assert page.status_code == 200
    assert page.text.count('class="chart scale-chart"') == 2
    assert page.text.count('class="rate-point recommended"') == 2
    assert "Wilson 95% lower bound" in page.text and "6/6" in page.text
    batch_page = service.client.get(
        f"/ui/batches/{rows['lymphocyte']['scales'][0]['batch_id']}", headers=admin
    ).text
    assert f"guidance sweep #{sweep_id}" in batch_page
    model_page = service.client.get(f"/ui/models/{model}", headers=admin).text
    assert f"/ui/sweeps/{sweep_id}" in model_page and "lymphocyte 1.5" in model_page


def test_apply_without_any_recommendation_is_a_conflict(service: Service) -> None:
    few = {
        ("lymphocyte", 1.0): [True] * 3,
        ("lymphocyte", 2.0): [True] * 3,
        ("neutrophil", 1.0): [True] * 3,
        ("neutrophil", 2.0): [False] * 3,
    }
    sweep_id = reviewed_sweep(service, few)
    r = service.client.post(f"/sweeps/{sweep_id}/apply", headers=service.admin)
    assert (
        r.status_code == 409 and "recommends no scale" in r.text and "the rule needs two" in r.text
    )


def test_sweeps_are_closed_to_reviewers(service: Service) -> None:
    """Every sweep read names batches and their guidance: reviewers get 403, viewers read but
    write nothing, no key gets 401."""
    sweep_id = reviewed_sweep(service, OUTCOMES)
    with get_sessionmaker()() as s:
        sweep = s.get(Sweep, sweep_id)
        assert sweep is not None
        model = sweep.model_id
    reads = [
        f"/sweeps/{sweep_id}",
        f"/sweeps/{sweep_id}/report",
        f"/sweeps/{sweep_id}/report?format=csv",
        f"/models/{model}/sweeps",
        f"/models/{model}/guidance",
        f"/ui/sweeps/{sweep_id}",
    ]
    writes = [
        ("post", f"/models/{model}/sweeps", {}),
        ("post", f"/sweeps/{sweep_id}/review", None),
        ("post", f"/sweeps/{sweep_id}/apply", None),
        ("put", f"/models/{model}/guidance", {"defaults": {}}),
    ]
    reviewer, viewer = key(service, "reviewer"), key(service, "viewer")
    for url in reads:
        r = service.client.get(url, headers=reviewer)
        assert r.status_code == 403 and "reviewer" in r.text, (url, r.status_code)
        assert service.client.get(url, headers=viewer).status_code == 200, url
        if not url.startswith("/ui"):
            assert service.client.get(url).status_code == 401, url
    for method, url, body in writes:
        for who in (reviewer, viewer):
            r = service.client.request(method, url, json=body, headers=who)
            assert r.status_code == 403, (url, r.status_code)
    assert service.client.get(f"/models/{model}/guidance", headers=viewer).json()["defaults"] == {}


def test_a_sweep_goes_to_review_blinded_and_shuffled(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.reviews import task_data

    sweep_id = reviewed_sweep(service, OUTCOMES)
    r = service.client.post(f"/sweeps/{sweep_id}/review", headers=service.admin)
    assert r.status_code == 409 and "PROTOMED_LABEL_STUDIO_URL" in r.text
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # never reached
    reset_service_caches()
    # a second sweep, not yet reviewed, of the same model's dataset domain
    model = ready_model()
    r = start(service, model, scales=[1, 2, 4], n=4)
    fresh = r.json()["sweep"]["id"]
    r = service.client.post(f"/sweeps/{fresh}/review", headers=service.admin)
    assert r.status_code == 409 and "still generating" in r.text
    rng = np.random.default_rng(1)
    with get_sessionmaker()() as s:
        sweep = s.get(Sweep, fresh)
        assert sweep is not None
        for batch in sweep.batches:
            for i in range(4):
                data = png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
                add_image(s, batch, index=i, data=data, store=True)
        s.commit()
    r = service.client.post(f"/sweeps/{fresh}/review", headers=service.admin)
    assert r.status_code == 202, r.text
    assert r.json()["added"] == 24 and r.json()["job"]["kind"] == "review_sync"
    with get_sessionmaker()() as s:
        sweep = s.get(Sweep, fresh)
        assert sweep is not None
        ids = {img.id for b in sweep.batches for img in b.images}
        tasks = [
            t
            for t in s.scalars(select(ReviewTask).order_by(ReviewTask.position))
            if t.image_id in ids
        ]
        assert len(tasks) == 24
        for t in tasks:
            data = task_data(t, "http://api")
            assert set(data) == {"image", "expected_class", "ref"}
            assert str(t.image.batch.guidance) not in data["image"]
        order = [t.image.batch.guidance for t in tasks]
        assert order != sorted(order)  # all scales shuffled together, not in blocks
        # every review image is re-encoded without metadata (tests/test_blinding.py)
        png = service.client.get(f"/review-images/{tasks[0].token}").content
        assert b"guidance" not in png and b"iTXt" not in png


# --- the CLI ------------------------------------------------------------------------------------


def test_the_cli_starts_reports_and_applies_a_sweep(service: Service) -> None:
    from protomed_cli.main import app

    runner = CliRunner()
    sweep_id = reviewed_sweep(service, OUTCOMES)
    r = runner.invoke(app, ["sweep", "report", str(sweep_id)])
    assert r.exit_code == 0, r.output
    assert "<- recommended" in r.output and "rule: per class" in r.output
    assert "6/6" in r.output
    r = runner.invoke(app, ["sweep", "report", str(sweep_id), "--format", "csv"])
    assert r.exit_code == 0 and r.output.startswith("class,guidance,batch")
    r = runner.invoke(app, ["sweep", "apply", str(sweep_id)])
    assert r.exit_code == 0, r.output
    assert "lymphocyte: guidance 3" in r.output and "neutrophil: guidance 1" in r.output
    r = runner.invoke(app, ["sweep", "apply", str(sweep_id), "--set", "neutrophil=2.5"])
    assert r.exit_code == 0 and "neutrophil: guidance 2.5" in r.output
    model = ready_model()
    r = runner.invoke(app, ["sweep", "start", str(model), "--scales", "1,4", "-n", "2"])
    assert r.exit_code == 0, r.output
    assert "2 classes x 2 scales (1, 4) x 2 images, 4 sample jobs queued" in r.output
    with get_sessionmaker()() as s:
        assert len(s.scalars(select(Job).where(Job.kind == "sample")).all()) >= 4
    for args, needle in (
        (["sweep", "start", str(model), "--scales", "1"], "scales"),
        (["sweep", "start", str(model), "--scales", "1,x"], "comma-separated numbers"),
        (["sweep", "start", str(model), "--classes", "eosinophil"], "unknown class"),
        (["sweep", "start", "4242"], "no model with id 4242"),
        (["sweep", "report", "4242"], "no sweep with id 4242"),
        (["sweep", "apply", str(sweep_id), "--set", "neutrophil"], "CLASS=SCALE"),
        (["sweep", "apply", str(sweep_id), "--set", "x=1"], "unknown class 'x'"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "error:" in r.output and needle in r.output, (args, r.output)
        assert "Traceback" not in r.output


# --- the migration ------------------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'protomed.db'}"


BEFORE = [
    "INSERT INTO datasets (name, root, layout, classes, counts, source) "
    "VALUES ('d', '/x', 'folder', '[\"a\"]', '{}', 'folder')",
    "INSERT INTO models (dataset_id, mode, classes, preset, config, status) "
    "VALUES (1, 'prototype', '[\"a\"]', 'tiny', '{}', 'ready')",
]
AFTER = [
    "INSERT INTO sweeps (model_id, classes, scales, n, seed, steps, scheduler) "
    "VALUES (1, '[\"a\"]', '[1, 2]', 2, 0, 5, 'ddim')",
    "INSERT INTO batches (model_id, class_name, n, guidance, steps, seed, scheduler, sweep_id) "
    "VALUES (1, 'a', 2, 1, 5, 0, 'ddim', 1)",
]


def test_migration_0009_adds_sweeps_and_removes_them(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0008")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:  # raw SQL before head: the ORM describes the newest schema
            for sql in BEFORE:
                conn.execute(text(sql))
        command.upgrade(cfg, "0009")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT guidance_defaults FROM models")).scalar() is None
            for sql in AFTER:
                conn.execute(text(sql))
        cols = {c["name"] for c in inspect(engine).get_columns("batches")}
        assert "sweep_id" in cols
        command.downgrade(cfg, "0008")
        insp = inspect(engine)
        assert "sweeps" not in insp.get_table_names()
        assert "sweep_id" not in {c["name"] for c in insp.get_columns("batches")}
        assert "guidance_defaults" not in {c["name"] for c in insp.get_columns("models")}
        with engine.connect() as conn:  # the sweep's batch stays, a plain batch now
            assert conn.execute(text("SELECT count(*) FROM batches")).scalar() == 1
    finally:
        engine.dispose()


def test_only_the_random_sample_counts(service: Service) -> None:
    """An image reviewed because a scorer was unsure of it (``uncertain``) stays out of the
    sweep's rates, as it stays out of the plausibility report's."""
    sweep_id = reviewed_sweep(service, OUTCOMES)
    with get_sessionmaker()() as s:
        sweep = s.get(Sweep, sweep_id)
        assert sweep is not None
        batch = next(b for b in sweep.batches if (b.class_name, b.guidance) == ("lymphocyte", 1.0))
        project = s.scalars(select(ReviewTask)).first()
        assert project is not None
        data = png_bytes(np.zeros((8, 8, 3), np.uint8))
        img = add_image(s, batch, index=99, data=data, store=True)
        task = add_review_task(s, project.project, img, sample=ReviewSample.uncertain)
        add_review(s, task, ls_annotation_id=next(ANNOTATIONS), reviewer="7", plausible=True)
        s.commit()
    rep = service.client.get(f"/sweeps/{sweep_id}/report", headers=service.admin).json()
    (row,) = [c for c in rep["classes"] if c["class"] == "lymphocyte"]
    low = row["scales"][0]["plausibility"]
    assert (low["images"], low["plausible"], low["reviews"]) == (6, 2, 6)
