"""Where the time goes: torch.profiler over one training step and one guided sampling forward
(the CFG-doubled batch), ours and the peer, grouped into kinds of work.

    .venv/bin/python -m bench.breakdown --preset paper --precision fp32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.peer import N_CLASSES, DiffusersPeer
from bench.provenance import add_threads_option, run_info, use_threads
from bench.speed import amp, setup
from ml.config import SampleConfig
from ml.diffusion.process import diffusion_loss, noise_scheduler
from ml.diffusion.train import make_optimizer, memory_format
from ml.runtime import tune_allocator

KINDS = {  # first match wins, on the aten op name
    "convolution": ("convolution", "conv2d"),
    "group norm": ("group_norm",),
    "SiLU": ("silu",),
    "dropout RNG": ("bernoulli", "random_", "native_dropout"),
    "optimiser": ("adam", "lerp", "addcdiv", "_foreach", "sqrt"),
    "concat/upsample": ("cat", "upsample"),
    "copies/layout": ("copy_", "contiguous", "to_copy", "clone"),
}


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS.items():
        if any(key in low for key in keys):
            return k
    return "other elementwise"


def profile(which: str, preset: str, precision: str, task: str) -> dict[str, float]:
    """Milliseconds of self CPU time per kind of work for one step of ``task``."""
    model, cfg = setup(which, preset, precision, None, "cpu")
    if task == "train":
        fmt = memory_format(cfg, torch.device("cpu"), amp(precision))
    else:
        nhwc = SampleConfig().channels_last if which == "ours" else False
        fmt = torch.channels_last if nhwc else torch.contiguous_format
    model.to(memory_format=fmt)
    if task == "train":
        model.train()
        opt = (
            make_optimizer(model, cfg)
            if not isinstance(model, DiffusersPeer)
            else torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        )
        x = (torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size) * 2 - 1).contiguous(
            memory_format=fmt
        )
        y, sched = torch.randint(0, N_CLASSES, (cfg.batch_size,)), noise_scheduler(cfg)

        def step() -> None:
            loss = diffusion_loss(model, x, y, sched, cfg.p_uncond, amp(precision))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()
        n = 2 * cfg.batch_size
        x = torch.randn(n, 3, cfg.image_size, cfg.image_size).contiguous(memory_format=fmt)
        y, t = torch.arange(n) % N_CLASSES, torch.full((n,), 500)

        @torch.inference_mode()
        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(x, t, y)

    step()
    step()
    with torch.profiler.profile() as prof:
        step()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or ev.key.startswith("Optimizer"):
            k = kind(ev.key)
            out[k] = out.get(k, 0.0) + ev.self_cpu_time_total / 1000
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    add_threads_option(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    use_threads(args)
    tune_allocator()
    result = {}
    for task in ("train", "sample"):
        rows = {w: profile(w, args.preset, args.precision, task) for w in ("ours", "diffusers")}
        result[task] = rows
        kinds = list(dict.fromkeys([*rows["ours"], *rows["diffusers"]]))
        totals = {w: sum(r.values()) for w, r in rows.items()}
        what = "training step" if task == "train" else "sampling forward (CFG batch)"
        print(f"\n{args.preset} {args.precision}, {what}: ms (share)")
        print(f"{'kind':<20}{'ours':>16}{'diffusers':>18}")
        for k in kinds:
            a, b = rows["ours"].get(k, 0.0), rows["diffusers"].get(k, 0.0)
            print(
                f"{k:<20}{a:>9.1f} ({a / totals['ours']:>4.0%}){b:>11.1f} "
                f"({b / totals['diffusers']:>4.0%})"
            )
        print(f"{'total':<20}{totals['ours']:>9.1f}{'':>7}{totals['diffusers']:>11.1f}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "run": run_info(args),
                    "preset": args.preset,
                    "precision": args.precision,
                    "ms": result,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
