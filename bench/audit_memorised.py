"""The memorisation audit on a model that really memorised: a small UNet trained for thousands of
steps on 3 real images per class reproduces them, and the audit must flag its samples; the same
run after a few steps (noise-like samples) is the under-trained control, flagged no more often
than the calibrated rate. Fresh real held-out images (the audit's check half) give the
false-flag rate with its Clopper-Pearson interval.

    OMP_NUM_THREADS=1 python -m bench.audit_memorised --out bench/results/audit_memorised.json

One training run per dataset, resumed from checkpoint to checkpoint (the `tiny` preset's rate
is constant, so resuming is the same run as training straight through: ``ml.diffusion.train``),
audited
at each step count in ``--steps``; the first is the control. Uses the untrained tiny encoder (no
weights offline), so CLIP space is random features and the pixel space does the work, as in
``bench/audit_planted.py``. Real data: PROTOMED_DATA_DIR (cells64, derm64); ``--datasets toy``
draws toy cells instead (always available; CI runs it at a tiny size, tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest

from bench.provenance import run_info
from ml.audit import audit_images
from ml.config import SampleConfig, TrainConfig, make_config
from ml.data.images import DatasetSplit, load_split
from ml.data.toy import write_toy_dataset
from ml.diffusion.sample import generate
from ml.diffusion.train import train
from ml.models.checkpoint import load_model
from ml.prototypes.encoder import ClipEncoder, EncoderSpec
from ml.prototypes.weights import TINY_MODEL
from ml.schemas.audit import AuditReport

CLASSES = {
    "cells64": ["lymphocyte", "monocyte", "neutrophil"],
    "derm64": ["bkl", "mel", "nv"],
    "toy": ["lymphocyte", "monocyte", "neutrophil"],
}
SAMPLERS = {"ddim-50": ("ddim", 50), "dpm++sde-20": ("dpm++sde", 20)}


def memorising_config(n_train: int, steps: int, base_channels: int, seed: int) -> TrainConfig:
    """The ``tiny`` preset (16 px, fp32, constant rate 1e-3), widened to ``base_channels`` (8
    channels learn too slowly to memorise within minutes), without dropout and flips (both slow
    memorisation; the audit then compares unflipped only, as the service does for flip=False),
    every training image in every batch."""
    return make_config(
        "tiny",
        {
            "mode": "baseline",
            "base_channels": base_channels,
            "dropout": 0.0,
            "flip": False,
            "batch_size": n_train,
            "max_steps": steps,
            "checkpoint_every": 10**7,
            "seed": seed,
        },
    )


def draw(run: Path, classes: list[str], n: int, sampler: str, seed: int) -> torch.Tensor:
    """``n`` images per class from the run's EMA weights (guidance 2, the service default)."""
    name, steps = SAMPLERS[sampler]
    loaded = load_model(run)
    scfg = SampleConfig(scheduler=name, steps=steps, precision="fp32", seed=seed)
    return torch.cat([generate(loaded, c, n, scfg) for c in classes])


def interval(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def summary(rep: AuditReport, split: DatasetSplit) -> dict[str, Any]:
    """The figures the README quotes: flagged share, nearest-training pixel distances against the
    thresholds, which training images the flagged samples reproduce, and the held-out check."""
    t = rep.totals
    pixel = np.array([a.pixel.distance for a in rep.images if a.pixel is not None])
    thresholds = {c.class_name: c.calibration.thresholds for c in rep.per_class}
    # each image's distance over its own class's pixel threshold (<= 1: under it)
    rel = np.array(
        [
            a.pixel.distance / thresholds[a.class_name]["pixel"]
            for a in rep.images
            if a.pixel is not None
        ]
    )
    flagged = [a.pixel for a in rep.images if a.flagged and a.pixel is not None]
    labels = split.train.labels.tolist()
    own = sum(
        split.classes[labels[a.pixel.train_index]] == a.class_name
        for a in rep.images
        if a.flagged and a.pixel is not None
    )
    return {
        "flagged": [t.n_flagged, t.n_images],
        "flag_rate": t.flag_rate,
        "flagged_interval95": interval(t.n_flagged, t.n_images),
        "flagged_by": {s: sum(s in a.flagged_by for a in rep.images) for s in rep.config.spaces},
        "pixel_distance_median": round(float(np.median(pixel)), 4),
        "pixel_distance_range": [round(float(pixel.min()), 4), round(float(pixel.max()), 4)],
        "distance_over_threshold_median": round(float(np.median(rel)), 3),
        "pixel_thresholds": {c: round(v["pixel"], 4) for c, v in thresholds.items()},
        "heldout_pixel_median": {
            c.class_name: round(c.calibration.heldout_median["pixel"], 4) for c in rep.per_class
        },
        "dcr_ratio_pixel": {
            c.class_name: round(c.dcr_ratio["pixel"] or 0.0, 3) for c in rep.per_class
        },
        # distinct training images nearest to a flagged sample, and how many flagged samples
        # are nearest to a training image of their own class (the nearest is searched among all)
        "training_images_reproduced": [len({n.train_index for n in flagged}), len(labels)],
        "flagged_nearest_own_class": own,
        "expected_false_flag_rate": max(
            c.calibration.expected_false_flag_rate for c in rep.per_class
        ),
        "check": [t.check_flagged, t.n_check],
        "check_interval95": interval(t.check_flagged, t.n_check),
        "check_per_class": {
            c.class_name: [c.calibration.check_flagged, c.calibration.n_check]
            for c in rep.per_class
        },
    }


def load(name: str, data: Path, n_train: int, n_heldout: int, size: int) -> DatasetSplit:
    root = data / name
    if name == "toy":
        n = n_train + n_heldout
        root = write_toy_dataset(Path(tempfile.mkdtemp()), n_per_class=n, size=32, seed=0)
    return load_split(
        root, n_per_class=n_train, n_heldout=n_heldout, image_size=size, classes=CLASSES[name]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("PROTOMED_DATA_DIR", default_data))
    )
    ap.add_argument("--datasets", default="cells64,derm64")
    ap.add_argument("--train-per-class", type=int, default=3)
    ap.add_argument("--heldout-per-class", type=int, default=60)
    ap.add_argument("--samples-per-class", type=int, default=30)
    ap.add_argument(
        "--steps",
        default="100,1000,2000,3000",
        help="training steps audited, ascending; the first is the control",
    )
    ap.add_argument("--samplers", default="ddim-50,dpm++sde-20")
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    steps = sorted(int(s) for s in args.steps.split(","))
    samplers = args.samplers.split(",")
    encoder = ClipEncoder(EncoderSpec(TINY_MODEL, None), device="cpu", allow_untrained=True)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    head = (
        f"{'data':<8}{'steps':>6} {'sampler':<12}{'flagged':>9}{'median d':>10}{'d/thr':>7}"
        f"{'copied':>7}{'check':>8}{'check 95% CI':>16}{'expected':>9}"
    )
    lines = [head]
    t_all = time.perf_counter()
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        split = load(name, args.data, args.train_per_class, args.heldout_per_class, 16)
        run = Path(tempfile.mkdtemp()) / "run"
        n_train = len(split.train)
        rows: dict[str, Any] = {}
        train_s = sample_s = audit_s = 0.0
        done = 0
        for s in steps:
            cfg = memorising_config(n_train, s, args.base_channels, args.seed)
            t1 = time.perf_counter()
            res = train(
                cfg, split.train, run, resume=run / "last.pt" if done else None, show_progress=False
            )
            train_s += time.perf_counter() - t1
            done = s
            for sampler in samplers:
                t1 = time.perf_counter()
                images = draw(run, split.classes, args.samples_per_class, sampler, args.seed)
                sample_s += time.perf_counter() - t1
                classes = [c for c in split.classes for _ in range(args.samples_per_class)]
                t1 = time.perf_counter()
                rep = audit_images(images, classes, split, encoder, flips=cfg.flip)
                audit_s += time.perf_counter() - t1
                row = {
                    "steps": s,
                    "final_loss": round(res.final_loss, 5),
                    "sampler": sampler,
                    **summary(rep, split),
                }
                rows[f"{s} {sampler}"] = row
                lo, hi = row["check_interval95"]
                lines.append(
                    f"{name:<8}{s:>6} {sampler:<12}"
                    f"{'{}/{}'.format(*row['flagged']):>9}{row['pixel_distance_median']:>10.4f}"
                    f"{row['distance_over_threshold_median']:>7.2f}"
                    f"{'{}/{}'.format(*row['training_images_reproduced']):>7}{'{}/{}'.format(*row['check']):>8}"
                    f"{f'{lo:.1%}-{hi:.1%}':>16}{row['expected_false_flag_rate']:>9.1%}"
                )
                print(lines[-1], flush=True)
        results[name] = {
            "classes": split.classes,
            "n_train": n_train,
            "n_heldout": len(split.heldout),
            "image_size": 16,
            "base_channels": args.base_channels,
            "parameters": sum(p.numel() for p in load_model(run).model.parameters()),
            "rows": rows,
            "seconds": {
                "total": round(time.perf_counter() - t0, 1),
                "train": round(train_s, 1),
                "sample": round(sample_s, 1),
                "audit": round(audit_s, 1),
            },
        }
        print(name, "seconds", json.dumps(results[name]["seconds"]), flush=True)
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    print("\n".join(lines))
    print(f"wall time {results['seconds']} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": run_info(args), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
