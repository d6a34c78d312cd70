"""Cheaper sampling against DDIM-50 fp32 on the same model and seeds: DPM-Solver++ and its SDE
variant at 20 (and 10) steps, DDIM at 20 steps, and bf16 autocast.

Same checkpoint, same per-image noise seeds, guidance 2; quality by CLIP-space Frechet distance
to the real training images the model was trained on (its recorded data selection), by the mean
absolute pixel difference to DDIM-50 fp32's image from the same seed and, on the toy domain, by
the rule-based checker; speed by wall time per image. "ddim-50 seed 1" draws other seeds: its
FD change is the noise floor of the comparison at this n.

    .venv/bin/python -m bench.solver_quality runs/review-toy/work/models/1 --n 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.provenance import run_info
from ml.config import SampleConfig
from ml.data.images import ImageSet, load_selection
from ml.diffusion.sample import generate
from ml.evaluation.distribution import frechet_distance
from ml.evaluation.evaluate import _embed, _toy_plausibility
from ml.models.checkpoint import load_model
from ml.pipeline import training_data
from ml.prototypes.encoder import ClipEncoder, EncoderSpec

REPO = Path(__file__).resolve().parents[1]

# name: (scheduler, steps, precision, seed)
VARIANTS = {
    "ddim-50": ("ddim", 50, "fp32", 0),
    "ddim-50 seed 1": ("ddim", 50, "fp32", 1),
    "ddim-50 bf16": ("ddim", 50, "bf16", 0),
    "dpm++-20": ("dpm++", 20, "fp32", 0),
    "dpm++sde-20": ("dpm++sde", 20, "fp32", 0),
    "dpm++sde-20 bf16": ("dpm++sde", 20, "bf16", 0),
    "dpm++sde-10": ("dpm++sde", 10, "fp32", 0),
    "ddim-20": ("ddim", 20, "fp32", 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--n", type=int, default=16, help="images per class")
    ap.add_argument("--encoder", default="ViT-B-32")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "solver_quality.json")
    ap.add_argument(
        "--step-scale",
        type=float,
        default=1.0,
        help="multiply every variant's steps (at least 2): the test's smoke run uses 0.1",
    )
    args = ap.parse_args()
    import torch

    loaded = load_model(args.checkpoint)
    sel = dict(loaded.cond.extra["selection"], image_size=loaded.cfg.image_size)
    # a codebook's recorded split, or (a baseline trained on --data) the whole folder
    real = (
        load_selection(sel).train
        if "layout" in sel
        else training_data(loaded.cfg, root=sel["root"])
    )
    enc = ClipEncoder(
        EncoderSpec(args.encoder, args.pretrained), allow_untrained=not args.pretrained
    )
    real_emb = _embed(enc, real, None)
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for name, (sched, full_steps, precision, seed) in VARIANTS.items():
        steps = max(2, round(full_steps * args.step_scale))
        scfg = SampleConfig(
            scheduler=sched,
            steps=steps,
            guidance=2.0,
            seed=seed,
            batch_size=64,
            precision=precision,
        )
        t0 = time.perf_counter()
        imgs = [generate(loaded, c, args.n, scfg) for c in loaded.cond.classes]
        seconds = time.perf_counter() - t0
        reference = torch.cat(imgs) if reference is None else reference
        labels = torch.arange(len(imgs)).repeat_interleave(args.n)
        fake = ImageSet(
            images=torch.cat(imgs),
            labels=labels,
            classes=list(loaded.cond.classes),
            paths=[""] * len(labels),
            hashes=[],
        )
        toy = _toy_plausibility(fake)
        rows[name] = {
            "fd": frechet_distance(real_emb, _embed(enc, fake, None)),
            "s_per_image": seconds / len(labels),
            "mean_abs_vs_ddim50": (fake.images.float() - reference.float()).abs().mean().item(),
            "toy_plausible": None if toy is None else sum(toy.values()) / len(toy),
        }
        print(name, rows[name], flush=True)
    base = rows["ddim-50"]["fd"]
    for r in rows.values():
        r["fd_vs_ddim50"] = r["fd"] / base - 1
    args.out.write_text(
        json.dumps(
            {
                "run": run_info(args),
                "checkpoint": str(args.checkpoint),
                "encoder": enc.identity,
                "n_per_class": args.n,
                "step_scale": args.step_scale,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
