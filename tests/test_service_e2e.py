"""End to end on production-like infrastructure: PostgreSQL, Redis as the Celery broker, an
S3 endpoint (moto's server mode on loopback stands in for S3/MinIO) and a real Celery worker
process. The API runs in-process (ASGI); the worker is a separate process that shares nothing
with it but these services.

Covers: registering a real dataset (cells64), training cpu-small for a few steps in both modes,
generating n=8 of one class and fetching the images; a worker killed with SIGKILL mid-training
(the job is re-run and resumes, or fails once out of attempts); cancelling a running job; a job
over its time limit.
"""

from __future__ import annotations

import io
import json
import signal
import time
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import ADMIN_KEY, Service, migrate, redis_broker, reset_service_caches, service_env
from PIL import Image
from service_procs import Worker, wait_job

from ml.diffusion.provenance import read_provenance
from service.db.models import utc_now

pytestmark = pytest.mark.slow
FAST_BEATS = {
    "PROTOMED_HEARTBEAT_S": "0.5",
    "PROTOMED_HEARTBEAT_TIMEOUT_S": "4",
}


@pytest.fixture
def redis_env() -> Iterator[dict[str, str]]:
    """A Redis broker namespace of its own (conftest's redis_broker)."""
    with redis_broker() as env:
        yield env


@pytest.fixture
def prod(tmp_path, monkeypatch, pg_url, redis_env, moto_endpoint) -> Iterator[Service]:
    from fastapi.testclient import TestClient

    from service.storage import S3Storage

    env = service_env(
        tmp_path,
        PROTOMED_DATABASE_URL=pg_url,
        **redis_env,
        PROTOMED_STORAGE_BACKEND="s3",
        PROTOMED_S3_ENDPOINT_URL=moto_endpoint,
        PROTOMED_S3_BUCKET=f"protomed-{tmp_path.name[-12:].lower().replace('_', '-')}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        **FAST_BEATS,
    )
    (tmp_path / "data").mkdir()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_service_caches()
    migrate(pg_url)
    S3Storage(env["PROTOMED_S3_BUCKET"], endpoint_url=moto_endpoint).ensure_bucket()
    from api.main import create_app

    with TestClient(create_app()) as client:
        yield Service(
            client, {"Authorization": f"Bearer {ADMIN_KEY}"}, tmp_path / "data", tmp_path, env
        )
    reset_service_caches()


@pytest.fixture
def start_worker(prod: Service) -> Iterator:
    workers: list[Worker] = []

    def start(**extra: str) -> Worker:
        w = Worker({**prod.env, **extra}, prod.tmp / f"worker{len(workers)}.log")
        workers.append(w)
        w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()


def register_cells(svc: Service, real_data: Path) -> dict:
    r = svc.client.post(
        "/datasets",
        json={"name": "cells64", "path": str(real_data / "cells64")},
        headers=svc.admin,
    )
    assert r.status_code == 201, r.text
    return r.json()


def train(svc: Service, dataset_id: int, mode: str, **overrides: object) -> list[dict]:
    body = {
        "dataset_id": dataset_id,
        "mode": mode,
        "preset": "cpu-small",
        "n_per_class": 6,
        "n_heldout": 2,
        "overrides": {"max_steps": 3, "batch_size": 8, **overrides},
        "classes": ["basophil", "eosinophil", "lymphocyte"],
    }
    r = svc.client.post("/jobs/train", json=body, headers=svc.admin)
    assert r.status_code == 202, r.text
    return r.json()["jobs"]


def toy_training(svc: Service, mode: str = "baseline", **overrides: object) -> dict:
    """Register a small toy dataset; returns a cpu-small training request body for it."""
    from ml.data.toy import write_toy_dataset

    write_toy_dataset(svc.data_root / "toy", n_per_class=6, size=32, seed=0)
    r = svc.client.post("/datasets", json={"name": "toy", "path": "toy"}, headers=svc.admin)
    assert r.status_code == 201, r.text
    return {
        "dataset_id": r.json()["id"],
        "mode": mode,
        "preset": "cpu-small",
        "n_per_class": 6,
        "n_heldout": 0,
        "overrides": {"batch_size": 4, **overrides},
    }


@pytest.mark.realdata
def test_train_both_modes_generate_and_fetch(prod, start_worker, real_data) -> None:
    worker = start_worker()
    ready = prod.client.get("/ready")
    assert ready.status_code == 200, ready.text
    ds = register_cells(prod, real_data)
    jobs = train(prod, ds["id"], "both")
    done = [wait_job(prod.client, j["id"], worker=worker) for j in jobs]
    assert [j["status"] for j in done] == ["succeeded", "succeeded"], done
    models = [prod.client.get(f"/models/{j['model_id']}", headers=prod.admin).json() for j in done]
    assert [m["mode"] for m in models] == ["prototype", "baseline"]
    assert all(m["status"] == "ready" and m["metrics"]["steps"] == 3 for m in models)
    # both modes trained on the same images: their codebooks recorded the same selection
    assert done[0]["result"]["steps"] == 3 and done[0]["progress"] == 1.0

    t0 = time.perf_counter()
    r = prod.client.post(
        "/generate",
        params={
            "class": "eosinophil",
            "n": 8,
            "steps": 10,
            "dataset_id": ds["id"],
            "mode": "prototype",
        },
        headers=prod.admin,
    )
    assert r.status_code == 202, r.text
    job = wait_job(prod.client, r.json()["job"]["id"], worker=worker)
    assert job["status"] == "succeeded", job
    batch = prod.client.get(f"/batches/{r.json()['batch']['id']}", headers=prod.admin).json()
    assert batch["model_id"] == models[0]["id"] and len(batch["images"]) == 8
    assert [i["index"] for i in batch["images"]] == list(range(8))
    for img in batch["images"]:
        png = prod.client.get(img["url"], headers=prod.admin)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (32, 32)
        record = read_provenance(png.content)  # the stored PNG says who made it and how
        assert record is not None and (record.model_id, record.batch_id, record.index) == (
            models[0]["id"],
            batch["id"],
            img["index"],
        )
        assert (record.class_name, record.steps, record.n, record.mode) == (
            "eosinophil",
            10,
            8,
            "prototype",
        )
    zf = zipfile.ZipFile(io.BytesIO(prod.client.get(batch["zip_url"], headers=prod.admin).content))
    assert len(zf.namelist()) == 9 and "manifest.csv" in zf.namelist()
    print(f"generate n=8 (10 DDIM steps) round trip: {time.perf_counter() - t0:.1f} s")


def training_at(step: int, total: int) -> float:
    """The job's progress once training has done ``step`` of ``total`` steps."""
    from workers.training import STAGES

    before = sum(STAGES.values()) - STAGES["train"] - STAGES["upload"]
    return (before + STAGES["train"] * step / total) / sum(STAGES.values())


def running_with_checkpoint(job: dict) -> bool:
    return job["progress"] >= training_at(6, 40)  # past the checkpoint at step 5


def test_sigkilled_worker_job_is_rerun_and_resumes(prod, start_worker, tmp_path) -> None:
    body = toy_training(prod, max_steps=40, checkpoint_every=5)
    job = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    first = start_worker()
    running = wait_job(
        prod.client,
        job["id"],
        until=("running",),
        predicate=running_with_checkpoint,
        worker=first,
        timeout=600,
    )
    t_kill = time.monotonic()
    first.kill(signal.SIGKILL)
    stuck = prod.client.get(f"/jobs/{job['id']}", headers=prod.admin).json()
    assert stuck["status"] == "running"  # nobody has noticed yet
    second = start_worker()
    requeued = wait_job(
        prod.client,
        job["id"],
        until=("queued", "running"),
        predicate=lambda j: j["attempts"] == 2 or j["status"] == "queued",
        worker=second,
    )
    done = wait_job(prod.client, job["id"], worker=second)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["result"]["steps"] == 40
    assert "resumed from" in second.tail(400) or "resumed" in second.log.read_text()
    print(
        f"SIGKILL at progress {running['progress']:.2f}: re-run noticed in "
        f"{time.monotonic() - t_kill:.1f} s (state seen: {requeued['status']}), finished "
        f"with attempts={done['attempts']}"
    )


def test_sigkilled_worker_out_of_attempts_fails(prod, start_worker) -> None:
    body = toy_training(prod, max_steps=400)
    job = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    first = start_worker(PROTOMED_MAX_ATTEMPTS="1")
    wait_job(prod.client, job["id"], until=("running",), worker=first, timeout=600)
    first.kill(signal.SIGKILL)
    second = start_worker(PROTOMED_MAX_ATTEMPTS="1")
    done = wait_job(prod.client, job["id"], worker=second, timeout=300)
    assert done["status"] == "failed" and "stopped answering" in done["error"], done
    model = prod.client.get(f"/models/{done['model_id']}", headers=prod.admin).json()
    assert model["status"] == "failed"


def test_cancel_running_job_and_time_limit(prod, start_worker) -> None:
    """Both stops happen while the job is known to be training, whatever the machine's speed:
    the cancel is sent then, and the time limit is made to pass then, by moving the run's
    recorded start (the limit counts from ``started_at``) a day into the past."""
    from sqlalchemy import update

    from service.db.models import Job
    from service.db.session import get_sessionmaker

    body = toy_training(prod, max_steps=100_000)
    worker = start_worker(PROTOMED_TRAIN_TIME_LIMIT_S="3600")
    mid_training = lambda j: j["progress"] > training_at(1, 100_000)  # noqa: E731
    slow = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    wait_job(
        prod.client,
        slow["id"],
        until=("running",),
        worker=worker,
        predicate=mid_training,
        timeout=600,
    )
    r = prod.client.post(f"/jobs/{slow['id']}/cancel", headers=prod.admin)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_job(prod.client, slow["id"], worker=worker, timeout=300)
    assert done["status"] == "cancelled" and done["error"] is None, done
    assert (
        prod.client.get(f"/models/{done['model_id']}", headers=prod.admin).json()["status"]
        == "cancelled"
    )

    over = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    wait_job(
        prod.client,
        over["id"],
        until=("running",),
        worker=worker,
        predicate=mid_training,
        timeout=600,
    )
    with get_sessionmaker()() as session:
        session.execute(
            update(Job).where(Job.id == over["id"]).values(started_at=utc_now() - timedelta(days=1))
        )
        session.commit()
    done = wait_job(prod.client, over["id"], worker=worker, timeout=300)
    assert done["status"] == "failed" and "time limit of 3600 s" in done["error"], done
    print(json.dumps({"cancelled": slow["id"], "timed_out": over["id"]}))


def test_sigterm_to_a_worker_requeues_its_job_at_once(prod, start_worker) -> None:
    """``docker stop`` sends SIGTERM to the worker's main process only; the job runs in a
    prefork child. The worker must stop without finishing the job, which is back in the queue
    (checkpointed, no attempt used) when the worker has exited, not after the heartbeat
    timeout; the next worker resumes it."""
    body = toy_training(prod, max_steps=100_000)
    worker = start_worker()
    job = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    wait_job(
        prod.client,
        job["id"],
        until=("running",),
        worker=worker,
        timeout=600,
        predicate=lambda j: j["progress"] > training_at(1, 100_000),
    )
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(timeout=300)  # a hang guard: it stops at its next training step
    back = prod.client.get(f"/jobs/{job['id']}", headers=prod.admin).json()
    assert back["status"] == "queued" and back["attempts"] == 0, (back, worker.tail())
    assert "interrupted" in back["error"], back
    second = start_worker()
    wait_job(
        prod.client,
        job["id"],
        until=("running",),
        worker=second,
        timeout=600,
        predicate=lambda _j: "resumed from" in second.log.read_text(),
    )


def test_training_under_torchrun_when_several_processes(prod, start_worker) -> None:
    """The multi-GPU path on CPU: PROTOMED_TRAIN_PROCESSES=2 makes the worker launch DDP with
    torchrun (gloo here, NCCL on GPUs) and follow its progress from metrics.jsonl."""
    body = toy_training(prod, "prototype", max_steps=4)
    worker = start_worker(PROTOMED_TRAIN_PROCESSES="2")
    job = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"][0]
    done = wait_job(prod.client, job["id"], worker=worker, timeout=300)
    assert done["status"] == "succeeded", (done, worker.tail(60))
    model = prod.client.get(f"/models/{done['model_id']}", headers=prod.admin).json()
    assert model["metrics"]["world"] == 2 and model["metrics"]["steps"] == 4


def test_evaluation_job_compares_both_modes(prod, start_worker) -> None:
    """Train both modes, then the evaluation job: real / baseline / prototype classifiers on the
    held-out real images, CLIP-space metrics, stored with the job and summarised on the models;
    then again on an external test set (``test_dataset_id``)."""
    body = {**toy_training(prod, "both", max_steps=3), "n_per_class": 3, "n_heldout": 3}
    worker = start_worker()
    jobs = prod.client.post("/jobs/train", json=body, headers=prod.admin).json()["jobs"]
    done = [wait_job(prod.client, j["id"], worker=worker) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
    ids = {d["params"]["mode"]: d["model_id"] for d in done}
    req = {
        "baseline_model_id": ids["baseline"],
        "prototype_model_id": ids["prototype"],
        "seeds": [0],
        "epochs": 2,
        "steps": 3,
    }
    r = prod.client.post("/jobs/evaluate", json=req, headers=prod.admin)
    assert r.status_code == 202, r.text
    job = wait_job(prod.client, r.json()["id"], worker=worker)
    assert job["status"] == "succeeded", job
    report = prod.client.get("/reports/evaluation", headers=prod.admin).json()
    assert report["job_id"] == job["id"]
    assert list(report["downstream"]["sets"]) == ["real", "baseline", "prototype"]
    assert report["n_heldout"] == dict.fromkeys(report["classes"], 3)
    assert report["toy_plausibility"]["real"]["lymphocyte"] == 1.0
    csv_text = prod.client.get(
        "/reports/evaluation", params={"format": "csv"}, headers=prod.admin
    ).text
    assert csv_text.startswith("training set,precision") and "\nprototype," in csv_text
    model = prod.client.get(f"/models/{ids['prototype']}", headers=prod.admin).json()
    assert model["metrics"]["evaluations"][0]["job_id"] == job["id"]
    # the typed result went through the database unchanged: the JSON is the model's dump
    from api.schemas import EvaluationReport
    from service.evaluations import evaluation_csv

    typed = EvaluationReport.model_validate(report)
    assert typed.model_dump(mode="json") == report
    assert typed.test_set is not None and typed.test_set.source == "held-out"
    assert typed.test_set.total == 15 == typed.downstream.n_test
    assert csv_text == evaluation_csv(typed)

    # an external test set: another registered folder, 4 images per class, one extra class
    from ml.data.toy import TOY_CLASSES, write_toy_dataset

    ext = write_toy_dataset(prod.data_root / "site-b", n_per_class=4, size=32, seed=7)
    (ext / "platelet").mkdir()
    (ext / "platelet" / "p.png").write_bytes(
        (ext / TOY_CLASSES[0] / "lymphocyte_0000.png").read_bytes()
    )
    r = prod.client.post("/datasets", json={"name": "site-b", "path": "site-b"}, headers=prod.admin)
    assert r.status_code == 201, r.text
    test_id = r.json()["id"]
    r = prod.client.post(
        "/jobs/evaluate", json={**req, "test_dataset_id": test_id}, headers=prod.admin
    )
    assert r.status_code == 202, r.text
    job = wait_job(prod.client, r.json()["id"], worker=worker)
    assert job["status"] == "succeeded", job
    external = EvaluationReport.model_validate(
        prod.client.get(
            "/reports/evaluation", params={"job_id": job["id"]}, headers=prod.admin
        ).json()
    )
    test = external.test_set
    assert test is not None and test.source == "external" and test.dataset_id == test_id
    assert test.name == "site-b" and test.ignored_classes == ["platelet"]
    assert test.n_per_class == dict.fromkeys(external.classes, 4) and test.total == 20
    assert external.downstream.n_test == 20 != typed.downstream.n_test
    assert external.distribution["prototype"].overall.n_real == 20  # measured against it
