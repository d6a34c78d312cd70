"""A guidance sweep end to end on the toy domain with real components: the API as a real HTTP
server, a real Celery worker process (training, sampling, the review sync), a real Label Studio
(started by .ci/run; locally set PROTOMED_TEST_LABEL_STUDIO_URL and _TOKEN) and the toy
domain's rule-based checker as the reviewer, posting its verdicts through Label Studio's API as
an expert's clicks would.

A model trained for two steps makes noise at every scale, so the sweep would show no trade-off
and recommend nothing. To give the verdicts something to find, the higher scale's images of
each class are replaced in storage by real toy cells of that class after sampling (as
tests/test_reviews.py seeds real cells): this tests the loop (blinded review, counting, the
rule, apply, generation with the class default), not the model.

PROTOMED_SWEEP_SCREENSHOT=PATH also saves the dashboard page of the sweep there (Chromium).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from browser import screenshot
from conftest import ADMIN_KEY, migrate, service_env
from factories import png_bytes, service_context
from service_procs import ApiServer, Worker, free_port, wait_job
from sqlalchemy import create_engine, text
from test_reviews import checker_result, ls_settings
from waiting import wait_until

from ml.diffusion.provenance import read_provenance

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLASSES = ("lymphocyte", "neutrophil")
LOW, HIGH, N = 1.0, 4.0, 4


def plant_real_cells(env: dict[str, str], batch_ids: list[int], size: int) -> None:
    """Replace the stored images of these batches by real toy cells of the batch's class."""
    from ml.data.toy import draw_cell
    from service.db.models import Batch
    from service.db.session import get_sessionmaker
    from service.storage import get_storage

    rng = np.random.default_rng(0)
    with service_context(env), get_sessionmaker()() as s:
        storage = get_storage()
        for batch_id in batch_ids:
            batch = s.get(Batch, batch_id)
            assert batch is not None and len(batch.images) == N
            for img in batch.images:
                data = png_bytes(draw_cell(batch.class_name, rng, size))
                storage.put_bytes(img.storage_key, data, "image/png")
                img.sha256 = hashlib.sha256(data).hexdigest()
        s.commit()


def image_cells(env: dict[str, str]) -> dict[str, tuple[str, float]]:
    """Review token -> (class, guidance) of its image, from protomed's database (the test
    knows; Label Studio and the reviewer do not)."""
    engine = create_engine(env["PROTOMED_DATABASE_URL"])
    sql = (
        "SELECT t.token, b.class_name, b.guidance FROM review_tasks t "
        "JOIN images i ON t.image_id = i.id JOIN batches b ON i.batch_id = b.id"
    )
    with engine.connect() as conn:
        rows = {tok: (cls, float(g)) for tok, cls, g in conn.execute(text(sql)).all()}
    engine.dispose()
    return rows


def test_a_guidance_sweep_reviewed_in_label_studio_sets_the_class_defaults(
    tmp_path: Path,
) -> None:
    from label_studio_sdk import LabelStudio

    from ml.data.toy import write_toy_dataset

    ls_url, ls_token = ls_settings()
    write_toy_dataset(tmp_path / "data" / "toy", n_per_class=6, size=32, seed=0)
    port = free_port()
    env = service_env(
        tmp_path,
        PROTOMED_LABEL_STUDIO_URL=ls_url,
        PROTOMED_LABEL_STUDIO_TOKEN=ls_token,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET="sweep-test",
        PROTOMED_REVIEW_PULL_S="3600",  # the test pulls when it wants the verdicts
        PROTOMED_SWEEP_MIN_IMAGES="3",
    )
    migrate(env["PROTOMED_DATABASE_URL"])
    api_proc = ApiServer(env, tmp_path / "api.log", port)
    worker = Worker(env, tmp_path / "worker.log")
    ls = LabelStudio(base_url=ls_url, api_key=ls_token, timeout=30)
    try:
        api_proc.wait_ready()
        worker.wait_ready()
        with httpx.Client(base_url=api_proc.url, timeout=60, headers=AUTH) as api:
            r = api.post("/datasets", json={"name": "toy", "path": "toy", "domain": "toy"})
            assert r.status_code == 201, r.text
            body = {
                "dataset_id": r.json()["id"],
                "mode": "baseline",
                "preset": "cpu-small",
                "n_per_class": 6,
                "n_heldout": 0,
                "classes": list(CLASSES),
                "overrides": {"max_steps": 2, "batch_size": 4},
            }
            r = api.post("/jobs/train", json=body)
            assert r.status_code == 202, r.text
            trained = wait_job(api, r.json()["jobs"][0]["id"], worker=worker)
            assert trained["status"] == "succeeded", (trained, worker.tail())
            model = trained["model_id"]

            # the sweep: 2 classes x 2 scales x 4 images, the same seed at both scales
            sweep_body = {"scales": [HIGH, LOW], "n": N, "steps": 2, "scheduler": "ddim"}
            r = api.post(f"/models/{model}/sweeps", json=sweep_body)
            assert r.status_code == 202, r.text
            sweep = r.json()["sweep"]
            assert sweep["classes"] == list(CLASSES) and sweep["scales"] == [LOW, HIGH]
            for job in r.json()["jobs"]:
                done = wait_job(api, job["id"], worker=worker)
                assert done["status"] == "succeeded", (done, worker.tail())
            cells = {(b["class_name"], b["scale"]): b["batch_id"] for b in sweep["batches"]}
            generated = api.get(f"/batches/{cells[(CLASSES[0], LOW)]}").json()["images"][0]
            original = api.get(generated["url"]).content
            record = read_provenance(original)
            assert record is not None and record.guidance == LOW  # the scale is in the file...
            assert b"guidance" in original
            plant_real_cells(env, [cells[(c, HIGH)] for c in CLASSES], 32)

            r = api.post(f"/sweeps/{sweep['id']}/review")
            assert r.status_code == 202 and r.json()["added"] == 2 * 2 * N, r.text
            sync = wait_job(api, r.json()["job"]["id"], worker=worker)
            assert sync["status"] == "succeeded", (sync, worker.tail())
            ls_project = (
                r.json()["project"]["ls_project_id"]
                or (api.get("/reviews/projects").json()[0]["ls_project_id"])
            )
            tasks = ls_tasks_of(ls, ls_project)
            assert len(tasks) == 2 * 2 * N
            truth = image_cells(env)
            # blinded: the task names only the image and its class; the image served to the
            # reviewer carries no provenance (...but not in what the reviewer sees)
            expected: dict[tuple[str, float], list[bool]] = {}
            for task in tasks:
                assert set(task["data"]) == {"image", "expected_class", "ref"}
                png = httpx.get(task["data"]["image"], timeout=30).content  # no key, as LS
                assert b"guidance" not in png and read_provenance(png) is None
                result, plausible = checker_result(png, task["data"]["expected_class"], False)
                ls.annotations.create(task["id"], result=result)
                expected.setdefault(truth[task["data"]["ref"]], []).append(plausible)
            order = [truth[t["data"]["ref"]][1] for t in tasks]
            assert order != sorted(order) and order != sorted(order, reverse=True)

            # the verdicts back (a pull; webhooks may land first, which counts the same)
            for job in api.post("/reviews/sync").json():
                assert wait_job(api, job["id"], worker=worker)["status"] == "succeeded"

            def counted() -> dict | None:
                rep = api.get(f"/sweeps/{sweep['id']}/report").json()
                n = sum(e["plausibility"]["reviews"] for c in rep["classes"] for e in c["scales"])
                return rep if n == 2 * 2 * N else None

            rep = wait_until(counted, timeout=120, what="every verdict in the sweep's report")
            for row in rep["classes"]:
                for e in row["scales"]:
                    want = expected[(row["class"], e["scale"])]
                    got = e["plausibility"]
                    assert (got["images"], got["plausible"]) == (N, sum(want)), (row, e)
                    assert e["diversity"] is not None and e["diversity"] > 0
            # the real cells pass the checker, two-step noise does not: the higher scale wins
            for c in CLASSES:
                assert sum(expected[(c, HIGH)]) > sum(expected[(c, LOW)]), expected
            recommended = {row["class"]: row["recommended"] for row in rep["classes"]}
            assert recommended == dict.fromkeys(CLASSES, HIGH), rep

            r = api.post(f"/sweeps/{sweep['id']}/apply")
            assert r.status_code == 200 and r.json()["set"] == dict.fromkeys(CLASSES, HIGH)
            # generation without a guidance uses the class's default, and records it
            params = {"class": CLASSES[1], "n": 1, "steps": 2, "model_id": model}
            r = api.post("/generate", params=params)
            assert r.status_code == 202, r.text
            assert r.json()["guidance_source"] == "model default"
            assert r.json()["batch"]["guidance"] == HIGH
            done = wait_job(api, r.json()["job"]["id"], worker=worker)
            assert done["status"] == "succeeded", (done, worker.tail())
            batch = api.get(f"/batches/{r.json()['batch']['id']}").json()
            made = read_provenance(api.get(batch["images"][0]["url"]).content)
            assert batch["guidance"] == HIGH and made is not None and made.guidance == HIGH

            page = api.get(f"/ui/sweeps/{sweep['id']}")
            assert page.status_code == 200 and page.text.count("rate-point recommended") == 2
            if os.environ.get("PROTOMED_SWEEP_SCREENSHOT"):
                out = Path(os.environ["PROTOMED_SWEEP_SCREENSHOT"])
                screenshot(api_proc.url, ADMIN_KEY, f"/ui/sweeps/{sweep['id']}", out)
                (out.with_suffix(".json")).write_text(json.dumps(rep, indent=2))
    finally:
        worker.stop()
        api_proc.stop()


def ls_tasks_of(ls: Any, ls_project: int) -> list[dict]:
    """Label Studio's tasks of the project, as its export gives them."""
    raw = ls.projects.exports.download_sync(ls_project, export_type="JSON", download_all_tasks=True)
    return json.loads(b"".join(raw))
