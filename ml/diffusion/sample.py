"""Draw n images per class from a trained checkpoint and write PNGs plus a manifest.

Each image's starting noise comes from its own generator seeded by (seed, class, index), so an
image does not depend on the batch size or on how many other images were asked for: the same
seed gives the same pictures. Each PNG carries that record (:mod:`ml.diffusion.provenance`), and
:func:`regenerate` draws one image again from it.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from ml.config import SampleConfig, autocast_dtype
from ml.diffusion.process import guided_sample, noise_scheduler, sampler, to_uint8
from ml.diffusion.provenance import Provenance, file_sha256, png_with_provenance
from ml.errors import Invalid
from ml.models.checkpoint import LoadedModel

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
    "checkpoint_sha256",
)


def image_seed(seed: int, class_idx: int, index: int) -> int:
    """A stable 63-bit seed per (run seed, class, image index)."""
    digest = hashlib.sha256(f"{seed}:{class_idx}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _offset(
    on_step: Callable[[int, int], None], done: int, total: int
) -> Callable[[int, int], None]:
    """A batch's step callback, reporting the steps of the whole run (``done`` before it)."""
    return lambda i, _t: on_step(done + i, total)


def generate(
    loaded: LoadedModel,
    class_name: str,
    n: int,
    scfg: SampleConfig,
    *,
    on_image: Callable[[int], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """n images of one class as uint8 (n, C, H, W). ``on_image(done)`` follows finished images;
    ``on_step(done, total)`` every denoising step of every batch (a batch of 64 images can take
    minutes on a CPU, so images alone would jump 0 -> 100%). ``indices``: draw only these of
    the n (the same pixels as in the full draw; :func:`regenerate` uses it)."""
    if n < 1:
        raise Invalid(f"n must be at least 1 (got {n})")
    wanted = list(range(n)) if indices is None else list(indices)
    if not wanted or any(not 0 <= i < n for i in wanted):
        raise Invalid(f"indices must lie in [0, {n}) (got {wanted})")
    model, cfg, cond = loaded.model, loaded.cfg, loaded.cond
    device = next(model.parameters()).device
    c = cond.class_index(class_name)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    noise = torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(scfg.seed, c, i)))
            for i in wanted
        ]
    )
    rows = cond.sample_rows(c, n, torch.Generator().manual_seed(image_seed(scfg.seed, c, -1)))
    rows = rows[torch.tensor(wanted)]
    n = len(wanted)
    train_sched = noise_scheduler(cfg)
    amp = autocast_dtype(scfg.precision, device)
    layout = torch.channels_last if scfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    noise = noise.contiguous(memory_format=layout)
    out = []
    batches = range(0, n, scfg.batch_size)
    assert scfg.steps is not None  # SampleConfig's validator fills in the scheduler's default
    per_batch = len(sampler(scfg.scheduler, train_sched, scfg.steps).timesteps)
    total_steps = per_batch * len(batches)
    if on_step is not None:
        on_step(0, total_steps)
    for b, start in enumerate(batches):
        sl = slice(start, start + scfg.batch_size)
        sched = sampler(scfg.scheduler, train_sched, scfg.steps)
        gens = [  # per image, for the stochastic samplers' noise
            torch.Generator(device).manual_seed(image_seed(scfg.seed, c, 1_000_000 + i))
            for i in wanted[sl]
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
            on_step=None if on_step is None else _offset(on_step, b * per_batch, total_steps),
        )
        out.append(to_uint8(x).cpu())
        if on_image is not None:
            on_image(min(n, start + scfg.batch_size))
    return torch.cat(out)


def regenerate(checkpoint: Path | str, p: Provenance, device: str = "cpu") -> torch.Tensor:
    """The image a provenance record describes, drawn again: uint8 (C, H, W).

    Loads the checkpoint with the record's EMA switch and refuses another checkpoint than the
    record's (by sha256), since its pixels would differ.
    """
    from ml.models.checkpoint import load_model

    loaded = load_model(checkpoint, use_ema=p.use_ema, device=device)
    digest = file_sha256(loaded.path)
    if digest != p.checkpoint_sha256:
        raise Invalid(
            f"the image was made by checkpoint sha256 {p.checkpoint_sha256[:12]}..., "
            f"{loaded.path} is {digest[:12]}..."
        )
    scfg = SampleConfig(
        scheduler=p.scheduler,
        steps=p.steps,
        guidance=p.guidance,
        eta=p.eta,
        seed=p.seed,
        use_ema=p.use_ema,
        precision=p.precision,
        batch_size=1,
    )
    return generate(loaded, p.class_name, p.n, scfg, indices=[p.index])[0]


def provenance(
    loaded: LoadedModel,
    scfg: SampleConfig,
    class_name: str,
    index: int,
    n: int,
    *,
    checkpoint_sha256: str | None = None,
    model_id: int | None = None,
    batch_id: int | None = None,
) -> Provenance:
    """The record of image ``index`` of ``n`` drawn from ``loaded`` with ``scfg``
    (``checkpoint_sha256``: the file's hash if already known, else it is computed)."""
    return Provenance(
        checkpoint_sha256=checkpoint_sha256 or file_sha256(loaded.path),
        training_step=loaded.step,
        mode=loaded.cond.mode,
        class_name=class_name,
        index=index,
        n=n,
        seed=scfg.seed,
        scheduler=scfg.scheduler,
        steps=int(scfg.steps or 0),
        guidance=scfg.guidance,
        eta=scfg.eta,
        use_ema=scfg.use_ema,
        precision=scfg.precision,
        model_id=model_id,
        batch_id=batch_id,
    )


@dataclass
class SampleResult:
    out_dir: Path
    manifest: Path
    files: list[Path]
    images: dict[str, torch.Tensor]


def png_bytes(img: torch.Tensor, record: Provenance | None = None) -> bytes:
    """One uint8 (C,H,W) image as PNG bytes, with its provenance in XMP when given."""
    return png_with_provenance(img.permute(1, 2, 0).numpy(), record)


def save_png(img: torch.Tensor, path: Path, record: Provenance | None = None) -> str:
    """Write one uint8 (C,H,W) image as PNG (with its provenance); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(img, record)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


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
    digest = file_sha256(loaded.path)
    for k, name in enumerate(classes):
        imgs = generate(loaded, name, n, scfg)
        images[name] = imgs
        c = loaded.cond.class_index(name)
        for i, img in enumerate(imgs):
            path = out_dir / name / f"{name}_{i:04d}.png"
            record = provenance(loaded, scfg, name, i, n, checkpoint_sha256=digest)
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
                    "sha256": save_png(img, path, record),
                    "checkpoint_sha256": digest,
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
