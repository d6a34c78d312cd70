"""Ours against diffusers' UNet2DModel built the same way, in one run, interleaved.

The peer (``bench.peer``) is diffusers' ``UNet2DModel`` with the same layout and class input
(attention blocks where ours has self-attention: ``paper``), parameter counts within 1%. Both
run through the same loss and the same sampling loop (diffusers' DDIM scheduler, conditional
and unconditional passes in one batch): only the network, its memory layout and its optimiser
differ, each as its project ships it (ours: channels-last and fused AdamW, as ``protomed
train``/``sample`` run; the peer: NCHW and ``torch.optim.AdamW``, as diffusers' examples do).
Measured per preset, precision and batch size:

- training images/s (forward, backward, AdamW step),
- sampling images/s for DDIM-50 with guidance,
- peak memory: resident memory of a fresh child process (CPU) or ``max_memory_allocated`` (CUDA).

    .venv/bin/python -m bench.speed            # cpu-small, paper-legacy and paper, fp32 and bf16
    .venv/bin/python -m bench.speed --presets tiny --repeats 1 --sample-n 2 --steps 3   # smoke
    .venv/bin/python -m bench.speed --presets tiny --set attention_resolutions=[16,8]   # attention
    python -m bench.speed --device cuda --presets paper --precisions bf16 --batch-sizes 16 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.peer import N_CLASSES, DiffusersPeer, build
from bench.provenance import add_threads_option, run_info, use_threads
from ml.config import SampleConfig, TrainConfig, parse_overrides
from ml.diffusion.process import diffusion_loss, guided_sample, noise_scheduler, sampler
from ml.diffusion.train import make_optimizer, memory_format
from ml.models.unet import count_parameters
from ml.runtime import tune_allocator

REPO = Path(__file__).resolve().parents[1]


def amp(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(model: nn.Module, cfg: TrainConfig, precision: str, steps: int) -> float:
    """Training images per second (median over ``steps`` timed steps after one warm-up) at
    ``cfg.batch_size``, in the layout ``protomed train`` picks (the peer: NCHW)."""
    device = next(model.parameters()).device
    fmt = memory_format(cfg, device, amp(precision))
    model.train().to(memory_format=fmt)
    if isinstance(model, DiffusersPeer):  # as diffusers' training examples build it
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    else:  # as `protomed train` builds it
        opt = make_optimizer(model, cfg)
    sched = noise_scheduler(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    x = x.to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, N_CLASSES, (cfg.batch_size,), generator=gen).to(device)
    times = []
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        loss = diffusion_loss(model, x, y, sched, cfg.p_uncond, amp(precision))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times)


def sample_rate(model: nn.Module, cfg: TrainConfig, precision: str, n: int, steps: int) -> float:
    """DDIM sampling of ``n`` images with guidance 2 (both halves in one batch), images/s; ours
    in the layout ``protomed sample`` uses, the peer in NCHW."""
    device = next(model.parameters()).device
    nhwc = SampleConfig().channels_last if not isinstance(model, DiffusersPeer) else False
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    model.eval().to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen)
    noise = noise.to(device).contiguous(memory_format=fmt)
    labels = (torch.arange(n) % N_CLASSES).to(device)
    train_sched = noise_scheduler(cfg)
    guided_sample(
        model, labels, noise, sampler("ddim", train_sched, 2), 2.0, amp_dtype=amp(precision)
    )  # warm-up at the measured batch
    _sync(device)
    t0 = time.perf_counter()
    guided_sample(
        model, labels, noise, sampler("ddim", train_sched, steps), 2.0, amp_dtype=amp(precision)
    )
    _sync(device)
    return n / (time.perf_counter() - t0)


def setup(
    which: str,
    preset: str,
    precision: str,
    batch: int | None,
    device: str,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, TrainConfig]:
    """A model and the config it trains with (``batch`` overriding the preset's batch size,
    ``overrides`` any other config field)."""
    model, cfg = build(which, preset, precision, overrides)
    if batch is not None:
        cfg = cfg.model_copy(update={"batch_size": batch})
    return model.to(device), cfg


def child_peak_rss(
    which: str, preset: str, precision: str, task: str, batch: int | None, args: argparse.Namespace
) -> float:
    """Peak resident memory (MiB) of a fresh process doing one train step or one sample batch."""
    code = (
        "import sys; sys.argv=['x']; import bench.speed as s, torch; "
        f"torch.set_num_threads({torch.get_num_threads()}); s.tune_allocator(); "
        f"m, c = s.setup({which!r}, {preset!r}, {precision!r}, {batch!r}, 'cpu', {args.set!r}); "
        + (
            f"s.train_rate(m, c, {precision!r}, 1)"
            if task == "train"
            else f"s.sample_rate(m, c, {precision!r}, {batch or args.sample_n}, 2)"
        )
        # VmHWM, not ru_maxrss: Linux carries a forked parent's ru_maxrss into the child.
        + "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def cuda_peak(fn: Callable[[], object]) -> float:
    """Peak allocated CUDA memory (MiB) while ``fn`` runs."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20


def measure(
    preset: str, precision: str, batch: int | None, args: argparse.Namespace
) -> dict[str, Any]:
    models = {
        w: setup(w, preset, precision, batch, args.device, args.set) for w in ("ours", "diffusers")
    }
    n = batch or args.sample_n
    row: dict[str, Any] = {
        "preset": preset,
        "precision": precision,
        "device": args.device,
        "train_batch": models["ours"][1].batch_size,
        "sample_n": n,
    }
    for w, (m, _) in models.items():
        row[f"{w}_params"] = count_parameters(m)
    rates: dict[str, list[float]] = {f"{w}_{k}": [] for w in models for k in ("train", "sample")}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for w, (m, cfg) in models.items():
            rates[f"{w}_train"].append(train_rate(m, cfg, precision, args.train_steps))
            rates[f"{w}_sample"].append(sample_rate(m, cfg, precision, n, args.steps))
    for k, v in rates.items():
        row[f"{k}_img_s"] = statistics.median(v)
    for task in ("train", "sample"):
        row[f"{task}_ratio"] = row[f"ours_{task}_img_s"] / row[f"diffusers_{task}_img_s"]
        if not args.memory:
            continue
        for w, (m, cfg) in models.items():
            if args.device == "cpu":
                peak = child_peak_rss(w, preset, precision, task, batch, args)
            elif task == "train":
                peak = cuda_peak(partial(train_rate, m, cfg, precision, 1))
            else:
                peak = cuda_peak(partial(sample_rate, m, cfg, precision, n, 2))
            row[f"{w}_{task}_peak_mib"] = peak
    row["param_ratio"] = row["ours_params"] / row["diffusers_params"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'preset':<13}{'prec':<6}{'batch':>6}{'params ours/peer':>18}"
        f"{'train img/s ours/peer':>24}{'x':>6}{'sample img/s ours/peer':>25}{'x':>6}"
        f"{'peak MiB train':>17}{'sample':>13}"
    )
    lines = [head]
    for r in rows:
        mem = ""
        if "ours_train_peak_mib" in r:
            ours, peer = (
                (r[f"{w}_train_peak_mib"], r[f"{w}_sample_peak_mib"]) for w in ("ours", "diffusers")
            )
            mem = f"{ours[0]:>9.0f}/{peer[0]:<7.0f}{ours[1]:>6.0f}/{peer[1]:<6.0f}"
        lines.append(
            f"{r['preset']:<13}{r['precision']:<6}{r['train_batch']:>6}"
            f"{r['ours_params'] / 1e6:>8.2f}M/{r['diffusers_params'] / 1e6:.2f}M"
            f"{r['ours_train_img_s']:>13.2f}/{r['diffusers_train_img_s']:<10.2f}"
            f"{r['train_ratio']:>6.2f}"
            f"{r['ours_sample_img_s']:>14.3f}/{r['diffusers_sample_img_s']:<10.3f}"
            f"{r['sample_ratio']:>6.2f}{mem}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-small", "paper-legacy", "paper"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=[None],
        help="training batch and sampled images per run (default: the preset's "
        "batch for training, --sample-n for sampling)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    add_threads_option(ap)
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="config overrides for every preset (as protomed train --set)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    args = ap.parse_args()
    args.set = parse_overrides(args.set)
    threads = use_threads(args)
    torch.backends.cudnn.benchmark = True  # CUDA: both pick their fastest convolutions
    tune_allocator()  # as the `protomed` CLI does; one process, so the peer gets it too
    rows = []
    for preset in args.presets:
        for precision in args.precisions:
            for batch in args.batch_sizes:
                rows.append(measure(preset, precision, batch, args))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else (platform.processor() or platform.machine())
    )
    meta = {
        "threads": threads,
        "torch": torch.__version__,
        "machine": device_name,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": run_info(args), "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
