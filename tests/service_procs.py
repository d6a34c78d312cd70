"""Real processes for service tests: a Celery worker, and waiting on jobs through the API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class Worker:
    """``celery worker`` in its own process group (so SIGKILL takes the pool child too)."""

    def __init__(self, env: dict[str, str], log: Path, queues: str = "gpu,default") -> None:
        self.log = log
        cmd = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues,
            "--concurrency", "1", "--pool", "prefork", "-n", f"test-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        full_env = {**os.environ, **env, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, env=full_env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.tail()}")
            if " ready." in self.log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)


def wait_job(client: Any, job_id: int, *, until: tuple[str, ...] = ("succeeded", "failed",
             "cancelled"), timeout: float = 300, worker: Worker | None = None,
             predicate: Any = None) -> dict[str, Any]:  # fmt: skip
    """Poll ``GET /jobs/{id}`` until its status is in ``until`` (and ``predicate`` holds)."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in until and (predicate is None or predicate(job)):
            return job
        time.sleep(0.5)
    extra = f"\nworker log:\n{worker.tail()}" if worker else ""
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout} s: {job}{extra}")
