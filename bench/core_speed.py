"""Seconds per training step (batch 16) and per sampled image (DDIM-50 + CFG) for our presets.

    python bench/core_speed.py --presets cpu-small paper --out bench/results/core_speed.json

Medians over a few repeats after warm-up; the model is random (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ml.checkpoint import Conditioning, LoadedModel, build_model
from ml.config import SampleConfig, make_config
from ml.diffusion import diffusion_loss, noise_scheduler
from ml.sample import generate
from ml.unet import count_parameters


def time_train(preset: str, repeats: int) -> dict:
    cfg = make_config(preset, {"mode": "baseline", "precision": "fp32"})
    cond = Conditioning([f"c{i}" for i in range(8)], "baseline")
    model = build_model(cfg, cond)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = noise_scheduler(cfg)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size) * 2 - 1
    y = torch.randint(0, 8, (cfg.batch_size,))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = diffusion_loss(model, x, y, sched, cfg.p_uncond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "params": count_parameters(model),
        "batch": cfg.batch_size,
        "train_s_per_step": statistics.median(times),
        "model": model,
        "cfg": cfg,
        "cond": cond,
    }


def time_sample(res: dict, n: int, steps: int) -> float:
    model = res["model"].eval()
    loaded = LoadedModel(model, res["cfg"], res["cond"], 0, Path("bench"))
    scfg = SampleConfig(steps=steps, guidance=2.0, batch_size=n)
    generate(loaded, "c0", 1, scfg.model_copy(update={"steps": 2}))  # warm-up
    t0 = time.perf_counter()
    generate(loaded, "c0", n, scfg)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["cpu-small", "paper"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=16, help="images sampled per measurement")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        res = time_train(preset, args.repeats)
        per_image = time_sample(res, args.n, args.steps)
        row = {k: res[k] for k in ("preset", "params", "batch", "train_s_per_step")}
        row.update({"sample_s_per_image": per_image, "ddim_steps": args.steps, "n": args.n})
        rows.append(row)
        print(
            f"{preset:<10} {row['params'] / 1e6:6.1f}M params  train {row['train_s_per_step']:.3f}"
            f" s/step (batch {row['batch']})  sample {per_image:.3f} s/image (DDIM-{args.steps},"
            f" CFG, batch {args.n})",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": args.threads, "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
