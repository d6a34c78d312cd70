"""Step time on a busy machine: torch's default threads against ``PROTOMED_THREADS=auto``.

Load is made by N bounded busy-loop helper processes (N in ``--loads``; each stops by itself
after ``--helper-limit`` seconds, or when this process is gone, and all are killed at the end of
their level). At each load the policies are measured interleaved, every measurement in a fresh
process (OpenMP reads its environment when torch is imported):

- ``default``: what protomed did before: torch's own default (one thread per core) and
  libgomp's default wait (spin 300,000 times before sleeping);
- ``auto``: what protomed does now: the count :func:`ml.runtime.choose_threads` picks at this
  load, and ``OMP_WAIT_POLICY=PASSIVE`` where the machine is busy
  (:func:`ml.runtime.prefer_passive_wait`). The parent makes both choices once per level,
  after ``--settle`` seconds with the helpers running (the 1-minute load average needs about a
  minute to see them) and before any measurement of the level, so the bench's own
  measurements do not count as "other processes";
- ``N``: exactly N threads, libgomp's default wait;

each optionally with ``:passive`` (``OMP_WAIT_POLICY=PASSIVE``), ``:active`` or ``:spinN``
(``GOMP_SPINCOUNT=N``) to set the wait. Measured: a training step (forward, backward, AdamW)
and DDIM sampling, seconds per step and per image.

    .venv/bin/python -m bench.threads                                   # the full run
    .venv/bin/python -m bench.threads --loads 0 1 --repeats 1 --settle 0 --preset tiny  # smoke
    .venv/bin/python -m bench.threads --loads 1 --policies 2 2:passive 1 1:passive  # wait policy

The machine's load average when the bench starts is recorded (``machine_load_before``): a run on
a machine other jobs were using is labelled as such.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.provenance import run_info
from ml.runtime import (
    AUTO,
    WAIT_POLICY_ENV,
    choose_threads,
    machine_is_busy,
    other_load,
    usable_cores,
)

REPO = Path(__file__).resolve().parents[1]
WAIT = {"passive": "PASSIVE", "active": "ACTIVE"}
PROTOMED_WAIT = "as protomed"  # auto's wait: what ml.runtime.prefer_passive_wait would set


def _busy(deadline: float, parent: int) -> None:
    """Spin until ``deadline`` (monotonic) or until the bench that started us is gone."""
    n = 0
    while True:
        n += 1
        if n % 1_000_000 == 0 and (time.monotonic() > deadline or os.getppid() != parent):
            return


class Load:
    """``n`` busy-loop processes, each with a hard time limit of ``limit`` seconds."""

    def __init__(self, n: int, limit: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        deadline = time.monotonic() + limit
        self.procs = [
            ctx.Process(target=_busy, args=(deadline, os.getpid()), daemon=True) for _ in range(n)
        ]

    def __enter__(self) -> Load:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join(10)
        if alive := [p.pid for p in self.procs if p.is_alive()]:
            raise RuntimeError(f"load helpers {alive} outlived their level")


def parse_policy(policy: str) -> tuple[str, str | None]:
    """``default``/``auto``/``N``, and the OpenMP wait setting as ``NAME=VALUE`` (``None``:
    libgomp's default)."""
    threads, _, wait = policy.partition(":")
    if threads not in ("default", AUTO) and not threads.isdigit():
        raise SystemExit(f"policy {policy!r}: use default, auto or N, optionally :passive/:active")
    if wait.startswith("spin") and wait[4:].isdigit():
        return threads, f"GOMP_SPINCOUNT={wait[4:]}"
    if wait and wait not in WAIT:
        raise SystemExit(f"policy {policy!r}: the wait policy is passive, active or spinN")
    if not wait and threads == AUTO:
        return threads, PROTOMED_WAIT
    return threads, f"OMP_WAIT_POLICY={WAIT[wait]}" if wait else None


def measure(threads: int | None, wait: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process: ``threads`` intra-op threads (``None``: torch's default)."""
    drop = {"OMP_NUM_THREADS", "PROTOMED_THREADS", *WAIT_POLICY_ENV}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if wait:
        name, _, value = wait.partition("=")
        env[name] = value
    # torch first: importing bench or ml must not set a wait policy the row did not ask for.
    code = "import torch; from bench.threads import main; main()"
    cmd = [sys.executable, "-c", code, "--child", "--preset", args.preset]
    cmd += ["--batch", str(args.batch), "--train-steps", str(args.train_steps)]
    cmd += ["--sample-n", str(args.sample_n), "--sample-steps", str(args.sample_steps)]
    cmd += ["--threads", str(threads or 0)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def child(args: argparse.Namespace) -> None:
    """Runs in the measuring process: print one JSON line."""
    import torch

    from bench.peer import build
    from bench.speed import sample_rate, train_rate
    from ml.runtime import tune_allocator

    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    model, cfg = build("ours", args.preset, "fp32")
    cfg = cfg.model_copy(update={"batch_size": args.batch})
    train_s = args.batch / train_rate(model, cfg, "fp32", args.train_steps)
    sample_s = 1 / sample_rate(model, cfg, "fp32", args.sample_n, args.sample_steps)
    row = {"threads": torch.get_num_threads(), "train_step_s": train_s, "sample_image_s": sample_s}
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", nargs="+", type=int, default=[0, 1, 2, 4])
    ap.add_argument("--policies", nargs="+", default=["default", AUTO])
    ap.add_argument("--preset", default="cpu-small", choices=["cpu-small", "tiny"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--sample-n", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=65.0, help="seconds before each level")
    ap.add_argument("--helper-limit", type=float, default=3600.0, help="helpers' hard limit (s)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "threads.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    policies = [(p, *parse_policy(p)) for p in args.policies]
    started = time.monotonic()
    load_before = list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    for load in args.loads:
        with Load(load, args.helper_limit):
            time.sleep(args.settle)
            auto = choose_threads(AUTO)
            passive = "OMP_WAIT_POLICY=PASSIVE" if machine_is_busy() else None
            level_load = other_load()
            for rep in range(args.repeats):
                for name, threads, wait in policies:
                    n = (
                        None
                        if threads == "default"
                        else auto.threads
                        if threads == AUTO
                        else int(threads)
                    )
                    wait = passive if wait == PROTOMED_WAIT else wait
                    row = {"load": load, "policy": name, "repeat": rep, "wait_policy": wait}
                    row.update(measure(n, wait, args))
                    if threads == AUTO:
                        row["choice"] = auto.reason
                    row["loadavg_1min"] = level_load
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = summarise(rows)
    for s in summary:
        print(
            f"load {s['load']}  {s['policy']:<12} threads {s['threads']}  "
            f"train {s['train_step_s']:.3f} s/step  sample {s['sample_image_s']:.3f} s/image"
        )
    result = {
        "run": run_info(args),
        "machine_load_before": load_before,
        "usable_cores": usable_cores(),
        "seconds": time.monotonic() - started,
        "summary": summary,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median step and image times per load and policy."""
    keys = dict.fromkeys((r["load"], r["policy"]) for r in rows)
    out = []
    for load, policy in keys:
        mine = [r for r in rows if r["load"] == load and r["policy"] == policy]
        out.append(
            {
                "load": load,
                "policy": policy,
                "threads": mine[0]["threads"],
                "train_step_s": statistics.median(r["train_step_s"] for r in mine),
                "sample_image_s": statistics.median(r["sample_image_s"] for r in mine),
            }
        )
    return out


if __name__ == "__main__":
    main()
