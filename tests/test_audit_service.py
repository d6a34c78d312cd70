"""The audit through the service: ``POST``/``GET /batches/{id}/audit`` (clear 404/409 before
there is one, readers only: reviewers get 403), the ``audit`` job kind's migration on
PostgreSQL and SQLite, and a real worker auditing a generated batch with a training image
planted in it: the API and the dashboard show it flagged beside that training image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from conftest import Service, alembic_config
from factories import add_batch, add_dataset, add_image, add_model, png_bytes
from PIL import Image as PILImage
from service_procs import Worker, train_tiny, wait_job
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from test_blinding import key

from ml.schemas.audit import AuditConfig
from service.db.models import Job, JobKind, JobStatus
from service.db.session import get_sessionmaker, make_engine


def seeded_batch(sample_status: JobStatus = JobStatus.succeeded) -> int:
    """A ready model's batch with one stored image, made by a sample job in ``sample_status``."""
    with get_sessionmaker()() as s:
        ds = add_dataset(s)
        model = add_model(s, ds, checkpoint_path="models/x/checkpoint.pt")
        job = Job(kind=JobKind.sample, model=model, status=sample_status)
        s.add(job)
        batch = add_batch(s, model, job=job)
        rng = np.random.default_rng(0)
        add_image(s, batch, data=png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        job.params = {"batch_id": batch.id}
        s.commit()
        return batch.id


def test_audit_requests_before_any_audit_ran(service: Service) -> None:
    batch = seeded_batch()
    admin, url = service.admin, f"/batches/{batch}/audit"
    r = service.client.get(url, headers=admin)
    assert r.status_code == 404 and f"POST /batches/{batch}/audit" in r.text, r.text
    assert service.client.get("/batches/4242/audit", headers=admin).status_code == 404
    assert service.client.get(url).status_code == 401
    reviewer, viewer = key(service, "reviewer"), key(service, "viewer")
    for method in ("get", "post"):  # blinding: the audit names batches, images and models
        r = getattr(service.client, method)(url, headers=reviewer)
        assert r.status_code == 403 and "reviewer" in r.text, r.text
    assert service.client.get(url, headers=viewer).status_code == 404  # viewers may read
    assert service.client.post(url, headers=viewer).status_code == 403  # ... not start one
    page = service.client.get(f"/ui/batches/{batch}/audit", headers=admin)
    assert page.status_code == 200 and "has no audit yet" in page.text
    assert service.client.get(f"/ui/batches/{batch}/audit", headers=reviewer).status_code == 403

    r = service.client.post(url, json={"quantile": 0.7}, headers=admin)
    assert r.status_code == 422 and "quantile" in r.text
    r = service.client.post(url, json={"spaces": ["colour"]}, headers=admin)
    assert r.status_code == 422
    unfinished = seeded_batch(JobStatus.running)
    r = service.client.post(f"/batches/{unfinished}/audit", headers=admin)
    assert r.status_code == 409 and "not generated yet" in r.text

    r = service.client.post(url, json={"quantile": 0.1}, headers=admin)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "audit" and job["status"] == "queued"
    assert job["params"]["batch_id"] == batch and job["params"]["config"]["quantile"] == 0.1
    r = service.client.get(url, headers=admin)
    assert r.status_code == 409 and f"GET /jobs/{job['id']}" in r.text and "queued" in r.text
    again = service.client.post(url, headers=admin)
    assert again.status_code == 409 and "already queued" in again.text
    page = service.client.get(f"/ui/batches/{batch}/audit", headers=admin)
    assert page.status_code == 200 and f"job {job['id']}" in page.text


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'protomed.db'}"


def test_migration_0006_admits_audit_jobs(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "0005")
    engine = make_engine(db_url)
    try:
        # raw SQL only before head: the ORM models describe the newest schema
        insert = text(
            "INSERT INTO jobs (kind, status, progress, params, attempts, cancel_requested) "
            "VALUES ('audit', 'queued', 0, '{}', 0, false)"
        )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert)  # before 0006 the constraint refuses the kind
        command.upgrade(cfg, "head")
        with engine.begin() as conn:
            conn.execute(insert)
        with Session(engine) as s:
            assert s.query(Job).one().kind is JobKind.audit
        command.downgrade(cfg, "0005")  # removes the audit jobs with the kind
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_worker_audits_a_batch_with_a_planted_training_image(service: Service) -> None:
    from ml.data.images import load_selection
    from ml.data.toy import write_toy_dataset

    write_toy_dataset(service.data_root / "toy", n_per_class=16, size=32, seed=0)
    admin = service.admin
    r = service.client.post("/datasets", json={"name": "toy", "path": "toy"}, headers=admin)
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    worker = Worker(service.env, service.tmp / "worker.log")
    try:
        worker.wait_ready()
        trained = train_tiny(service.client, admin, dataset_id, worker)
        r = service.client.post(
            "/generate",
            params={"class": "lymphocyte", "n": 3, "steps": 2, "model_id": trained["model_id"]},
            headers=admin,
        )
        assert r.status_code == 202, r.text
        batch_id = r.json()["batch"]["id"]
        assert wait_job(service.client, r.json()["job"]["id"], worker=worker)["status"] == (
            "succeeded"
        )
        # plant a training image of the model's split into the batch, as a fourth image
        selection = trained["params"]["selection"]
        split = load_selection({**selection, "root": service.data_root / "toy", "image_size": 32})
        source = Path(split.train.paths[0])
        with get_sessionmaker()() as s:
            from service.db.models import Batch

            batch = s.get(Batch, batch_id)
            assert batch is not None
            add_image(s, batch, index=3, data=source.read_bytes(), store=True)
            s.commit()
        r = service.client.post(f"/batches/{batch_id}/audit", headers=admin)
        assert r.status_code == 202, r.text
        job = wait_job(service.client, r.json()["id"], worker=worker)
        assert job["status"] == "succeeded", (job, worker.tail())
    finally:
        worker.stop()

    r = service.client.get(f"/batches/{batch_id}/audit", headers=admin)
    assert r.status_code == 200, r.text
    audit = r.json()
    report = audit["report"]
    assert audit["job_id"] == job["id"] and report["totals"]["n_images"] == 4
    planted = report["images"][3]
    assert planted["flagged"] and planted["pixel"]["distance"] == 0.0
    assert planted["pixel"]["train_path"].endswith(source.name)
    cal = report["per_class"][0]["calibration"]
    assert report["per_class"][0]["class_name"] == "lymphocyte"
    assert (cal["n_calibration"], cal["n_check"]) == (4, 4)
    link = audit["links"][3]
    assert link["nearest_url"], link
    png = service.client.get(link["nearest_url"], headers=admin)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    shown = np.asarray(PILImage.open(io.BytesIO(png.content)).convert("RGB"))
    assert (shown == np.asarray(PILImage.open(source).convert("RGB"))).all()
    viewer, reviewer = key(service, "viewer"), key(service, "reviewer")
    assert service.client.get(f"/batches/{batch_id}/audit", headers=viewer).status_code == 200
    assert service.client.get(f"/batches/{batch_id}/audit", headers=reviewer).status_code == 403
    assert service.client.get(link["nearest_url"], headers=reviewer).status_code == 403

    page = service.client.get(f"/ui/batches/{batch_id}/audit", headers=admin)
    assert page.status_code == 200
    assert "flagged (pixel" in page.text and source.name in page.text
    assert link["nearest_url"].split("testserver")[-1] in page.text
    assert "no formal privacy guarantee" in page.text

    # the model card gathers it: the worker recorded the encoder and the checkpoint's hash, the
    # one the generated PNG's provenance names, and the audit appears per class
    from ml.diffusion.provenance import read_provenance

    card = service.client.get(f"/models/{trained['model_id']}/card", headers=admin).json()
    first = service.client.get(f"/batches/{batch_id}", headers=admin).json()["images"][0]
    record = read_provenance(service.client.get(first["url"], headers=admin).content)
    assert record is not None and card["training"]["checkpoint_sha256"] == record.checkpoint_sha256
    assert "untrained" in (card["training"]["encoder"] or "").lower()
    assert card["training"]["seconds"] > 0 and card["training_data"]["n_heldout"] == 8
    assert [(a["batch_id"], a["class_name"], a["n_images"]) for a in card["audits"]] == [
        (batch_id, "lymphocyte", 4)
    ]


def test_the_audit_page_in_a_real_browser(service: Service, tmp_path: Path) -> None:
    """A stored audit (``ml.audit`` on toy images, kept as the worker keeps it) in Chromium:
    the per-class table, each flagged image beside its nearest training image (served to the
    logged-in browser by its session cookie), the caveat."""
    from browser import dashboard, require_chromium

    require_chromium()  # before the work below
    import torch
    from test_dashboard import all_images_loaded, shot_path

    from ml.audit import audit_images
    from ml.data.images import load_split
    from ml.data.toy import make_toy_images, write_toy_dataset
    from service.db.models import utc_now
    from service.storage import get_storage
    from workers.audit import store_audit

    classes = ["lymphocyte", "neutrophil"]
    root = write_toy_dataset(service.data_root / "toy", n_per_class=40, size=32, seed=0)
    split = load_split(root, n_per_class=20, n_heldout=20, image_size=32, classes=classes)
    fresh, labels = make_toy_images(4, size=32, seed=5)
    fresh = fresh[[i for i, c in enumerate(labels) if c == "lymphocyte"]]
    copies = split.train.images[:3].permute(0, 2, 3, 1).numpy()  # lymphocytes (class 0)
    pixels = np.concatenate([fresh, copies, copies[:1, :, ::-1]])  # + a flipped copy
    report = audit_images(
        torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).contiguous(),
        ["lymphocyte"] * len(pixels),
        split,
        None,
        AuditConfig(spaces=("pixel",)),
        flips=True,
    )
    with get_sessionmaker()() as s:
        ds = add_dataset(s, name="toy-audit", root=str(root), classes=classes)
        model = add_model(s, ds, checkpoint_path="models/x/checkpoint.pt")
        batch = add_batch(s, model, class_name="lymphocyte", n=len(pixels))
        ids = [
            add_image(s, batch, index=i, data=png_bytes(p), store=True).id
            for i, p in enumerate(pixels)
        ]
        job = Job(
            kind=JobKind.audit,
            model=model,
            status=JobStatus.succeeded,
            params={"batch_id": batch.id},
            finished_at=utc_now(),
        )
        s.add(job)
        s.flush()
        stored = store_audit(job.id, batch.id, report, split.train.images, ids, get_storage())
        job.result = stored.model_dump(mode="json")
        s.commit()
        batch_id, flagged = batch.id, report.totals.n_flagged
    # the three copies and the flipped one; a fresh cell may be too (k = 1 of 10: 1 in 11)
    assert all(a.flagged for a in report.images[len(fresh) :]) and flagged >= 4

    path = f"/ui/batches/{batch_id}/audit"
    with dashboard(service.env, tmp_path / "api.log", path, width=1280) as page:
        assert page.locator("#audit-classes tbody tr").count() == 1
        assert page.locator("figure.pair.flagged").count() == flagged
        assert all_images_loaded(page)  # generated and nearest training images
        total = page.locator("#flagged-total").inner_text()
        assert f"{flagged} of {len(pixels)} generated images" in total
        assert "no formal privacy guarantee" in page.locator("#audit-caveat").inner_text()
        page.screenshot(path=shot_path(tmp_path, "dashboard_audit.png"), full_page=True)
