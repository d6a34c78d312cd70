"""``protomed serve``, the embedded mode, end to end over real HTTP: one command starts the API
and a worker process with SQLite (database and Celery queue) and local files; no Redis,
PostgreSQL or S3. Register the toy domain, train both modes for a few steps, generate, fetch."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_procs import free_port, wait_serving

from ml.data.toy import write_toy_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_serve_trains_and_generates_with_embedded_defaults(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path / "data" / "toy", n_per_class=6, size=32, seed=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOMED_")}
    env |= {
        "PROTOMED_ENCODER": "protomed-tiny-vit",
        "PROTOMED_ENCODER_WEIGHTS": "untrained",
        "OMP_NUM_THREADS": "2",
    }
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "protomed_cli",
        "serve",
        "--port",
        str(port),
        "--data-root",
        str(tmp_path / "data"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            ready = wait_serving(
                lambda: http.get("/ready").status_code == 200, 600, "not ready", log, proc
            )
            assert ready
            key = (tmp_path / ".protomed-admin-key").read_text().strip()
            assert key in log.read_text()  # printed once for the user
            auth = {"Authorization": f"Bearer {key}"}
            # reads are locked in embedded mode too; the dashboard login takes the printed key
            assert http.get("/datasets").status_code == 401
            assert (
                "dashboard: " in log.read_text() and "log in with the admin key" in log.read_text()
            )
            assert http.get("/ui").status_code == 303
            login = http.post("/ui/login", data={"key": key, "next": "/ui"})
            assert login.status_code == 303 and login.headers["location"] == "/ui"
            assert (
                key not in login.headers["set-cookie"] and "HttpOnly" in login.headers["set-cookie"]
            )
            assert http.get("/ui").status_code == 200  # the client keeps the session cookie
            http.cookies.clear()
            r = http.post("/datasets", json={"name": "toy", "path": "toy"}, headers=auth)
            assert r.status_code == 201, r.text
            classes = r.json()["classes"]
            body = {
                "dataset_id": r.json()["id"],
                "mode": "both",
                "preset": "cpu-small",
                "n_per_class": 6,
                "n_heldout": 0,
                "overrides": {"max_steps": 3, "batch_size": 8},
            }
            jobs = http.post("/jobs/train", json=body, headers=auth).json()["jobs"]

            seen: dict[int, dict] = {}  # the last state of each job, shown if one never ends

            def finished(job_id: int) -> dict | None:
                job = seen[job_id] = http.get(f"/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            what = lambda: f"training (jobs as last seen: {seen})"  # noqa: E731
            done = [wait_serving(lambda j=j: finished(j["id"]), 900, what, log) for j in jobs]
            assert [j["status"] for j in done] == ["succeeded", "succeeded"], done
            # a worker that dies is restarted by serve: the next job still runs
            children = subprocess.run(
                ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
            )
            assert children.stdout.split(), "serve started no worker process"
            for pid in children.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            # one dataset registered: its newest ready model of the mode is used
            params = {"class": classes[0], "n": 8, "steps": 10, "mode": "prototype"}
            r = http.post("/generate", params=params, headers=auth)
            assert r.status_code == 202, r.text
            job = wait_serving(lambda: finished(r.json()["job"]["id"]), 600, "sampling", log)
            assert job["status"] == "succeeded", job
            batch = http.get(f"/batches/{r.json()['batch']['id']}", headers=auth).json()
            assert len(batch["images"]) == 8 and batch["model_id"] == done[0]["model_id"]
            png = http.get(batch["images"][0]["url"], headers=auth)
            assert Image.open(io.BytesIO(png.content)).size == (32, 32)
        # everything lives in the working folder: SQLite files and local storage
        assert (tmp_path / "protomed.db").is_file() and (tmp_path / "protomed-broker.db").is_file()
        assert len(list((tmp_path / "storage" / "batches").rglob("*.png"))) == 8
        assert "worker exited with code" in log.read_text()
        with sqlite3.connect(tmp_path / "protomed-broker.db") as broker:  # prepared by serve
            assert broker.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            queues = {name for (name,) in broker.execute("SELECT name FROM kombu_queue")}
            assert {"gpu", "default"} <= queues
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
