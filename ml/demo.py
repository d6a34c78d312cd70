"""The embedded main job: the whole method on the toy cytology domain, judged by the rule checker.

Toy data -> CLIP prototypes -> baseline and prototype UNets (``cpu-small``) -> DDIM samples per
class -> grid per mode -> per-class plausibility from the rule-based checker, next to the
plausibility of real toy images at the same size (the ceiling).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml.checkpoint import load_model
from ml.config import SampleConfig, make_config
from ml.encoder import EmbeddingCache, EncoderSpec
from ml.pipeline import learn_prototypes, train_model
from ml.prototypes import CPLConfig
from ml.sample import sample_to_folder, save_grid
from ml.toy import CRITERIA, TOY_CLASSES, check_images, write_toy_dataset

log = logging.getLogger(__name__)
MODES = ("baseline", "prototype")


def judge(images: torch.Tensor | np.ndarray, expected: str) -> dict[str, Any]:
    """Share plausible and failure rate per criterion for images of one class."""
    arr = images.permute(0, 2, 3, 1).numpy() if isinstance(images, torch.Tensor) else images
    verdicts = check_images(list(arr), expected)
    n = len(verdicts)
    return {
        "n": n,
        "plausible": sum(v.plausible for v in verdicts) / max(n, 1),
        "failed": {c: sum(c in v.failed for v in verdicts) / max(n, 1) for c in CRITERIA},
    }


def check_folder(folder: Path | str) -> dict[str, Any]:
    """Judge every ``<class>/*.png`` under a folder of toy-domain images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}")
    out: dict[str, Any] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in TOY_CLASSES:
            raise ValueError(
                f"{sub.name!r} is not a toy class; toy classes: {', '.join(TOY_CLASSES)}"
            )
        files = sorted(sub.glob("*.png"))
        imgs = (
            np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]) if files else None
        )
        out[sub.name] = judge(imgs, sub.name) if imgs is not None else {"n": 0}
    if not out:
        raise ValueError(f"{folder} has no class folders of PNG images")
    return out


def _table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'class':<12} {'real':>6} {'baseline':>9} {'prototype':>10}",
        "-" * 40,
    ]
    for c in summary["classes"]:
        row = [summary["real"][c]["plausible"]] + [
            summary["modes"][m]["plausibility"][c]["plausible"] for m in MODES
        ]
        lines.append(f"{c:<12} {row[0]:>6.0%} {row[1]:>9.0%} {row[2]:>10.0%}")
    means = [summary["modes"][m]["mean_plausible"] for m in MODES]
    lines.append(f"{'mean':<12} {summary['real_mean']:>6.0%} {means[0]:>9.0%} {means[1]:>10.0%}")
    return "\n".join(lines)


def run_demo(
    out: Path | str,
    *,
    steps: int = 500,
    n_per_class: int = 100,
    n_sample: int = 8,
    heldout: int = 20,
    encoder: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str | None = None,
    seed: int = 0,
    preset: str = "cpu-small",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the demo end to end into ``out``; returns (and writes) the summary."""
    out = Path(out)
    t_start = time.perf_counter()
    data = write_toy_dataset(out / "data", n_per_class=n_per_class + heldout, size=64, seed=seed)
    if pretrained is None:
        log.warning(
            "demo uses an UNTRAINED %s encoder: prototypes come from random features", encoder
        )
    selection = {"root": data, "n_per_class": n_per_class, "n_heldout": heldout, "seed": seed}
    proto = learn_prototypes(
        selection,
        out / "codebook",
        encoder_spec=EncoderSpec(encoder, pretrained),
        cpl=CPLConfig(seed=seed),
        allow_untrained=pretrained is None,
        cache=EmbeddingCache(out / "embeddings.sqlite"),
        device=device,
    )
    summary: dict[str, Any] = {
        "classes": list(proto.codebook.classes),
        "encoder": proto.codebook.encoder,
        "prototypes": proto.report.to_dict(),
        "modes": {},
    }
    scfg = SampleConfig(seed=seed)
    for mode in MODES:
        cfg = make_config(
            preset, {**(overrides or {}), "mode": mode, "max_steps": steps, "seed": seed}
        )
        t0 = time.perf_counter()
        ckpt = train_model(cfg, out / f"run_{mode}", codebook=proto.codebook, device=device)
        train_s = time.perf_counter() - t0
        loaded = load_model(ckpt, device=device or "cpu")
        t0 = time.perf_counter()
        res = sample_to_folder(loaded, out / f"samples_{mode}", n_sample, scfg)
        sample_s = time.perf_counter() - t0
        save_grid(res.images, out / f"grid_{mode}.png")
        plaus = {c: judge(imgs, c) for c, imgs in res.images.items()}
        summary["modes"][mode] = {
            "checkpoint": str(ckpt),
            "train_seconds": round(train_s, 1),
            "seconds_per_step": round(train_s / steps, 4),
            "sample_seconds_per_image": round(sample_s / len(res.files), 4),
            "plausibility": plaus,
            "mean_plausible": float(np.mean([p["plausible"] for p in plaus.values()])),
        }
    held = proto.split.heldout
    size = make_config(preset, overrides).image_size
    small = (
        torch.nn.functional.interpolate(
            held.images.float(), size=(size, size), mode="bilinear", antialias=True
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    summary["real"] = {c: judge(small[held.labels == i], c) for i, c in enumerate(held.classes)}
    summary["real_mean"] = float(np.mean([r["plausible"] for r in summary["real"].values()]))
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["text"] = (
        f"rule-based plausibility of {n_sample} images per class "
        f"({steps} training steps per mode, {preset}, DDIM-{scfg.steps}, w={scfg.guidance}):\n"
        + _table(summary)
        + f"\ngrids: {out / 'grid_baseline.png'}, {out / 'grid_prototype.png'}"
        + f"\ntotal {summary['seconds']:.0f} s"
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.txt").write_text(summary["text"] + "\n")
    return summary
