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
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from bench.provenance import run_info, sidecar
from bench.testkit import tests_module
from bench.toy_loop import (
    ADMIN_KEY,
    AUTH,
    checker_criteria,
    generate_all,
    task_image,
    toy_service,
    train_both,
    wait,
)

REPO = Path(__file__).resolve().parents[1]
__all__ = ["ADMIN_KEY", "AUTH", "review_all", "wait"]  # bench.sweep_toy imports them from here


def review_all(api: httpx.Client, ls: Any, ls_project: int) -> int:
    """The rule-based reviewer: the toy checker's verdict per criterion, posted to Label Studio."""
    from service.criteria import annotation_result

    raw = ls.projects.exports.download_sync(ls_project, export_type="JSON", download_all_tasks=True)
    tasks = json.loads(b"".join(raw))
    for task in tasks:
        crits = checker_criteria(task_image(api, task), task["data"]["expected_class"])
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

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_toy_dataset(out / "data" / "toy", n_per_class=args.n_per_class, size=32, seed=0)
    t0 = time.perf_counter()
    with toy_service(out, args.ls_url, args.ls_token) as service:
        api = service.api
        ds = api.post(
            "/datasets", json={"name": "toy", "path": "toy", "domain": "toy"}, headers=AUTH
        ).json()
        models = train_both(api, ds["id"], args.preset, args.n_per_class, args.steps)
        print(f"trained in {time.perf_counter() - t0:.0f} s")
        batches = generate_all(api, models, ds["classes"], args.n, args.sample_steps)
        r = api.post("/reviews", json={"batch_ids": batches}, headers=AUTH)
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
                shoot(service.url, ADMIN_KEY, path, out / name, width=1280)
        print(csv_text)
        print(f"{n} images reviewed; whole run {time.perf_counter() - t0:.0f} s; in {out}")


if __name__ == "__main__":
    main()
