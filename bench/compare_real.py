"""Does prototype guidance help here? The whole comparison on the real datasets, at a size this
CPU can do in under an hour: prototypes, both modes trained at an equal budget, then
``protomed evaluate`` (real / baseline / prototype classifiers over 3 seeds, CLIP-space metrics).

    .venv/bin/python bench/compare_real.py                     # derm64 and cells64, defaults
    .venv/bin/python bench/compare_real.py --steps 3000 --device cuda   # a real budget on a GPU

Writes bench/results/compare_real.json and prints the tables (they go into the README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Held-out images per class: 50 as the seed where a class has enough (cells64: 120 each);
# derm64's smallest class (df) has 95 images, so 25 are held out there.
DATASETS = {"cells64": (70, 50), "derm64": (65, 25)}


def run(*args: object) -> str:
    cmd = [sys.executable, "-m", "protomed_cli", *map(str, args)]
    print("+", " ".join(cmd[3:]), flush=True)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get(
        "PROTOMED_DATA_DIR", REPO.parent / "shared" / "data")))  # fmt: skip
    ap.add_argument("--datasets", default="cells64,derm64")
    ap.add_argument("--steps", type=int, default=400, help="training steps per mode")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps for evaluation")
    ap.add_argument("--epochs", type=int, default=30, help="classifier epochs")
    ap.add_argument("--encoder", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None, help="CLIP weights (default: untrained)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    ap.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results" / "compare_real.json"
    )
    args = ap.parse_args()
    enc = ["--encoder", args.encoder]
    enc += ["--pretrained", args.pretrained] if args.pretrained else ["--untrained"]
    dev = ["--device", args.device] if args.device else []
    results = {}
    for name in args.datasets.split(","):
        n_train, n_held = DATASETS[name]
        out, t0 = args.out / name, time.perf_counter()
        run("prototypes", args.data / name, "--out", out / "codebook", "--n-per-class", n_train,
            "--heldout", n_held, "--image-size", 32, *enc, *dev)  # fmt: skip
        for mode in ("baseline", "prototype"):
            run("train", "--mode", mode, "--codebook", out / "codebook", "--preset", "cpu-small",
                "--set", f"max_steps={args.steps}", "--out", out / mode, *dev)  # fmt: skip
        table = run("evaluate", "--baseline", out / "baseline", "--prototype", out / "prototype",
                    "--codebook", out / "codebook", "--out", out / "evaluation.json",
                    "--steps", args.sample_steps, "--epochs", args.epochs, *enc, *dev)  # fmt: skip
        result = json.loads((out / "evaluation.json").read_text())
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        result["budget"] = {"train_steps": args.steps, "preset": "cpu-small",
                            "sample_steps": args.sample_steps, "encoder": args.encoder,
                            "pretrained": args.pretrained}  # fmt: skip
        results[name] = result
        print(f"== {name} ({result['wall_s']:.0f} s)\n{table}", flush=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
