"""Draw n images per class from a trained checkpoint and write PNGs plus a manifest.

Each image's starting noise comes from its own generator seeded by (seed, class, index), so an
image does not depend on the batch size or on how many other images were asked for: the same
seed gives the same pictures.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from ml.checkpoint import LoadedModel
from ml.config import SampleConfig, autocast_dtype
from ml.diffusion import guided_sample, noise_scheduler, sampler, to_uint8

MANIFEST_FIELDS = (
    "file",
    "class",
    "index",
    "seed",
    "image_seed",
    "model",
    "step",
    "mode",
    "guidance",
    "steps",
    "scheduler",
    "sha256",
)


def image_seed(seed: int, class_idx: int, index: int) -> int:
    """A stable 63-bit seed per (run seed, class, image index)."""
    digest = hashlib.sha256(f"{seed}:{class_idx}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate(
    loaded: LoadedModel,
    class_name: str,
    n: int,
    scfg: SampleConfig,
    *,
    on_image: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """n images of one class as uint8 (n, C, H, W). ``on_image(done)`` follows finished images;
    ``on_step(done, total)`` every denoising step of every batch (a batch of 64 images can take
    minutes on a CPU, so images alone would jump 0 -> 100%)."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    model, cfg, cond = loaded.model, loaded.cfg, loaded.cond
    device = next(model.parameters()).device
    c = cond.class_index(class_name)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(scfg.seed, c, i)))
            for i in range(n)
        ]
    )
    rows = cond.sample_rows(c, n, torch.Generator().manual_seed(image_seed(scfg.seed, c, -1)))
    train_sched = noise_scheduler(cfg)
    amp = autocast_dtype(scfg.precision, device)
    layout = torch.channels_last if scfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    noise = noise.contiguous(memory_format=layout)
    out = []
    batches = range(0, n, scfg.batch_size)
    per_batch = len(sampler(scfg.scheduler, train_sched, scfg.steps).timesteps)
    total_steps = per_batch * len(batches)
    if on_step is not None:
        on_step(0, total_steps)
    for b, start in enumerate(batches):
        sl = slice(start, start + scfg.batch_size)
        sched = sampler(scfg.scheduler, train_sched, scfg.steps)
        gens = [  # per image, for the stochastic samplers' noise
            torch.Generator(device).manual_seed(image_seed(scfg.seed, c, 1_000_000 + i))
            for i in range(start, min(n, start + scfg.batch_size))
        ]
        x = guided_sample(
            model,
            rows[sl].to(device),
            noise[sl].to(device),
            sched,
            scfg.guidance,
            eta=scfg.eta,
            generator=gens,
            amp_dtype=amp,
            on_step=None
            if on_step is None
            else (lambda i, _t, done=b * per_batch: on_step(done + i, total_steps)),
        )
        out.append(to_uint8(x).cpu())
        if on_image is not None:
            on_image(min(n, start + scfg.batch_size))
    return torch.cat(out)


@dataclass
class SampleResult:
    out_dir: Path
    manifest: Path
    files: list[Path]
    images: dict[str, torch.Tensor]


def save_png(img: torch.Tensor, path: Path) -> str:
    """Write one uint8 (C,H,W) image as PNG; returns the sha256 of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, format="PNG")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_to_folder(
    loaded: LoadedModel,
    out_dir: Path | str,
    n: int,
    scfg: SampleConfig,
    classes: list[str] | None = None,
    *,
    on_class: Callable[[str, int, int], None] | None = None,
) -> SampleResult:
    """``out_dir/<class>/<class>_<i>.png`` for each class, plus manifest.csv and manifest.json."""
    out_dir = Path(out_dir)
    classes = classes or list(loaded.cond.classes)
    for name in classes:
        loaded.cond.class_index(name)  # validate every class before any work
    rows, files, images = [], [], {}
    for k, name in enumerate(classes):
        imgs = generate(loaded, name, n, scfg)
        images[name] = imgs
        c = loaded.cond.class_index(name)
        for i, img in enumerate(imgs):
            path = out_dir / name / f"{name}_{i:04d}.png"
            digest = save_png(img, path)
            files.append(path)
            rows.append(
                {
                    "file": str(path.relative_to(out_dir)),
                    "class": name,
                    "index": i,
                    "seed": scfg.seed,
                    "image_seed": image_seed(scfg.seed, c, i),
                    "model": str(loaded.path),
                    "step": loaded.step,
                    "mode": loaded.cond.mode,
                    "guidance": scfg.guidance,
                    "steps": scfg.steps,
                    "scheduler": scfg.scheduler,
                    "sha256": digest,
                }
            )
        if on_class is not None:
            on_class(name, k + 1, len(classes))
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "manifest.json").write_text(
        json.dumps({"sample": scfg.model_dump(), "images": rows}, indent=2)
    )
    return SampleResult(out_dir, manifest, files, images)


def save_grid(
    images: dict[str, torch.Tensor],
    path: Path | str,
    per_row: int = 8,
    *,
    labels: bool = False,
    scale: int = 1,
) -> Path:
    """One row of up to ``per_row`` images per class, in class order. ``labels`` adds a white
    strip on the left naming each row's class; ``scale`` enlarges the tiles (nearest neighbour),
    so small images stay readable."""
    rows = []
    for imgs in images.values():
        take = imgs[:per_row]
        if len(take) < per_row:  # pad short rows with blank (white) tiles, like the padding
            blank = torch.full((per_row - len(take), *take.shape[1:]), 255, dtype=take.dtype)
            take = torch.cat([take, blank])
        rows.append(take)
    tiles = torch.cat(rows)
    if scale > 1:
        tiles = tiles.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(tiles, nrow=per_row, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if labels:
        image = label_rows(image, list(images), row_height=tiles.shape[2] + 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def label_rows(grid: Image.Image, names: list[str], row_height: int) -> Image.Image:
    """``grid`` with a white strip on its left holding each row's name, vertically centred."""
    font = ImageFont.load_default(size=max(8, min(14, row_height // 3)))
    measure = ImageDraw.Draw(grid)
    width = int(max(measure.textlength(n, font=font) for n in names)) + 8
    out = Image.new("RGB", (grid.width + width, grid.height), "white")
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        y = 2 + r * row_height + (row_height - 2) / 2
        draw.text((4, y), name, fill="black", font=font, anchor="lm")
    return out
