"""A guidance sweep on the toy domain with a trained model and the rule-based reviewer.

Trains one model (cpu-small, baseline mode by default) through the API, runs a guidance sweep
(every class asked at each scale, the same seeds at every scale), sends it to a running Label
Studio for blinded review, lets the toy domain's rule-based checker annotate every task through
Label Studio's API (as an expert would in its UI), applies the recommended scales and saves the
sweep report (JSON with the run's provenance under ``run``; CSV with it beside,
``sweep.csv.run.json``) and a screenshot of its dashboard page. Services: SQLite, the
SQLite-backed queue and local storage under --out; the API and a worker run as real processes.

    .venv/bin/python -m bench.sweep_toy --ls-url http://127.0.0.1:8080 --ls-token TOKEN
    # toy size (tests/test_bench.py): two classes, two scales, a tiny model, no screenshot
    .venv/bin/python -m bench.sweep_toy --preset tiny --steps 2 --n-per-class 6 \
        --classes lymphocyte,neutrophil --scales 1,4 --n 2 --sample-steps 2 --no-screenshot \
        --out /tmp/sweep-toy
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx

from bench.provenance import run_info, sidecar
from bench.review_toy import ADMIN_KEY, AUTH, review_all, wait
from bench.testkit import tests_module

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ls-url", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_URL"))
    ap.add_argument("--ls-token", default=os.environ.get("PROTOMED_TEST_LABEL_STUDIO_TOKEN"))
    ap.add_argument("--mode", default="baseline", choices=["baseline", "prototype"])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    ap.add_argument("--n-per-class", type=int, default=60, help="toy training images per class")
    ap.add_argument("--classes", default="lymphocyte,monocyte,neutrophil")
    ap.add_argument("--scales", default="0,1,2,4")
    ap.add_argument("--n", type=int, default=16, help="images per class and scale")
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "sweep-toy")
    ap.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    ap.add_argument("--screenshot", type=Path, default=None, help="default: OUT/sweep.png")
    ap.add_argument("--no-screenshot", dest="shoot", action="store_false")
    args = ap.parse_args()
    info = run_info(args)
    if not args.ls_url or not args.ls_token:
        ap.error("give --ls-url and --ls-token (a running Label Studio with a legacy token)")
    from label_studio_sdk import LabelStudio

    from ml.data.toy import write_toy_dataset

    conftest, procs = tests_module("conftest"), tests_module("service_procs")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    classes = [c for c in args.classes.split(",") if c]
    write_toy_dataset(out / "data" / "toy", n_per_class=args.n_per_class, size=32, seed=0)
    port = procs.free_port()
    env = conftest.service_env(
        out,
        PROTOMED_LABEL_STUDIO_URL=args.ls_url,
        PROTOMED_LABEL_STUDIO_TOKEN=args.ls_token,
        PROTOMED_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PROTOMED_REVIEW_WEBHOOK_SECRET="toy-run",
        PROTOMED_REVIEW_PULL_S="3600",
    )
    os.environ.update(env)
    conftest.migrate(env["PROTOMED_DATABASE_URL"])
    # one torch thread: on a loaded 2-core machine two threads waiting on each other run slower
    api_proc = procs.ApiServer(env, out / "api.log", port)
    worker = procs.Worker(env, out / "worker.log", threads=args.threads)
    t0 = time.perf_counter()
    try:
        api_proc.wait_ready()
        worker.wait_ready()
        with httpx.Client(base_url=api_proc.url, timeout=60, headers=AUTH) as api:
            ds = api.post("/datasets", json={"name": "toy", "path": "toy", "domain": "toy"}).json()
            body = {
                "dataset_id": ds["id"],
                "mode": args.mode,
                "preset": args.preset,
                "n_per_class": args.n_per_class,
                "n_heldout": 0,
                "classes": classes,
                # the demo's recipe (ml.demo.DEMO_RECIPE): 24x24 images, min-SNR weighting
                "overrides": {
                    "max_steps": args.steps,
                    "image_size": 24,
                    "loss_weighting": "min_snr",
                },
            }
            (job,) = api.post("/jobs/train", json=body).json()["jobs"]
            model = wait(api, job["id"])["model_id"]
            print(f"trained in {time.perf_counter() - t0:.0f} s")
            sweep_body = {
                "scales": [float(s) for s in args.scales.split(",")],
                "n": args.n,
                "steps": args.sample_steps,
                "scheduler": "dpm++sde",
            }
            r = api.post(f"/models/{model}/sweeps", json=sweep_body)
            r.raise_for_status()
            sweep = r.json()["sweep"]
            for j in r.json()["jobs"]:
                wait(api, j["id"])
            print(f"sweep generated at {time.perf_counter() - t0:.0f} s")
            r = api.post(f"/sweeps/{sweep['id']}/review")
            r.raise_for_status()
            wait(api, r.json()["job"]["id"])
            ls_project = api.get("/reviews/projects").json()[0]["ls_project_id"]
            ls = LabelStudio(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
                base_url=args.ls_url, api_key=args.ls_token, timeout=60
            )
            n = review_all(api, ls, ls_project)
            for j in api.post("/reviews/sync").json():
                wait(api, j["id"])
            for _ in range(240):
                rep = api.get(f"/sweeps/{sweep['id']}/report").json()
                got = sum(e["plausibility"]["reviews"] for c in rep["classes"] for e in c["scales"])
                if got == n:
                    break
                time.sleep(0.5)
            applied = api.post(f"/sweeps/{sweep['id']}/apply")
            print("apply:", applied.status_code, applied.json())
            rep = api.get(f"/sweeps/{sweep['id']}/report").json()
            (out / "sweep.json").write_text(json.dumps({"run": info, **rep}, indent=2))
            csv_text = api.get(f"/sweeps/{sweep['id']}/report", params={"format": "csv"}).text
            (out / "sweep.csv").write_text(csv_text)
            sidecar(out / "sweep.csv", info)
            if args.shoot:
                shot = args.screenshot or out / "sweep.png"
                screenshot = tests_module("browser").screenshot
                screenshot(api_proc.url, ADMIN_KEY, f"/ui/sweeps/{sweep['id']}", shot)
            print(csv_text)
            print(f"{n} images reviewed; whole run {time.perf_counter() - t0:.0f} s; in {out}")
    finally:
        worker.stop()
        api_proc.stop()


if __name__ == "__main__":
    main()
