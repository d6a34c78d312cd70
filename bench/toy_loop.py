"""What the whole-service toy benches share (``bench.review_toy``, ``bench.study_toy``): the
service as real processes under one folder, both modes trained through the API, a batch per
class and mode, and the toy checker's verdict on a Label Studio task's image.

Services: SQLite, the SQLite-backed queue and local storage under the bench's --out; the API
and a worker run as real processes, since Label Studio must reach the API (webhooks, images).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.testkit import tests_module

ADMIN_KEY: str = tests_module("conftest").ADMIN_KEY
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait(api: httpx.Client, job_id: int, timeout: float = 3600) -> dict[str, Any]:
    """The job once it succeeded; RuntimeError when it failed or was cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not finish")


@dataclass
class ToyService:
    api: httpx.Client  # the API, with the admin key
    url: str  # its address (screenshots)


@contextmanager
def toy_service(
    out: Path, ls_url: str, ls_token: str, threads: int = 2, **extra: str
) -> Iterator[ToyService]:
    """The API and a worker (``threads`` torch threads) as real processes, their database,
    queue and storage under ``out``, talking to the Label Studio at ``ls_url``; stopped on
    exit. Datasets go under ``out/data``."""
    conftest, procs = tests_module("conftest"), tests_module("service_procs")
    (out / "data").mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    env = conftest.service_env(
        out,
        PROTOMED_LABEL_STUDIO_URL=ls_url,
        PROTOMED_LABEL_STUDIO_TOKEN=ls_token,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET="toy-run",
        **extra,
    )
    os.environ.update(env)
    conftest.migrate(env["PROTOMED_DATABASE_URL"])
    api_proc = procs.ApiServer(env, out / "api.log", port)
    worker = procs.Worker(env, out / "worker.log", threads=threads)
    try:
        api_proc.wait_ready()
        worker.wait_ready()
        with httpx.Client(base_url=api_proc.url, timeout=60, headers=AUTH) as api:
            yield ToyService(api, api_proc.url)
    finally:
        worker.stop()
        api_proc.stop()


def train_both(
    api: httpx.Client,
    dataset_id: int,
    preset: str,
    n_per_class: int,
    steps: int,
    n_heldout: int = 0,
) -> list[int]:
    """A baseline and a prototype model trained through the API; their ids, baseline first.
    ``n_heldout`` images per class stay out of training (the source of real controls)."""
    body = {
        "dataset_id": dataset_id,
        "mode": "both",
        "preset": preset,
        "n_per_class": n_per_class,
        "n_heldout": n_heldout,
        "overrides": {"max_steps": steps},
    }
    r = api.post("/jobs/train", json=body, headers=AUTH)
    r.raise_for_status()
    return [int(wait(api, j["id"])["model_id"]) for j in r.json()["jobs"]]


def generate_all(
    api: httpx.Client, models: list[int], classes: list[str], n: int, steps: int | None
) -> list[int]:
    """One batch of ``n`` images per model and class (``steps``: the sampler's default when
    None), all finished; the batch ids."""
    queued = []
    for model in models:
        for cls in classes:
            params: dict[str, str | int] = {"class": cls, "n": n, "model_id": model}
            if steps is not None:
                params["steps"] = steps
            r = api.post("/generate", params=params, headers=AUTH)
            r.raise_for_status()
            queued.append((r.json()["job"]["id"], r.json()["batch"]["id"]))
    for job_id, _ in queued:
        wait(api, job_id)
    return [int(b) for _, b in queued]


def task_image(api: httpx.Client, task: dict[str, Any]) -> Image.Image:
    """A Label Studio task's image as its reader sees it: the blinded review copy, in RGB."""
    png = api.get(task["data"]["image"]).content
    return Image.open(io.BytesIO(png)).convert("RGB")


def checker_criteria(image: Image.Image, expected_class: str) -> dict[str, str]:
    """The toy checker's verdict per criterion, as the labelling interface's choices."""
    from ml.data.toy import check_image

    verdict = check_image(image, expected_class)
    return {c.name: "pass" if c.passed else "fail" for c in verdict.criteria}


def export_tasks(ls_url: str, ls_token: str, ls_project: int) -> list[dict[str, Any]]:
    """Every task of a Label Studio project with its data, through the admin's export."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        base_url=ls_url, api_key=ls_token, timeout=60
    )
    raw = ls.projects.exports.download_sync(ls_project, export_type="JSON", download_all_tasks=True)
    tasks: list[dict[str, Any]] = json.loads(b"".join(raw))
    return tasks
