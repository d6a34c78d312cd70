"""The HTML dashboard (``/ui``): pages rendered in-process must show the exact numbers seeded
into the database, escaped; then a real headless Chromium against a real uvicorn checks what
only a browser can: the chart's geometry, live job progress without reloading, loaded images.

Seeded by hand through the ORM (no training, no Label Studio) so every rate is known: two toy
classes, a baseline and a prototype model with one 4-image batch per class each, and two
reviewers judging every image with the verdicts in ``VERDICTS``; and two finished evaluate
jobs whose results (``evaluation_result``) hold hand-made scores.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import ADMIN_KEY, REPO, Service, make_service
from factories import (
    add_batch,
    add_dataset,
    add_image,
    add_model,
    add_review,
    add_review_task,
    create,
    png_bytes,
)
from service_procs import ApiServer
from sqlalchemy.orm import Session

from ml.data.toy import draw_cell
from service.db.models import (
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Model,
    Review,
    ReviewProject,
    ReviewTask,
    utc_now,
)

CLASSES = ("lymphocyte", "neutrophil")
REVIEWERS = ("alice", "bob")
# (mode, class) -> each reviewer's verdict per image (4 images per batch; 1 = plausible). The
# report counts images: plausible when most of its reviewers say so, a tie counting as
# implausible, so with two reviewers an image is plausible when both say so.
VERDICTS: dict[tuple[str, str], tuple[list[int], list[int]]] = {
    ("baseline", "lymphocyte"): ([1, 1, 0, 0], [1, 0, 1, 0]),  # images 1/4 = 25%
    ("prototype", "lymphocyte"): ([1, 1, 1, 1], [1, 1, 1, 0]),  # 3/4 = 75%
    ("baseline", "neutrophil"): ([1, 0, 0, 0], [1, 0, 0, 0]),  # 1/4 = 25%
    ("prototype", "neutrophil"): ([1, 1, 1, 0], [1, 1, 0, 1]),  # 2/4 = 50%
}
RATES = {
    key: sum(2 * (x + y) > 2 for x, y in zip(a, b, strict=True)) / len(a)  # majority of 2
    for key, (a, b) in VERDICTS.items()
}
# The evaluation: each training set's per-seed F1 per class (seeds 0, 1, 2) and macro scores
# as (mean, sd) fractions; the page prints the macro ones as mean and sd columns in %.
EVAL_SEEDS = [0, 1, 2]
EVAL_F1: dict[str, dict[str, list[float]]] = {
    "real": {"lymphocyte": [0.84, 0.82, 0.80], "neutrophil": [0.79, 0.77, 0.81]},
    "baseline": {"lymphocyte": [0.55, 0.50, 0.60], "neutrophil": [0.45, 0.40, 0.44]},
    "prototype": {"lymphocyte": [0.74, 0.72, 0.70], "neutrophil": [0.68, 0.71, 0.71]},
}
EVAL_MACRO: dict[str, dict[str, tuple[float, float]]] = {
    "real": {"precision": (0.8120, 0.0150), "recall": (0.8010, 0.0110), "f1": (0.8050, 0.0130)},
    "baseline": {"precision": (0.5230, 0.0410), "recall": (0.5110, 0.0380), "f1": (0.4890, 0.0450)},
    "prototype": {
        "precision": (0.7250, 0.0140),
        "recall": (0.7180, 0.0100),
        "f1": (0.7110, 0.0120),
    },
}
UNTRAINED_ENCODER = "protomed-tiny-vit|untrained-seed0|gelu|float32"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NASTY = "<script>alert('x')</script>"  # in names and errors: must come out escaped
LS_PUBLIC = "https://review.example.org"
LS_PROJECT = 7


@dataclass
class Seeded:
    """Ids of the seeded rows the tests look for."""

    dataset: int
    models: dict[str, int]  # mode -> model id
    batches: dict[tuple[str, str], int]  # (mode, class) -> batch id
    running_job: int
    criteria_set: int
    evaluation: int  # the newest finished evaluate job (per-seed scores, untrained encoder)
    evaluation_means_only: int  # an older one: no per-seed runs, pretrained encoder, no toy


def add_reviews(
    session: Session, project: ReviewProject, images: list[Image], key: tuple[str, str]
) -> None:
    """Both reviewers judge every image; an implausible verdict fails 'granules' (the seed's
    rule), and bob leaves 'cell_size' not applicable so its n differs from the others'."""
    for image, *verdicts in zip(images, *VERDICTS[key], strict=True):
        task = add_review_task(session, project, image)
        for n, (reviewer, ok) in enumerate(zip(REVIEWERS, verdicts, strict=True)):
            criteria = {"cell_size": "pass" if reviewer == "alice" else "na", "nc_ratio": "pass"}
            criteria["granules"] = "pass" if ok else "fail"
            add_review(
                session,
                task,
                ls_annotation_id=image.id * 10 + n,
                reviewer=reviewer,
                plausible=bool(ok),
                criteria=criteria,
            )


def distance(fd: float | None, p: float, r: float, cons: float | None, n: int) -> dict:
    return {"fd": fd, "precision": p, "recall": r, "n_real": 40, "n_fake": n, "consistency": cons}


def evaluation_result() -> dict:
    """What ml.evaluation.evaluate.evaluate returns, with the numbers above (2 x 40 train, 2 x 10
    held out)."""
    sets = {}
    for name, per_class in EVAL_F1.items():
        runs = [
            {
                "seed": seed,
                "precision": 0.8,
                "recall": 0.8,
                "f1": 0.8,
                "accuracy": 0.8,
                "per_class": {
                    c: {"precision": f1[i], "recall": f1[i], "f1": f1[i], "support": 10}
                    for c, f1 in per_class.items()
                },
                "support": [10, 10],
                "confusion": [[8, 2], [2, 8]],
            }
            for i, seed in enumerate(EVAL_SEEDS)
        ]
        sets[name] = {
            "n_train": 80,
            "runs": runs,
            "mean": {k: m for k, (m, _) in EVAL_MACRO[name].items()} | {"accuracy": 0.8},
            "std": {k: sd for k, (_, sd) in EVAL_MACRO[name].items()} | {"accuracy": 0.01},
            "per_class_f1": {c: statistics.fmean(f1) for c, f1 in per_class.items()},
        }
    per_class = {  # per set: lymphocyte, neutrophil; one consistency absent (a dash)
        "real held-out": (distance(3.2109, 0.9, 0.8, 0.95, 10), distance(4.5, 0.8, 0.7, 0.9, 10)),
        "baseline": (distance(21.5, 0.5, 0.4, 0.55, 40), distance(30.25, 0.3, 0.2, None, 40)),
        "prototype": (distance(9.75, 0.8, 0.7, 0.9, 40), distance(11.0, 0.7, 0.6, 0.85, 40)),
    }
    overall = {
        "real held-out": distance(2.5, 0.8875, 0.75, 0.925, 20),
        "baseline": distance(18.3456, 0.4125, 0.3, 0.5, 80),
        "prototype": distance(7.8912, 0.775, 0.6625, 0.875, 80),
    }
    return {
        "classes": list(CLASSES),
        "selection": {"layout": "folder"},
        "n_train": dict.fromkeys(CLASSES, 40),
        "n_heldout": dict.fromkeys(CLASSES, 10),
        "encoder": UNTRAINED_ENCODER,
        "config": {
            "n_per_class": None,
            "steps": 50,
            "guidance": 2.0,
            "seeds": EVAL_SEEDS,
            "downstream": {"backbone": "small", "epochs": 30},
        },
        "models": {
            m: {"path": f"/runs/{m}", "step": 2000, "mode": m} for m in ("baseline", "prototype")
        },
        "downstream": {
            "classes": list(CLASSES),
            "seeds": EVAL_SEEDS,
            "n_test": 20,
            "config": {"backbone": "small", "epochs": 30},
            "sets": sets,
        },
        "distribution": {
            name: {
                "classes": list(CLASSES),
                "k": 3,
                "overall": overall[name],
                "per_class": dict(zip(CLASSES, per_class[name], strict=True)),
            }
            for name in overall
        },
        "toy_plausibility": {
            "real": {"lymphocyte": 0.95, "neutrophil": 0.9},
            "baseline": {"lymphocyte": 0.5, "neutrophil": 0.25},
            "prototype": {"lymphocyte": 0.875, "neutrophil": 0.75},
        },
        "seconds": 754.3,
    }


def evaluate_job(dataset: Dataset, models: dict[str, Model], result: dict) -> Job:
    params = {
        "dataset_id": dataset.id,
        "models": {m: models[m].id for m in models},
        "batches": {"baseline": [], "prototype": []},
        "config": {"seeds": EVAL_SEEDS, "downstream": {"backbone": "small", "epochs": 30}},
    }
    return Job(
        kind=JobKind.evaluate,
        status=JobStatus.succeeded,
        model=models["prototype"],
        params=params,
        result=result,
        progress=1.0,
        attempts=1,
        finished_at=utc_now(),
        requested_by="admin (bootstrap)",
    )


def seed(session: Session) -> Seeded:
    """The rows of the module docstring, images in storage, plus jobs in several states."""
    from service.criteria import ensure_defaults, latest

    ensure_defaults(session)
    criteria_set = latest(session, "toy")
    assert criteria_set is not None
    project = ReviewProject(criteria_set=criteria_set, ls_project_id=LS_PROJECT)
    dataset = add_dataset(
        session,
        name=f"toy {NASTY}",
        classes=CLASSES,
        counts=dict.fromkeys(CLASSES, 40),
        domain="toy",
    )
    rng = np.random.default_rng(0)
    models, batches, rows = {}, {}, {}
    for mode in ("baseline", "prototype"):
        model = add_model(
            session,
            dataset,
            mode=mode,
            config={"mode": mode},
            metrics={"steps": 2000, "final_loss": 0.0421 if mode == "baseline" else 0.0375},
        )
        train = Job(kind=JobKind.train, model=model, status=JobStatus.succeeded, progress=1.0)
        session.add(train)
        for cls in CLASSES:
            job = Job(kind=JobKind.sample, model=model, status=JobStatus.succeeded, progress=1.0)
            session.add(job)
            batch = add_batch(session, model, class_name=cls, n=4, job=job)
            pngs = [png_bytes(draw_cell(cls, rng, 64)) for _ in range(4)]
            images = [
                add_image(session, batch, index=i, data=data, store=True)
                for i, data in enumerate(pngs)
            ]
            add_reviews(session, project, images, (mode, cls))
            models[mode], batches[(mode, cls)] = model.id, batch.id
        rows[mode] = model
    running = Job(
        kind=JobKind.review_sync,
        status=JobStatus.running,
        progress=0.25,
        eta_s=90.0,
        attempts=1,
        started_at=utc_now(),
        requested_by="admin (bootstrap)",
    )
    failed = Job(
        kind=JobKind.prototypes,
        status=JobStatus.failed,
        progress=0.1,
        attempts=2,
        error=f"encoder crashed: {NASTY}",
        requested_by=f"ops {NASTY}",
    )
    means_only = copy.deepcopy(evaluation_result())
    means_only |= {"encoder": "ViT-L-14|openai|quickgelu|float16", "toy_plausibility": None}
    means_only |= {  # tested on an external folder (by the CLI: no registered dataset)
        "test_set": {
            "source": "external",
            "name": "site-b",
            "path": "/data/site-b",
            "layout": "folder",
            "n_per_class": dict.fromkeys(CLASSES, 10),
            "total": 20,
            "ignored_classes": ["basophil"],
        },
        "reference": "external test set site-b",
    }
    for entry in means_only["downstream"]["sets"].values():
        entry["runs"] = []
    older = evaluate_job(dataset, rows, means_only)
    given = [batches[("prototype", cls)] for cls in CLASSES]  # its prototype images were given
    older.params = {**older.params, "batches": {"baseline": [], "prototype": given}}
    session.add_all([project, running, failed, older])
    session.flush()  # the older evaluation gets the smaller id
    newest = evaluate_job(dataset, rows, evaluation_result())
    session.add(newest)
    session.commit()
    return Seeded(dataset.id, models, batches, running.id, criteria_set.id, newest.id, older.id)


@dataclass
class Dash:
    service: Service
    ids: Seeded


@pytest.fixture
def dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dash]:
    """The in-process service (as conftest's ``service``) with Label Studio links configured
    and the seeded rows."""
    from service.db.session import get_sessionmaker

    ls_links = {
        "PROTOMED_LABEL_STUDIO_URL": "http://label-studio.internal:8080",
        "PROTOMED_LABEL_STUDIO_PUBLIC_URL": LS_PUBLIC,
    }
    with make_service(tmp_path, monkeypatch, **ls_links) as service:
        with get_sessionmaker()() as session:
            ids = seed(session)
        login(service.client)  # pages and the JSON reads they link to go through the login cookie
        yield Dash(service, ids)


def login(client, key: str = ADMIN_KEY, next_url: str = "/ui") -> Any:
    """Log a test client in as a browser does: the form, then a session cookie."""
    r = client.post("/ui/login", data={"key": key, "next": next_url}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == next_url, r.text[:300]
    return r


def html(client, url: str, status: int = 200) -> str:
    res = client.get(url)
    assert res.status_code == status, res.text[:500]
    assert res.headers["content-type"].startswith("text/html")
    assert "<script>alert" not in res.text  # everything from the database is escaped
    return res.text


def text_of(page_html: str) -> str:
    """The page's visible-ish text with tags dropped and whitespace collapsed."""
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page_html)))


def test_pages_show_the_seeded_numbers(dash: Dash) -> None:
    from service.report_schemas import PlausibilityReport
    from service.reports import diff_cells, stratified_cells
    from service.statistics import cohen_kappa

    client, ids = dash.service.client, dash.ids
    base, proto = ids.models["baseline"], ids.models["prototype"]

    overview = html(client, "/ui")
    assert f'tr data-job-id="{ids.running_job}"' in overview
    assert "25%" in overview and "1 min 30 s" in overview  # progress, ETA
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in overview  # name, error, requester
    assert "0.0421" in overview and "0.0375" in overview and "2000" in overview
    assert f'href="{LS_PUBLIC}/projects/{LS_PROJECT}/data"' in overview
    assert "?limit=50" in overview  # the live poll asks for the jobs this page lists
    assert re.search(r"<td class=\"num\">16</td>\s*<td class=\"num\">32</td>", overview)

    report = html(client, "/ui/reports/plausibility")
    text = text_of(report)
    row = " ".join
    assert row(["lymphocyte", "25.00 (4)", "75.00 (4)", "50.00"]) in text  # n = images
    assert row(["neutrophil", "25.00 (4)", "50.00 (4)", "25.00"]) in text
    assert row(["Average (macro)", "25.00", "62.50", "37.50"]) in text
    assert row(["Pooled", "25.00 (8)", "62.50 (8)", "37.50"]) in text
    as_json = PlausibilityReport.model_validate(client.get("/reports/plausibility").json())
    for cls in as_json.classes:  # CI, p and Holm's p: the JSON report's, printed as the CSV
        assert row(diff_cells(cls.difference)) in text
    assert "p (Holm, 2 classes)" in text and "Holm-adjusted over the 2 classes compared" in text
    stratified = as_json.average.stratified
    assert stratified is not None and stratified.strata == list(CLASSES)
    assert row(["Pooled, stratified by class (CMH)", stratified_cells(as_json)[2]]) in text
    assert "Mantel-Haenszel common odds ratio" in text and "n = images" in text
    assert row(["Granules", "62.50 (16)", "18.75 (16)"]) in text  # 10/16 and 3/16 failed
    assert row(["Cell size", "0.00 (8)", "0.00 (8)"]) in text  # bob said n/a
    alice = [v for key in VERDICTS for v in VERDICTS[key][0]]
    bob = [v for key in VERDICTS for v in VERDICTS[key][1]]
    assert f"{cohen_kappa(alice, bob):.3f}" in text and "Cohen's kappa" in text
    assert "16 images rated by 2 reviewers" in text
    assert report.count('class="bar"') == 4 and report.count('class="whisker"') == 4
    assert "/reports/plausibility?format=csv" in report
    assert f"{LS_PUBLIC}/projects/{LS_PROJECT}/data" in report

    filtered = text_of(html(client, f"/ui/reports/plausibility?models={proto}&reviewer=alice"))
    assert row(["lymphocyte", "100.00 (4)"]) in filtered and "25.00 (4)" not in filtered
    empty_form = html(client, "/ui/reports/plausibility?dataset_id=&models=&criteria_set_id=")
    assert "75.00 (4)" in empty_form  # the form's empty "all" fields mean no filter
    assert "Bad filter" in html(client, "/ui/reports/plausibility?models=x", 422)

    batch = html(client, f"/ui/batches/{ids.batches[('prototype', 'neutrophil')]}")
    assert batch.count('<img src="/images/') == 4
    assert f'href="/batches/{ids.batches[("prototype", "neutrophil")]}/zip"' in batch
    model = text_of(html(client, f"/ui/models/{base}"))
    assert "lymphocyte · 1 batch, 4 images" in model and "neutrophil · 1 batch, 4 images" in model


def pm(mean: float, sd: float) -> str:
    """A score's mean and sd cells, in %."""
    return f"{100 * mean:.2f} {100 * sd:.2f}"


def test_evaluation_page_shows_the_seeded_result(dash: Dash) -> None:
    client, ids = dash.service.client, dash.ids
    base, proto, job = ids.models["baseline"], ids.models["prototype"], ids.evaluation
    row = " ".join

    overview = html(client, "/ui")
    assert 'href="/ui/reports/evaluation"' in overview  # the nav link
    assert f'href="/ui/reports/evaluation?job_id={job}"' in overview  # from the jobs table
    assert re.search(rf'data-job-id="{job}">\s*<td>#{job}</td>\s*<td>evaluate</td>', overview)

    page = html(client, "/ui/reports/evaluation")
    text = text_of(page)
    assert f"Evaluation report · job #{job}" in text  # the newest finished one
    m = EVAL_MACRO
    assert row(["real", *(pm(*m["real"][k]) for k in ("precision", "recall", "f1")), "80"]) in text
    assert (
        row(["baseline", f"model #{base}", "52.30", "4.10", "51.10", "3.80", "48.90", "4.50", "80"])
        in text
    )
    assert (
        row(
            [
                "prototype",
                f"model #{proto}",
                "72.50",
                "1.40",
                "71.80",
                "1.00",
                "71.10",
                "1.20",
                "80",
            ]
        )
        in text
    )
    assert text.index("real 81.20") < text.index("baseline model") < text.index("prototype model")
    assert "tested on the same 20 held-out real images" in text
    assert "as mean and sd over 3 seeds (0, 1, 2)" in text
    assert "lymphocyte: 40 train, 10 held out" in text and "small · 30 epochs" in text
    assert "Untrained encoder." in text and 'id="untrained-caveat"' in page
    assert UNTRAINED_ENCODER in text and "finished" in text and "12 min 34 s" in text
    assert "toy &lt;script&gt;" in page  # the dataset's name, escaped
    # the chart: one bar per (class, set), whiskers from the per-seed scores
    assert page.count('class="bar"') == 6 and page.count('class="whisker"') == 6
    assert 'data-class="neutrophil" data-set="baseline" data-f1="0.43' in page
    sd = statistics.stdev(EVAL_F1["baseline"]["lymphocyte"])
    assert f"lymphocyte · trained on baseline: F1 55.00% ± {100 * sd:.2f}" in text
    # CLIP space: overall, then per class in a collapsed <details>
    assert row(["real held-out", "2.5000", "0.8875", "0.7500", "0.9250", "40", "20"]) in text
    assert row(["prototype", "7.8912", "0.7750", "0.6625", "0.8750", "40", "80"]) in text
    details = page[page.index('<details id="distribution-per-class">') :]
    assert "<details id" in details and " open" not in details[: details.index(">")]
    assert row(["neutrophil", "real held-out", "4.5000"]) in text_of(details)
    assert row(["baseline", "30.2500", "0.3000", "0.2000", "—", "40", "40"]) in text_of(details)
    assert row(["prototype", "87.50", "75.00", "81.25"]) in text  # the toy checker, %
    # links: the JSON and CSV reports of this very job, and the job
    assert f'href="/reports/evaluation?job_id={job}"' in page
    assert f'href="/reports/evaluation?job_id={job}&amp;format=csv"' in page
    assert f'href="/jobs/{job}"' in page and f'href="/ui/models/{proto}"' in page
    csv = client.get(f"/reports/evaluation?job_id={job}&format=csv")
    assert csv.status_code == 200 and "prototype,72.50,1.40,71.80,1.00,71.10,1.20,80" in csv.text

    older = html(client, f"/ui/reports/evaluation?job_id={ids.evaluation_means_only}")
    assert f"job #{ids.evaluation_means_only}" in text_of(older)
    assert older.count('class="bar"') == 6 and 'class="whisker"' not in older  # means only
    assert "no whiskers" in older and "untrained-caveat" not in older and 'id="toy"' not in older
    older_text = text_of(older)
    assert "Test set external: site-b · 20 images (lymphocyte 10, neutrophil 10)" in older_text
    assert "ignored: basophil" in older_text
    assert "tested on the same 20 real images of the external test set site-b" in older_text
    assert "CLIP space · against the external test set site-b" in older_text
    assert "Test set the held-out part of the models' split" not in text  # an old result
    assert "71.10 1.20" in text_of(older)
    given = ", ".join(f"#{ids.batches[('prototype', c)]}" for c in CLASSES)
    tight = re.sub(r" ([,)])", r"\1", text_of(older))  # no space where a link closed
    assert f"prototype #{proto} (given batches {given})" in tight
    assert f'href="/ui/batches/{ids.batches[("prototype", "neutrophil")]}"' in older
    assert "given batches" not in text

    by_dataset = html(client, f"/ui/reports/evaluation?dataset_id={ids.dataset}&job_id=")
    assert f"job #{job}" in text_of(by_dataset)  # the form's empty field means none
    not_one = html(client, f"/ui/reports/evaluation?job_id={ids.running_job}")
    assert "No finished evaluation yet for these filters" in text_of(not_one)
    assert "Bad filter" in html(client, "/ui/reports/evaluation?job_id=x", 422)


def html_tables(page: str) -> dict[str, list[list[str]]]:
    """Each table of the page by its id (the per-class one by its <details>' id) as rows of
    cell texts, headers first."""
    found = re.findall(r'<table id="([\w-]+)">(.*?)</table>', page, re.S)
    found += re.findall(r'<details id="([\w-]+)">.*?<table>(.*?)</table>', page, re.S)
    cell = r"<t[hd][^>]*>(.*?)</t[hd]>"
    return {
        key: [
            [text_of(c).strip() for c in re.findall(cell, row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
        ]
        for key, body in found
    }


def test_evaluation_tables_agree_in_text_csv_and_html(dash: Dash) -> None:
    """The dashboard's tables, the CSV and the CLI's text hold the same cells, because all three
    render ml.schemas.evaluation.evaluation_tables of the stored result."""
    from ml.schemas.evaluation import EvaluationResult, evaluation_tables, tables_text

    client, job = dash.service.client, dash.ids.evaluation
    tables = evaluation_tables(EvaluationResult.model_validate(evaluation_result()))
    keys = ["downstream", "distribution", "distribution-per-class", "toy"]
    assert [t.key for t in tables] == keys
    csv_text = client.get(f"/reports/evaluation?job_id={job}&format=csv").text
    csv_rows = list(csv.reader(io.StringIO(csv_text)))
    text_rows = [re.split(r"\s{2,}", line.strip()) for line in tables_text(tables).splitlines()]
    shown = html_tables(html(client, f"/ui/reports/evaluation?job_id={job}"))
    for t in tables:
        assert t.headers in csv_rows and t.headers in text_rows, t.key
        assert shown[t.key][0] == t.headers and len(shown[t.key]) == len(t.rows) + 1, t.key
        for row, cells in zip(t.rows, shown[t.key][1:], strict=True):
            assert row in csv_rows and [c or "-" for c in row] in text_rows, (t.key, row)
            label = cells[0].split(" model #")[0]  # a model's row links to its page
            assert [label, *cells[1:]] == [c or "—" for c in row], (t.key, row)
    assert ["baseline", "52.30", "4.10", "51.10", "3.80", "48.90", "4.50", "80"] in csv_rows
    assert ["neutrophil", "baseline", "30.2500", "0.3000", "0.2000", "", "40", "40"] in csv_rows


def test_unknown_ids_get_an_html_404(dash: Dash) -> None:
    for url in ("/ui/batches/999", "/ui/models/999"):
        assert "Not found" in html(dash.service.client, url, 404)
    paths = dash.service.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]  # the pages stay out of the schema


def test_empty_database_renders_empty_states(service: Service) -> None:
    login(service.client)
    assert "No jobs yet" in html(service.client, "/ui")
    assert "No reviews yet" in html(service.client, "/ui/reports/plausibility")
    empty = text_of(html(service.client, "/ui/reports/evaluation"))
    assert "No finished evaluation yet. Start one with POST /jobs/evaluate" in empty
    assert "protomed evaluate --baseline" in empty and "for these filters" not in empty


def shot_path(tmp_path: Path, name: str) -> Path:
    """docs/ when PROTOMED_SCREENSHOTS=1 (refreshing the README's pictures), else tmp."""
    return (REPO / "docs" if os.environ.get("PROTOMED_SCREENSHOTS") == "1" else tmp_path) / name


def all_images_loaded(page) -> bool:
    return page.evaluate(
        "() => document.images.length > 0 &&"
        " [...document.images].every((i) => i.complete && i.naturalWidth > 0)"
    )


def check_evaluation_chart(page, url: str, tmp_path: Path) -> None:
    """The F1 chart as drawn: a bar per (class, training set) as tall as its mean F1, whiskers
    spanning ± 1 sd of the seeded per-seed scores."""
    page.goto(url + "/ui/reports/evaluation")
    top = float(page.get_attribute("#f1-chart", "data-plot-top") or "nan")
    plot_h = float(page.get_attribute("#f1-chart", "data-plot-height") or "nan")
    bars = page.eval_on_selector_all(
        "#f1-chart rect.bar",
        "els => els.map((e) => [e.dataset.class, e.dataset.set, +e.dataset.f1,"
        " e.getBBox().height, e.getBBox().y, e.getAttribute('fill')])",
    )
    expected = {(c, s): f1 for s, per in EVAL_F1.items() for c, f1 in per.items()}
    assert len(bars) == len(expected) and {(c, s) for c, s, *_ in bars} == set(expected)
    for cls, name, f1, drawn, y, _ in bars:
        mean = statistics.fmean(expected[(cls, name)])
        assert f1 == pytest.approx(mean)
        assert drawn == pytest.approx(mean * plot_h, abs=0.01)
        assert y + drawn == pytest.approx(top + plot_h, abs=0.01)  # standing on the axis
    assert len({fill for *_, fill in bars}) == len(EVAL_F1)  # a colour per training set
    whiskers = page.eval_on_selector_all(
        "#f1-chart g.whisker",
        "els => els.map((e) => { const l = e.querySelector('line'); return [e.dataset.class,"
        " e.dataset.set, +l.getAttribute('y1'), +l.getAttribute('y2')]; })",
    )
    assert len(whiskers) == len(expected)
    for cls, name, hi, lo in whiskers:
        mean, sd = statistics.fmean(expected[(cls, name)]), statistics.stdev(expected[(cls, name)])
        assert hi == pytest.approx(top + plot_h * (1 - mean - sd), abs=0.01)
        assert lo == pytest.approx(top + plot_h * (1 - mean + sd), abs=0.01)
    legend = page.locator("#f1-chart .legend").text_content() or ""
    assert all(name in legend for name in EVAL_F1)
    ticks = page.locator("#f1-chart .tick text").all_text_contents()
    assert ticks[0] == "0%" and ticks[-1] == "100%"
    assert "71.10" in page.locator("#downstream").inner_text()
    assert page.locator("#untrained-caveat").is_visible()
    assert not page.locator("#distribution-per-class table").is_visible()  # collapsed
    page.locator("#distribution-per-class summary").click()
    assert page.locator("#distribution-per-class table").is_visible()
    page.screenshot(path=shot_path(tmp_path, "dashboard_evaluation.png"), full_page=True)


def test_in_a_real_browser(dash: Dash, tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import sync_playwright

    from service.db.session import get_sessionmaker

    ids = dash.ids
    mode_of = {str(v): k for k, v in ids.models.items()}
    server = ApiServer(dash.service.env, tmp_path / "api.log")
    try:
        server.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            # reads are locked: the page sends the browser to the login form, which takes the
            # admin key and comes back to the page asked for
            page.goto(server.url + "/ui/reports/plausibility")
            assert "/ui/login" in page.url and page.locator("#chart").count() == 0
            page.fill("#key", ADMIN_KEY)
            page.click("form.login button")
            page.wait_for_url("**/ui/reports/plausibility")
            cookie = next(c for c in page.context.cookies() if c["name"] == "protomed_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert ADMIN_KEY not in cookie["value"]
            assert page.evaluate("() => document.cookie") == ""  # no script can read it
            plot_h = float(page.get_attribute("#chart", "data-plot-height") or "nan")
            bars = page.eval_on_selector_all(
                "#chart rect.bar",
                "els => els.map((e) => [e.dataset.class, e.dataset.model, +e.dataset.rate,"
                " +e.getAttribute('height'), e.getBBox().height, e.getAttribute('fill')])",
            )
            assert len(bars) == len(RATES)
            assert {(mode_of[m], c) for c, m, *_ in bars} == set(RATES)
            for cls, model, rate, height, drawn, _ in bars:
                expected = RATES[(mode_of[model], cls)]
                assert rate == pytest.approx(expected)
                assert height == pytest.approx(expected * plot_h, abs=0.01)
                assert drawn == pytest.approx(height, abs=0.01)  # as drawn: no CSS overrides it
            fills = {mode_of[m]: fill for _, m, *_, fill in bars}
            assert fills["baseline"] != fills["prototype"]  # colour-coded by mode
            assert page.locator("#chart g.whisker").count() == len(RATES)
            assert page.locator("#chart g.whisker line").count() == 3 * len(RATES)
            legend = page.locator("#chart .legend").text_content() or ""
            for mode, mid in ids.models.items():
                assert f"{mode} #{mid}" in legend
            ticks = page.locator("#chart .tick text").all_text_contents()
            assert ticks[0] == "0%" and ticks[-1] == "100%"
            assert "75.00 (4)" in page.locator("#plausibility").inner_text()
            page.screenshot(path=shot_path(tmp_path, "dashboard_report.png"), full_page=True)

            check_evaluation_chart(page, server.url, tmp_path)

            page.goto(server.url + "/ui")
            pct = page.locator(f'tr[data-job-id="{ids.running_job}"] .pct')
            assert pct.inner_text() == "25%"
            page.evaluate("() => { window.notReloaded = true; }")
            with get_sessionmaker()() as session:
                job = session.get(Job, ids.running_job)
                assert job is not None
                job.progress, job.eta_s = 0.75, 30.0
                session.commit()
            page.wait_for_function(
                "(sel) => document.querySelector(sel).textContent === '75%'",
                arg=f'tr[data-job-id="{ids.running_job}"] .pct',
                timeout=120_000,  # the page polls every 2 s; only a hang guard
            )
            assert page.evaluate("() => window.notReloaded === true")  # updated in place
            eta = page.locator(f'tr[data-job-id="{ids.running_job}"] .eta')
            assert eta.inner_text() == "30 s"
            page.screenshot(path=shot_path(tmp_path, "dashboard_jobs.png"), full_page=True)

            for url in (
                f"/ui/batches/{ids.batches[('baseline', 'lymphocyte')]}",
                f"/ui/models/{ids.models['prototype']}",
            ):
                page.goto(server.url + url)
                assert all_images_loaded(page), url  # /images read with the session cookie
            page.click("#logout")
            page.wait_for_url("**/ui/login")
            page.goto(server.url + "/ui")
            assert "/ui/login" in page.url  # logged out: the pages ask again
            browser.close()
    finally:
        server.stop()


def test_login_and_logout_refuse_posts_from_other_sites(service: Service) -> None:
    """Login CSRF: another site's page posting an attacker's key to /ui/login must not plant a
    session in the victim's browser; the same goes for logging a victim out. Browsers name the
    requesting site in Origin and Sec-Fetch-Site; this API's own form passes."""
    client = service.client
    own = "http://testserver"  # the test client's origin
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": own, "Sec-Fetch-Site": "cross-site"},
    ):
        r = client.post(
            "/ui/login", data={"key": ADMIN_KEY}, headers=headers, follow_redirects=False
        )
        assert r.status_code == 403 and "refused" in r.text, headers
        assert "set-cookie" not in r.headers and "protomed_session" not in client.cookies
    r = client.post(
        "/ui/login",
        data={"key": ADMIN_KEY},
        follow_redirects=False,
        headers={"Origin": own, "Sec-Fetch-Site": "same-origin"},
    )
    assert r.status_code == 303 and "protomed_session" in client.cookies
    r = client.post(
        "/ui/logout", headers={"Origin": "https://evil.example"}, follow_redirects=False
    )
    assert r.status_code == 403
    assert client.get("/ui", follow_redirects=False).status_code == 200  # still logged in


def test_login_gives_a_session_cookie_not_the_key(service: Service) -> None:
    """The dashboard's login: an admin or viewer key buys an HttpOnly, SameSite=Strict cookie
    holding a random token (stored hashed), which reads accept and writes never do; logout,
    revoking the key and expiry end it; reviewer and unknown keys get no cookie."""
    from sqlalchemy import select, update

    from service.db.models import UiSession
    from service.db.session import get_sessionmaker
    from service.security import hash_key

    client = service.client
    r = client.get("/ui/models/1?x=1", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=%2Fui%2Fmodels%2F1%3Fx%3D1"
    assert client.get("/jobs").status_code == 401
    form = html(client, "/ui/login?next=/ui/reports/plausibility")
    assert 'type="password"' in form and 'value="/ui/reports/plausibility"' in form

    def key(role: str) -> tuple[str, int]:
        made = client.post("/keys", json={"name": role, "role": role}, headers=service.admin)
        return made.json()["key"], made.json()["id"]

    for token, code, needle in [
        ("pm_wrong", 401, "Unknown or revoked"),
        (key("reviewer")[0], 403, "reviewer key"),
    ]:
        r = client.post("/ui/login", data={"key": token}, follow_redirects=False)
        assert r.status_code == code and needle in r.text and "set-cookie" not in r.headers

    r = login(client)
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    token = client.cookies["protomed_session"]
    assert ADMIN_KEY not in cookie and token != ADMIN_KEY
    with get_sessionmaker()() as s:  # only the token's hash is stored
        assert s.scalars(select(UiSession.token_hash)).all() == [hash_key(token)]
    assert "Log out" in html(client, "/ui")
    assert client.get("/jobs").status_code == 200  # reads take the cookie (the page polls)
    assert client.post("/jobs/train", json={"dataset_id": 1}).status_code == 401  # writes don't
    for elsewhere in ("https://evil.example/", "//evil.example/ui", "/docs"):
        assert login(client, next_url="/ui").headers["location"] == "/ui"
        r = client.post(
            "/ui/login", data={"key": ADMIN_KEY, "next": elsewhere}, follow_redirects=False
        )
        assert r.headers["location"] == "/ui"  # no open redirect

    token = client.cookies["protomed_session"]
    assert client.post("/ui/logout", follow_redirects=False).status_code == 303
    client.cookies.set("protomed_session", token)  # the old cookie, replayed
    assert client.get("/ui", follow_redirects=False).status_code == 303
    assert client.get("/jobs").status_code == 401

    viewer, viewer_id = key("viewer")
    login(client, viewer)  # a viewer may use the dashboard
    assert client.get("/ui").status_code == 200
    client.post(f"/keys/{viewer_id}/revoke", headers=service.admin)
    assert client.get("/ui", follow_redirects=False).status_code == 303  # revoking ends it

    login(client)
    with get_sessionmaker()() as s:
        s.execute(update(UiSession).values(expires_at=utc_now()))
        s.commit()
    assert client.get("/ui", follow_redirects=False).status_code == 303  # expired


def test_report_page_macro_difference_over_the_classes_both_models_have(dash: Dash) -> None:
    """Without baseline verdicts on neutrophil, the macro difference averages lymphocyte only
    (75.00 - 25.00), not the prototype's two classes against the baseline's one, and the page
    names the classes."""
    from sqlalchemy import delete, select

    from service.db.session import get_sessionmaker

    batch = dash.ids.batches[("baseline", "neutrophil")]
    with get_sessionmaker()() as s:
        tasks = select(ReviewTask.id).join(Image).where(Image.batch_id == batch)
        s.execute(delete(Review).where(Review.task_id.in_(tasks)))
        s.commit()
    text = text_of(html(dash.service.client, "/ui/reports/plausibility"))
    assert " ".join(["Average (macro)", "25.00", "62.50", "50.00"]) in text
    assert (
        "Macro difference over the classes both models were judged on: lymphocyte "
        "(left out: neutrophil)." in text
    )


def test_the_evaluation_example_names_the_readme_flows_models(service: Service) -> None:
    """The README's embedded flow registers dataset 1 and trains ``mode: both``; the empty
    evaluation page's example body must put those two models in their own roles."""
    ds = create(add_dataset)
    body = {"dataset_id": ds, "mode": "both", "preset": "tiny", "overrides": {"max_steps": 3}}
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    models = {m["mode"]: m["id"] for m in r.json()["models"]}
    login(service.client)
    page = html(service.client, "/ui/reports/evaluation")
    found = re.search(r'id="no-evaluation".*?<code>(\{.*?\})</code>', page, re.S)
    assert found, page
    example = json.loads(unescape(found.group(1)))
    assert example == {
        "baseline_model_id": models["baseline"],
        "prototype_model_id": models["prototype"],
    }


def test_the_login_hint_matches_create_keys_signature(service: Service) -> None:
    """The login page's ``protomed create-key ...`` parses with the real command, each argument
    shown as its placeholder (NAME), and names a role the command accepts."""
    import typer.main
    from typer.core import TyperArgument, TyperGroup

    from protomed_cli.main import app

    page = html(service.client, "/ui/login")
    found = re.search(r"<code>protomed create-key([^<]*)</code>", page)
    assert found, page
    words = unescape(found.group(1)).split()
    command = typer.main.get_command(app)
    assert isinstance(command, TyperGroup)
    create_key = command.commands["create-key"]
    ctx = create_key.make_context("create-key", list(words))  # a missing NAME raises here
    arguments = [p for p in create_key.params if isinstance(p, TyperArgument)]
    assert arguments and all(ctx.params[str(a.name)] == str(a.name).upper() for a in arguments)
    assert ctx.params["role"] == "viewer"
