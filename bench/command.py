"""The whole sampling command, ours against diffusers', timed with ``/usr/bin/time -v``.

``protomed sample --scheduler ddim`` (process start, imports, checkpoint load, DDIM-50 with
guidance, PNGs and manifest) against ``bench.peer_sample`` (the same for diffusers'
UNet2DModel of the same layout and DDIMScheduler, as diffusers' pipelines run it). Both get
freshly initialised weights of the preset, the same n, guidance 2 and precision; runs alternate
between the two. ``--ours-scheduler dpm++sde`` times ours as shipped (SDE-DPM-Solver++-20).

    .venv/bin/python -m bench.command --preset cpu-small --n 16 --repeats 3
    .venv/bin/python -m bench.command --preset paper --n 4 --ours-scheduler dpm++sde   # as shipped
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.provenance import run_info

REPO = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"


def write_models(preset: str, folder: Path) -> tuple[Path, Path]:
    """A checkpoint ``protomed sample`` reads and the peer's weights, both freshly initialised."""
    import torch
    from safetensors.torch import save_file

    from bench.peer import build, conditioning
    from ml.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ours, cfg = build("ours", preset, "fp32")
    state = ours.state_dict()
    ckpt = save_checkpoint(
        folder / "ours.pt",
        {
            "model": state,
            "ema": state,
            "step": 0,
            "args": cfg.model_dump(mode="json"),
            "cond": conditioning().to_dict(),
        },
    )
    peer, _ = build("diffusers", preset, "fp32")
    weights = folder / "peer.safetensors"
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, weights)
    return ckpt, weights


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run under ``/usr/bin/time -v``; wall seconds and peak resident MiB from its report."""
    out = subprocess.run([TIME, "-v", "-o", str(log), *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    report = log.read_text()
    clock = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", report)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    if clock is None or rss is None:
        raise RuntimeError(f"unexpected /usr/bin/time report:\n{report}")
    h, m, s = clock.groups()
    wall = int(h or 0) * 3600 + int(m) * 60 + float(s)
    return {"wall_s": wall, "peak_mib": int(rss.group(1)) / 1024}


def commands(
    args: argparse.Namespace, ckpt: Path, weights: Path, out: Path
) -> dict[str, list[str]]:
    protomed = Path(sys.executable).with_name("protomed")
    common = ["--n", str(args.n), "--precision", args.precision]
    ours_steps = args.steps if args.ours_scheduler == "ddim" else args.ours_steps
    return {
        "ours": [
            str(protomed),
            "sample",
            str(ckpt),
            "--out",
            str(out / "ours"),
            "--class",
            "c0",
            "--batch-size",
            str(args.n),
            *common,
            "--scheduler",
            args.ours_scheduler,
            "--steps",
            str(ours_steps),
        ],
        "diffusers": [
            sys.executable,
            "-m",
            "bench.peer_sample",
            str(weights),
            "--preset",
            args.preset,
            "--out",
            str(out / "diffusers"),
            *common,
            "--steps",
            str(args.steps),
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--n", type=int, default=16, help="images (one class, one batch)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (both sides)")
    ap.add_argument(
        "--ours-scheduler",
        default="ddim",
        choices=["ddim", "dpm++sde"],
        help="ddim: the peer's sampler; dpm++sde: ours as shipped",
    )
    ap.add_argument("--ours-steps", type=int, default=20, help="steps of dpm++sde")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "command.json")
    args = ap.parse_args()
    if shutil.which(TIME) is None:
        sys.exit(f"{TIME} is missing: install GNU time (Debian/Ubuntu: apt-get install time)")
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "diffusers": []}
    with tempfile.TemporaryDirectory(prefix="protomed-bench-") as tmp:
        tmpdir = Path(tmp)
        ckpt, weights = write_models(args.preset, tmpdir)
        cmds = commands(args, ckpt, weights, tmpdir)
        for _ in range(args.repeats):  # interleaved
            for who, cmd in cmds.items():
                shutil.rmtree(tmpdir / who, ignore_errors=True)
                runs[who].append(timed(cmd, tmpdir / f"{who}.time"))
                made = len(list((tmpdir / who).rglob("*.png")))
                if made != args.n:
                    raise RuntimeError(f"{who} wrote {made} PNGs, expected {args.n}")
    row: dict[str, Any] = {
        "preset": args.preset,
        "n": args.n,
        "steps": args.steps,
        "ours_scheduler": args.ours_scheduler,
        "precision": args.precision,
        "runs": runs,
    }
    for who, rs in runs.items():
        row[f"{who}_wall_s"] = statistics.median(r["wall_s"] for r in rs)
        row[f"{who}_peak_mib"] = max(r["peak_mib"] for r in rs)
    row["speedup"] = row["diffusers_wall_s"] / row["ours_wall_s"]
    print(f"{'command':<12}{'wall s (median)':>18}{'img/s':>10}{'peak MiB':>11}")
    for who in runs:
        wall = row[f"{who}_wall_s"]
        print(f"{who:<12}{wall:>18.2f}{args.n / wall:>10.3f}{row[f'{who}_peak_mib']:>11.0f}")
    print(f"ours is {row['speedup']:.2f}x the peer's speed ({args.preset}, {args.precision})")
    meta = {"tool": f"{TIME} -v", "machine": platform.processor() or platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": run_info(args), "meta": meta, "row": row}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
