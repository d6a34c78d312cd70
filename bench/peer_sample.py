"""The peer's whole sampling command: diffusers' UNet2DModel (our layout, ``bench/peer.py``) and
DDIMScheduler in the loop diffusers' class-conditional pipelines run (both CFG halves in one
batch, ``torch.no_grad``, NCHW, tqdm), writing one PNG per image like ``protomed sample``.

    python -m bench.peer_sample WEIGHTS.safetensors --preset cpu-small --n 16 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from bench.peer import DiffusersPeer
from ml.config import make_config


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--class-index", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    cfg = make_config(args.preset, {"mode": "baseline"})
    model = DiffusersPeer(cfg)
    model.load_state_dict(load_file(args.weights))
    model.eval()
    sched = DDIMScheduler(
        num_train_timesteps=cfg.timesteps, beta_schedule=cfg.beta_schedule, clip_sample=True
    )
    sched.set_timesteps(args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    size = cfg.image_size
    latents = torch.randn(args.n, 3, size, size, generator=gen) * sched.init_noise_sigma
    labels = torch.full((args.n,), args.class_index)
    labels = torch.cat([labels, torch.full_like(labels, -1)])
    amp = args.precision == "bf16"
    for t in tqdm(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([latents] * 2), t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            eps = model(inp, t.expand(inp.shape[0]), labels).float()
        cond, uncond = eps.chunk(2)
        latents = sched.step(uncond + args.guidance * (cond - uncond), t, latents).prev_sample
    images = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(args.out / f"c{args.class_index}_{i:04d}.png")
    print(f"{len(images)} images in {args.out}")


if __name__ == "__main__":
    main()
