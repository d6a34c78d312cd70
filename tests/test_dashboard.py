"""The HTML dashboard (``/ui``): pages rendered in-process must show the exact numbers seeded
into the database, escaped; then a real headless Chromium against a real uvicorn checks what
only a browser can: the chart's geometry, live job progress without reloading, loaded images.

Seeded by hand through the ORM (no training, no Label Studio) so every rate is known: two toy
classes, a baseline and a prototype model with one 4-image batch per class each, and two
reviewers judging every image with the verdicts in ``VERDICTS``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, Service, migrate, reset_service_caches, service_env
from PIL import Image as PILImage
from service_procs import ApiServer
from sqlalchemy.orm import Session

from api.db.models import (
    Batch,
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Model,
    ModelMode,
    ModelStatus,
    Review,
    ReviewProject,
    ReviewTask,
    utc_now,
)
from ml.toy import draw_cell

CLASSES = ("lymphocyte", "neutrophil")
REVIEWERS = ("alice", "bob")
# (mode, class) -> each reviewer's verdict per image (4 images per batch; 1 = plausible).
VERDICTS: dict[tuple[str, str], tuple[list[int], list[int]]] = {
    ("baseline", "lymphocyte"): ([1, 1, 0, 0], [1, 0, 1, 0]),  # 4/8 = 50%
    ("prototype", "lymphocyte"): ([1, 1, 1, 1], [1, 1, 1, 0]),  # 7/8 = 87.5%
    ("baseline", "neutrophil"): ([1, 0, 0, 0], [1, 0, 0, 0]),  # 2/8 = 25%
    ("prototype", "neutrophil"): ([1, 1, 1, 0], [1, 1, 0, 1]),  # 6/8 = 75%
}
RATES = {key: (sum(a) + sum(b)) / (len(a) + len(b)) for key, (a, b) in VERDICTS.items()}
NASTY = "<script>alert('x')</script>"  # in names and errors: must come out escaped
LS_PUBLIC = "https://review.example.org"
LS_PROJECT = 7
CHROMIUM = Path(os.environ.get("PROTOMED_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip


@dataclass
class Seeded:
    """Ids of the seeded rows the tests look for."""

    dataset: int
    models: dict[str, int]  # mode -> model id
    batches: dict[tuple[str, str], int]  # (mode, class) -> batch id
    running_job: int
    criteria_set: int


def png(cls: str, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(draw_cell(cls, rng, 64)).save(buf, format="PNG")
    return buf.getvalue()


def add_reviews(
    session: Session, project: ReviewProject, images: list[Image], key: tuple[str, str]
) -> None:
    """Both reviewers judge every image; an implausible verdict fails 'granules' (the seed's
    rule), and bob leaves 'cell_size' not applicable so its n differs from the others'."""
    for image, *verdicts in zip(images, *VERDICTS[key], strict=True):
        task = ReviewTask(project=project, image=image, token=uuid.uuid4().hex, position=image.id)
        for reviewer, ok in zip(REVIEWERS, verdicts, strict=True):
            criteria = {"cell_size": "pass" if reviewer == "alice" else "na", "nc_ratio": "pass"}
            criteria["granules"] = "pass" if ok else "fail"
            task.reviews.append(
                Review(
                    ls_annotation_id=image.id * 10 + len(task.reviews),
                    reviewer=reviewer,
                    plausible=bool(ok),
                    overall="plausible" if ok else "implausible",
                    criteria=criteria,
                )
            )
        session.add(task)


def seed(session: Session) -> Seeded:
    """The rows of the module docstring, images in storage, plus jobs in several states."""
    from api.criteria import ensure_defaults, latest
    from api.storage import get_storage

    ensure_defaults(session)
    criteria_set = latest(session, "toy")
    assert criteria_set is not None
    project = ReviewProject(criteria_set=criteria_set, ls_project_id=LS_PROJECT)
    dataset = Dataset(
        name=f"toy {NASTY}", root="/nowhere", layout="folder", classes=list(CLASSES),
        counts=dict.fromkeys(CLASSES, 40), domain="toy",
    )  # fmt: skip
    storage, rng = get_storage(), np.random.default_rng(0)
    models, batches = {}, {}
    for mode in ("baseline", "prototype"):
        model = Model(
            dataset=dataset, mode=ModelMode(mode), preset="tiny", classes=list(CLASSES),
            status=ModelStatus.ready, config={"mode": mode},
            metrics={"steps": 2000, "final_loss": 0.0421 if mode == "baseline" else 0.0375},
        )  # fmt: skip
        train = Job(kind=JobKind.train, model=model, status=JobStatus.succeeded, progress=1.0)
        session.add_all([model, train])
        for cls in CLASSES:
            job = Job(kind=JobKind.sample, model=model, status=JobStatus.succeeded, progress=1.0)
            batch = Batch(
                model=model, class_name=cls, n=4, guidance=2.0, steps=50, seed=0,
                scheduler="ddim", job=job,
            )  # fmt: skip
            session.add_all([job, batch])
            session.flush()
            images = []
            for i in range(4):
                data, key = png(cls, rng), f"batches/{batch.id}/{cls}_{i:04d}.png"
                storage.put_bytes(key, data, content_type="image/png")
                images.append(
                    Image(
                        batch=batch,
                        class_name=cls,
                        index=i,
                        storage_key=key,
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
            session.add_all(images)
            session.flush()
            add_reviews(session, project, images, (mode, cls))
            models[mode], batches[(mode, cls)] = model.id, batch.id
    running = Job(
        kind=JobKind.review_sync, status=JobStatus.running, progress=0.25, eta_s=90.0,
        attempts=1, started_at=utc_now(), requested_by="admin (bootstrap)",
    )  # fmt: skip
    failed = Job(
        kind=JobKind.prototypes, status=JobStatus.failed, progress=0.1, attempts=2,
        error=f"encoder crashed: {NASTY}", requested_by=f"ops {NASTY}",
    )  # fmt: skip
    session.add_all([project, running, failed])
    session.commit()
    return Seeded(dataset.id, models, batches, running.id, criteria_set.id)


@dataclass
class Dash:
    service: Service
    ids: Seeded


@pytest.fixture
def dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dash]:
    """The in-process service (as conftest's ``service``) with Label Studio links configured
    and the seeded rows."""
    from fastapi.testclient import TestClient

    from api.db.session import get_sessionmaker
    from api.main import create_app

    env = service_env(
        tmp_path,
        PROTOMED_LABEL_STUDIO_URL="http://label-studio.internal:8080",
        PROTOMED_LABEL_STUDIO_PUBLIC_URL=LS_PUBLIC,
    )
    (tmp_path / "data").mkdir()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_service_caches()
    migrate(env["PROTOMED_DATABASE_URL"])
    with get_sessionmaker()() as session:
        ids = seed(session)
    with TestClient(create_app()) as client:
        yield Dash(Service(client, {}, tmp_path / "data", tmp_path, env), ids)
    reset_service_caches()


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
    from api.reports import _diff_cells, cohen_kappa

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
    assert row(["lymphocyte", "50.00 (8)", "87.50 (8)", "37.50"]) in text
    assert row(["neutrophil", "25.00 (8)", "75.00 (8)", "50.00"]) in text
    assert row(["Average (macro)", "37.50", "81.25", "43.75"]) in text
    assert row(["Pooled", "37.50 (16)", "81.25 (16)", "43.75"]) in text
    as_json = client.get("/reports/plausibility").json()
    for cls in as_json["classes"]:  # CI and p: the JSON report's numbers, printed as the CSV
        assert row(_diff_cells(cls["difference"])) in text
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
    assert row(["lymphocyte", "100.00 (4)"]) in filtered and "50.00 (8)" not in filtered
    empty_form = html(client, "/ui/reports/plausibility?dataset_id=&models=&criteria_set_id=")
    assert "87.50 (8)" in empty_form  # the form's empty "all" fields mean no filter
    assert "Bad filter" in html(client, "/ui/reports/plausibility?models=x", 422)

    batch = html(client, f"/ui/batches/{ids.batches[('prototype', 'neutrophil')]}")
    assert batch.count('<img src="/images/') == 4
    assert f'href="/batches/{ids.batches[("prototype", "neutrophil")]}/zip"' in batch
    model = text_of(html(client, f"/ui/models/{base}"))
    assert "lymphocyte · 1 batch, 4 images" in model and "neutrophil · 1 batch, 4 images" in model


def test_unknown_ids_get_an_html_404(dash: Dash) -> None:
    for url in ("/ui/batches/999", "/ui/models/999"):
        assert "Not found" in html(dash.service.client, url, 404)
    assert "/ui" not in dash.service.client.get("/openapi.json").json()["paths"]


def test_empty_database_renders_empty_states(service: Service) -> None:
    assert "No jobs yet" in html(service.client, "/ui")
    assert "No reviews yet" in html(service.client, "/ui/reports/plausibility")


def require_chromium() -> None:
    reason = None
    if not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PROTOMED_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e .[dev])"
    if reason and os.environ.get("PROTOMED_REQUIRE_SERVICES"):
        pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but {reason}")
    if reason:
        pytest.skip(reason)


def shot_path(tmp_path: Path, name: str) -> Path:
    """docs/ when PROTOMED_SCREENSHOTS=1 (refreshing the README's pictures), else tmp."""
    return (REPO / "docs" if os.environ.get("PROTOMED_SCREENSHOTS") == "1" else tmp_path) / name


def all_images_loaded(page) -> bool:
    return page.evaluate(
        "() => document.images.length > 0 &&"
        " [...document.images].every((i) => i.complete && i.naturalWidth > 0)"
    )


def test_in_a_real_browser(dash: Dash, tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import sync_playwright

    from api.db.session import get_sessionmaker

    ids = dash.ids
    mode_of = {str(v): k for k, v in ids.models.items()}
    server = ApiServer(dash.service.env, tmp_path / "api.log")
    try:
        server.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            page.goto(server.url + "/ui/reports/plausibility")
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
            assert "87.50 (8)" in page.locator("#plausibility").inner_text()
            page.screenshot(path=shot_path(tmp_path, "dashboard_report.png"), full_page=True)

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
                timeout=8000,
            )
            assert page.evaluate("() => window.notReloaded === true")  # updated in place
            eta = page.locator(f'tr[data-job-id="{ids.running_job}"] .eta')
            assert eta.inner_text() == "30 s"
            page.screenshot(path=shot_path(tmp_path, "dashboard_jobs.png"), full_page=True)

            for url in (f"/ui/batches/{ids.batches[('baseline', 'lymphocyte')]}",
                        f"/ui/models/{ids.models['prototype']}"):  # fmt: skip
                page.goto(server.url + url)
                assert all_images_loaded(page), url
            browser.close()
    finally:
        server.stop()
