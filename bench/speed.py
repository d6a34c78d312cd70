"""Ours against diffusers' UNet2DModel built the same way, in one run, interleaved.

The peer is diffusers' ``UNet2DModel`` with the same layout (DownBlock2D/UpBlock2D, no attention,
scale-shift time conditioning) and the same class conditioning input (a 768-d class vector, a
"projection" class embedding), so parameter counts agree within 1%. Both run through the same
loss and the same sampling loop (diffusers' DDIM scheduler, conditional and unconditional passes
in one batch): only the network differs. Measured per preset and precision:

- training images/s (forward, backward, AdamW step) at the preset's batch size,
- sampling images/s for DDIM-50 with guidance (ours in the layout ``protomed sample`` uses,
  channels-last; the peer as diffusers runs it, NCHW),
- peak resident memory of a process doing each (a child process per measurement).

    .venv/bin/python bench/speed.py                          # cpu-small and paper, fp32
    .venv/bin/python bench/speed.py --presets tiny --repeats 1 --sample-n 2 --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ml.checkpoint import Conditioning, build_model  # noqa: E402
from ml.config import SampleConfig, TrainConfig, make_config  # noqa: E402
from ml.diffusion import diffusion_loss, guided_sample, noise_scheduler, sampler  # noqa: E402
from ml.unet import count_parameters  # noqa: E402

N_CLASSES = 8


class DiffusersPeer(nn.Module):
    """diffusers' UNet2DModel behind our model's call signature ``(x, t, labels)``: labels pick
    a row of a class-vector table (-1: a learnable null vector), fed as the class embedding."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        chans = tuple(cfg.base_channels * m for m in cfg.channel_mults)
        self.unet = UNet2DModel(
            sample_size=cfg.image_size, in_channels=3, out_channels=3,
            block_out_channels=chans, layers_per_block=cfg.num_res_blocks,
            down_block_types=("DownBlock2D",) * len(chans),
            up_block_types=("UpBlock2D",) * len(chans),
            add_attention=False, dropout=cfg.dropout, norm_num_groups=cfg.norm_groups,
            resnet_time_scale_shift="scale_shift", class_embed_type="identity",
        )  # fmt: skip
        # UNet2DModel adds an "identity" class embedding to its time embedding: project the
        # class vector to that width with the same two-layer MLP its time embedding uses.
        width = 4 * cfg.base_channels
        self.class_proj = nn.Sequential(
            nn.Linear(cfg.class_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.table = nn.Parameter(torch.randn(N_CLASSES, cfg.class_dim) * 0.02)
        self.null = nn.Parameter(torch.zeros(cfg.class_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cls = torch.where(labels[:, None] < 0, self.null, self.table[labels.clamp(min=0)])
        return self.unet(x, t, class_labels=self.class_proj(cls)).sample


def build(which: str, preset: str, precision: str) -> tuple[nn.Module, TrainConfig]:
    cfg = make_config(preset, {"mode": "baseline", "precision": precision})
    if which == "ours":
        cond = Conditioning([f"c{i}" for i in range(N_CLASSES)], "baseline")
        return build_model(cfg, cond), cfg
    return DiffusersPeer(cfg), cfg.model_copy(update={"channels_last": False})  # as shipped


def amp(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def train_rate(model: nn.Module, cfg: TrainConfig, precision: str, steps: int) -> float:
    """Training images per second (median over ``steps`` timed steps after one warm-up), in the
    layout ``cfg.channels_last`` asks for (ours: as ``protomed train`` runs; the peer: NCHW)."""
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.train().to(memory_format=fmt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = noise_scheduler(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, N_CLASSES, (cfg.batch_size,), generator=gen)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = diffusion_loss(model, x, y, sched, cfg.p_uncond, amp(precision))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return cfg.batch_size / statistics.median(times)


def sample_rate(
    model: nn.Module, cfg: TrainConfig, precision: str, n: int, steps: int, layout: str = "nchw"
) -> float:
    """DDIM sampling with guidance 2 (conditional + unconditional in one batch), images/s.
    ``layout``: "nhwc" runs channels-last, as ``protomed sample`` does by default."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    model.eval().to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen)
    noise = noise.contiguous(memory_format=fmt)
    labels = torch.arange(n) % N_CLASSES
    train_sched = noise_scheduler(cfg)
    guided_sample(model, labels[:1], noise[:1], sampler("ddim", train_sched, 2), 2.0,
                  amp_dtype=amp(precision))  # warm-up  # fmt: skip
    t0 = time.perf_counter()
    guided_sample(model, labels, noise, sampler("ddim", train_sched, steps), 2.0,
                  amp_dtype=amp(precision))  # fmt: skip
    return n / (time.perf_counter() - t0)


def child_peak_rss(
    which: str, preset: str, precision: str, task: str, args: argparse.Namespace
) -> float:
    """Peak resident memory (MiB) of a fresh process doing one train step or one sample batch."""
    code = (
        "import sys; sys.argv=['x']; import bench.speed as s, torch; "
        f"torch.set_num_threads({args.threads}); m, c = s.build({which!r}, {preset!r}, "
        f"{precision!r}); "
        + (f"s.train_rate(m, c, {precision!r}, 1)" if task == "train" else
           f"s.sample_rate(m, c, {precision!r}, {args.sample_n}, 2)")
        # VmHWM, not ru_maxrss: Linux carries a forked parent's ru_maxrss into the child.
        + "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def measure(preset: str, precision: str, args: argparse.Namespace) -> dict:
    models = {w: build(w, preset, precision) for w in ("ours", "diffusers")}
    row: dict = {"preset": preset, "precision": precision}
    for w, (m, _) in models.items():
        row[f"{w}_params"] = count_parameters(m)
    rates: dict[str, list[float]] = {f"{w}_{k}": [] for w in models for k in ("train", "sample")}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for w, (m, cfg) in models.items():
            rates[f"{w}_train"].append(train_rate(m, cfg, precision, args.train_steps))
            layout = "nhwc" if w == "ours" and SampleConfig().channels_last else "nchw"
            rates[f"{w}_sample"].append(
                sample_rate(m, cfg, precision, args.sample_n, args.steps, layout)
            )
    for k, v in rates.items():
        row[f"{k}_img_s"] = statistics.median(v)
    for task in ("train", "sample"):
        row[f"{task}_ratio"] = row[f"ours_{task}_img_s"] / row[f"diffusers_{task}_img_s"]
        if args.memory:
            for w in models:
                row[f"{w}_{task}_peak_mib"] = child_peak_rss(w, preset, precision, task, args)
    row["param_ratio"] = row["ours_params"] / row["diffusers_params"]
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'preset':<10}{'prec':<6}{'params ours/peer':>20}{'train img/s ours/peer':>26}"
            f"{'x':>6}{'sample img/s ours/peer':>26}{'x':>6}")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['preset']:<10}{r['precision']:<6}"
            f"{r['ours_params'] / 1e6:>9.2f}M/{r['diffusers_params'] / 1e6:.2f}M"
            f"{r['ours_train_img_s']:>15.2f}/{r['diffusers_train_img_s']:<10.2f}"
            f"{r['train_ratio']:>6.2f}"
            f"{r['ours_sample_img_s']:>15.3f}/{r['diffusers_sample_img_s']:<10.3f}"
            f"{r['sample_ratio']:>6.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["cpu-small", "paper"])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--sample-n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(p, prec, args) for p in args.presets for prec in args.precisions]
    print(table(rows))
    meta = {"threads": args.threads, "torch": torch.__version__, "machine": platform.processor()
            or platform.machine(), "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
