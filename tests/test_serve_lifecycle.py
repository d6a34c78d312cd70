"""``protomed serve`` stops cleanly: SIGTERM (docker stop, systemd, kill) and SIGINT (Ctrl-C)
stop its worker too, and a job the worker was running goes back to the queue at once, at its
place, to run first at the next ``serve``.

Nothing here depends on the machine's speed: every wait is on a condition (generous timeouts
are hang guards only), and the checks are made on states, never on durations."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
from service_procs import Serve, alive, descendants, wait_job

from ml.data.toy import write_toy_dataset
from workers.training import STAGES

pytestmark = pytest.mark.slow


def _jobs(folder: Path) -> dict[int, dict]:
    with sqlite3.connect(folder / "protomed.db") as db:
        db.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")}


def _stop_and_check_no_orphans(serve: Serve, sig: int, *, group: bool = False) -> None:
    family = descendants(serve.proc.pid)
    assert family, "serve started no worker process"
    serve.signal(sig, group=group)
    code = serve.wait()
    left = [pid for pid in family if alive(pid)]
    assert not left, f"processes outlived serve: {left}\n{serve.tail()}"
    assert code == 128 + sig, (code, serve.tail())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_worker_on_signal(tmp_path: Path, sig: int) -> None:
    (tmp_path / "data").mkdir()
    serve = Serve(tmp_path, tmp_path / "serve.log")
    try:
        serve.wait_ready()
        _stop_and_check_no_orphans(serve, sig)
    finally:
        serve.close()


def test_ctrl_c_requeues_the_running_job_at_its_place(tmp_path: Path) -> None:
    """Three training jobs; Ctrl-C while the first is training. The worker takes no other job,
    the first is back in the queue (not ``running``, no attempt used up, checkpointed) by the
    time serve has exited, and the next serve runs it before the two submitted after it."""
    write_toy_dataset(tmp_path / "data" / "toy", n_per_class=6, size=32, seed=0)
    serve = Serve(tmp_path, tmp_path / "serve1.log")
    try:
        serve.wait_ready()
        key = (tmp_path / ".protomed-admin-key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=serve.url, timeout=60, headers=auth) as http:
            r = http.post("/datasets", json={"name": "toy", "path": "toy"})
            assert r.status_code == 201, r.text
            body = {
                "dataset_id": r.json()["id"],
                "mode": "baseline",
                "preset": "cpu-small",
                "n_per_class": 6,
                "n_heldout": 0,
                # far more steps than this test lets run: it is always stopped mid-training
                "overrides": {"max_steps": 100_000, "batch_size": 4, "checkpoint_every": 1000},
            }
            ids = [http.post("/jobs/train", json=body).json()["jobs"][0]["id"] for _ in range(3)]
            training = 1 - STAGES["train"] - STAGES["upload"]  # where the train stage begins
            wait_job(
                http,
                ids[0],
                until=("running",),
                timeout=600,
                predicate=lambda j: j["progress"] > training,
            )
        serve.signal(signal.SIGINT, group=True)  # what Ctrl-C in a terminal does
        assert serve.wait() == 128 + signal.SIGINT, serve.tail()
        jobs = _jobs(tmp_path)
        first = jobs[ids[0]]
        assert first["status"] == "queued" and first["attempts"] == 0, (first, serve.tail())
        assert "interrupted" in first["error"] and first["worker"] is None, first
        assert (tmp_path / "work" / "models" / str(first["model_id"]) / "last.pt").is_file()
        for later in ids[1:]:  # never started: the shutting-down worker took no new job
            assert jobs[later]["status"] == "queued" and jobs[later]["attempts"] == 0, jobs[later]
            assert jobs[later]["started_at"] is None, jobs[later]
    finally:
        serve.close()

    again = Serve(tmp_path, tmp_path / "serve2.log")
    try:
        again.wait_ready()
        with httpx.Client(base_url=again.url, timeout=60, headers=auth) as http:
            # it resumes from the checkpoint written when it was interrupted
            wait_job(
                http,
                ids[0],
                until=("running",),
                timeout=600,
                predicate=lambda _j: "resumed from" in again.text(),
            )
        jobs = _jobs(tmp_path)
        assert [jobs[i]["status"] for i in ids] == ["running", "queued", "queued"], jobs
        _stop_and_check_no_orphans(again, signal.SIGTERM)
        assert _jobs(tmp_path)[ids[0]]["status"] == "queued"
    finally:
        again.close()


def test_revoked_bootstrap_key_is_replaced_not_printed(tmp_path: Path) -> None:
    """An admin revokes serve's bootstrap key (it leaked, say). The next serve must neither
    print it nor bring it back: it creates a new admin key, keeps it in the key file and says
    why. A revoked PROTOMED_ADMIN_KEY is refused with a clear error."""
    (tmp_path / "data").mkdir()
    serve = Serve(tmp_path, tmp_path / "serve1.log")
    try:
        serve.wait_ready()
        old = (tmp_path / ".protomed-admin-key").read_text().strip()
        with httpx.Client(base_url=serve.url, timeout=60) as http:
            boot = {"Authorization": f"Bearer {old}"}
            keys = http.get("/keys", headers=boot).json()
            other = http.post("/keys", json={"name": "second admin", "role": "admin"}, headers=boot)
            assert other.status_code == 201, other.text
            second = {"Authorization": f"Bearer {other.json()['key']}"}
            r = http.post(f"/keys/{keys[0]['id']}/revoke", headers=second)
            assert r.status_code == 200 and r.json()["revoked_at"], r.text
        _stop_and_check_no_orphans(serve, signal.SIGTERM)
    finally:
        serve.close()

    again = Serve(tmp_path, tmp_path / "serve2.log")
    try:
        again.wait_ready()
        new = (tmp_path / ".protomed-admin-key").read_text().strip()
        assert new != old and old not in again.text(), again.tail()
        assert f"admin key: {new}" in again.text() and "was revoked" in again.text()
        with httpx.Client(base_url=again.url, timeout=60) as http:
            assert http.get("/keys", headers={"Authorization": f"Bearer {new}"}).status_code == 200
            assert http.get("/keys", headers={"Authorization": f"Bearer {old}"}).status_code == 401
        _stop_and_check_no_orphans(again, signal.SIGTERM)
    finally:
        again.close()

    refused = Serve(tmp_path, tmp_path / "serve3.log", PROTOMED_ADMIN_KEY=old)
    try:
        assert refused.wait() == 2
        assert "error: PROTOMED_ADMIN_KEY was revoked" in refused.text(), refused.tail()
        assert "Traceback" not in refused.text() and f"admin key: {old}" not in refused.text()
    finally:
        refused.close()
