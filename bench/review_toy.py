"""The whole review loop on the toy domain with real models and the rule-based reviewer.

Trains both modes (cpu-small) through the API, generates every class, sends the batches to a
running Label Studio for blinded review, lets the toy domain's rule-based checker annotate every
task through Label Studio's API (as an expert would in its UI), then saves the plausibility
report (JSON with the run's provenance under ``run``; CSV with it beside, ``report.csv.run.json``)
and screenshots of the dashboard. Services: SQLite, the SQLite-backed queue and local storage
under --out; the API and a worker run as real processes.

    .venv/bin/python -m bench.review_toy --ls-url http://127.0.0.1:8080 --ls-token TOKEN
    # toy size (tests/test_bench.py): a few images, a tiny model, no screenshots
    .venv/bin/python -m bench.review_toy --preset tiny --steps 2 --n-per-class 6 --n 2 \
        --sample-steps 2 --no-screenshots --out /tmp/review-toy
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.provenance import run_info, sidecar
from bench.testkit import tests_module

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY: str = tests_module("conftest").ADMIN_KEY
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait(api: httpx.Client, job_id: int, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} did not finish")


def review_all(api: httpx.Client, ls: Any, ls_project: int) -> int:
    """The rule-based reviewer: the toy checker's verdict per criterion, posted to Label Studio."""
    from ml.data.toy import check_image
    from service.criteria import annotation_result

    raw = ls.projects.exports.download_sync(ls_project, export_type="JSON", download_all_tasks=True)
    tasks = json.loads(b"".join(raw))
    for task in tasks:
        png = api.get(task["data"]["image"]).content
        verdict = check_image(
            Image.open(io.BytesIO(png)).convert("RGB"), task["data"]["expected_class"]
        )
        crits = {c.name: "pass" if c.passed else "fail" for c in verdict.criteria}
        ls.annotations.create(task["id"], result=annotation_result(crits))
    return len(tasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ls-url", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_URL"))
    ap.add_argument("--ls-token", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_TOKEN"))
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--steps", type=int, default=300, help="training steps per mode")
    ap.add_argument("--n-per-class", type=int, default=60, help="toy training images per class")
    ap.add_argument("--n", type=int, default=8, help="images per class and mode")
    ap.add_argument("--sample-steps", type=int, default=None, help="default: the sampler's")
    ap.add_argument("--no-screenshots", dest="screenshots", action="store_false")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "review-toy")
    args = ap.parse_args()
    info = run_info(args)
    if not args.ls_url or not args.ls_token:
        ap.error("give --ls-url and --ls-token (a running Label Studio with a legacy token)")
    from label_studio_sdk import LabelStudio

    from ml.data.toy import write_toy_dataset

    conftest, procs = tests_module("conftest"), tests_module("service_procs")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_toy_dataset(out / "data" / "toy", n_per_class=args.n_per_class, size=32, seed=0)
    port = procs.free_port()
    env = conftest.service_env(
        out,
        PROTOMED_LABEL_STUDIO_URL=args.ls_url,
        PROTOMED_LABEL_STUDIO_TOKEN=args.ls_token,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET="toy-run",
    )
    os.environ.update(env)
    conftest.migrate(env["PROTOMED_DATABASE_URL"])
    api_proc = procs.ApiServer(env, out / "api.log", port)
    worker = procs.Worker(env, out / "worker.log")
    t0 = time.perf_counter()
    try:
        api_proc.wait_ready()
        worker.wait_ready()
        with httpx.Client(base_url=api_proc.url, timeout=60) as api:
            ds = api.post(
                "/datasets", json={"name": "toy", "path": "toy", "domain": "toy"}, headers=AUTH
            ).json()
            body = {
                "dataset_id": ds["id"],
                "mode": "both",
                "preset": args.preset,
                "n_per_class": args.n_per_class,
                "n_heldout": 0,
                "overrides": {"max_steps": args.steps},
            }
            jobs = api.post("/jobs/train", json=body, headers=AUTH).json()["jobs"]
            models = [wait(api, j["id"])["model_id"] for j in jobs]
            print(f"trained in {time.perf_counter() - t0:.0f} s")
            batches = []
            steps = {} if args.sample_steps is None else {"steps": args.sample_steps}
            for model in models:
                for cls in ds["classes"]:
                    params = {"class": cls, "n": args.n, "model_id": model, **steps}
                    r = api.post("/generate", params=params, headers=AUTH).json()
                    batches.append((r["job"]["id"], r["batch"]["id"]))
            for job_id, _ in batches:
                wait(api, job_id)
            r = api.post("/reviews", json={"batch_ids": [b for _, b in batches]}, headers=AUTH)
            wait(api, r.json()["job"]["id"])
            ls_project = api.get("/reviews/projects", headers=AUTH).json()[0]["ls_project_id"]
            ls = LabelStudio(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
                base_url=args.ls_url, api_key=args.ls_token, timeout=60
            )
            n = review_all(api, ls, ls_project)
            for _ in range(120):
                report = api.get("/reports/plausibility", headers=AUTH).json()
                if sum(m["reviews"] for m in report["average"]["pooled"].values()) == n:
                    break
                time.sleep(0.5)
            (out / "report.json").write_text(json.dumps({"run": info, **report}, indent=2))
            csv_text = api.get("/reports/plausibility", params={"format": "csv"}, headers=AUTH).text
            (out / "report.csv").write_text(csv_text)
            sidecar(out / "report.csv", info)
            if args.screenshots:
                shoot = tests_module("browser").screenshot
                for path, name in (("/ui/reports/plausibility", "report.png"), ("/ui", "jobs.png")):
                    shoot(api_proc.url, ADMIN_KEY, path, out / name, width=1280)
            print(csv_text)
            print(f"{n} images reviewed; whole run {time.perf_counter() - t0:.0f} s; in {out}")
    finally:
        worker.stop()
        api_proc.stop()


if __name__ == "__main__":
    main()
