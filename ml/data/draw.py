"""How a split is drawn, without torch: the decoding (RGB, centre square crop, LANCZOS resize),
the pixel hash and the per-class draw of :func:`ml.data.images.load_split` live here, so the
service can rebuild which files a model trained on (and so which are held out) and resize real
images exactly as training data are, without loading the ML stack. :mod:`ml.data.images` wraps
the pixels in tensors; both use these functions, so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from ml.data.catalog import (
    Catalog,
    DataError,
    bomb_refusal,
    max_image_pixels,
    nfc,
    scan,
    too_many_pixels,
)

log = logging.getLogger("ml.data.images")

Pixels = npt.NDArray[np.uint8]  # (H, W, 3)


def load_rgb(path: Path, size: int, max_pixels: int | None = None) -> Image.Image:
    """The image as training reads it: RGB, centre square crop, LANCZOS resize to ``size``.
    An image whose header declares more than ``max_pixels`` pixels (default
    :func:`max_image_pixels`) raises :class:`DataError` before any pixel is decoded."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        opened = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {bomb_refusal(exc, limit)}") from None
    im: Image.Image
    with opened as im:
        refused = too_many_pixels(im.size, limit)
        if refused:
            raise DataError(f"{path}: {refused}")
        im = im.convert("RGB")
    return square_resize(im, size)


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then LANCZOS to ``size`` x ``size``: the one resampling of real
    images (training data and review controls alike)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im.resize((size, size), Image.Resampling.LANCZOS)


def array_hash(pixels: Pixels) -> str:
    """SHA-256 of the pixels in channel-first order: equal to
    :func:`ml.data.images.pixel_hash` of the same image as a (3, H, W) tensor."""
    return hashlib.sha256(np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()).hexdigest()


def class_rng(seed: int, name: str) -> np.random.Generator:
    """Per-class stream, stable across runs (Python's hash() is salted per process)."""
    offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return np.random.default_rng(seed + offset)


@dataclass(frozen=True)
class Drawn:
    """One drawn image: its pixels (HWC uint8), label, path and pixel hash."""

    pixels: Pixels
    label: int
    path: str
    hash: str


def draw_class(
    cat: Catalog,
    name: str,
    label: int,
    n_per_class: int | None,
    n_heldout: int,
    image_size: int,
    seed: int,
    seen: dict[str, str],
    skipped: list[tuple[str, str]],
    load: Callable[[Path, int], Image.Image] = load_rgb,
) -> tuple[list[Drawn], list[Drawn], int, int]:
    """Held-out then train rows of one class; returns them, #skipped and #withheld."""
    by_group: dict[str, list[Path]] = {}
    for p in cat.items[name]:
        by_group.setdefault(cat.groups[p], []).append(p)
    groups = list(by_group.values())
    groups = [groups[i] for i in class_rng(seed, name).permutation(len(groups))]
    held: list[Drawn] = []
    train: list[Drawn] = []
    n_bad = n_dropped = 0
    train_full = n_per_class if n_per_class is not None else len(cat.items[name])
    for group in groups:
        to_held = len(held) < n_heldout
        for i, p in enumerate(group):
            if to_held and len(held) >= n_heldout:
                n_dropped += len(group) - i  # rest of a held-out group stays out of train
                break
            if not to_held and len(train) >= train_full:
                return held, train, n_bad, n_dropped
            cat.check_inside(p)  # again: the file may have become a link since the scan
            try:
                pixels: Pixels = np.asarray(load(p, image_size), dtype=np.uint8).copy()
            except Exception as exc:  # PIL raises many exception types for bad files
                log.warning("skipping unreadable image %s: %s", p, exc)
                skipped.append((str(p), f"unreadable: {exc}"))
                n_bad += 1
                continue
            h = array_hash(pixels)
            if h in seen:
                log.warning("skipping %s: same pixels as %s", p, seen[h])
                skipped.append((str(p), f"duplicate pixels of {seen[h]}"))
                n_bad += 1
                continue
            seen[h] = str(p)
            (held if to_held else train).append(Drawn(pixels, label, str(p), h))
    return held, train, n_bad, n_dropped


@dataclass(frozen=True)
class TrainingFiles:
    """The files a recorded selection trains on (resolved paths) and their pixel hashes at the
    selection's image size."""

    paths: frozenset[str]
    hashes: frozenset[str]
    image_size: int


def training_files(
    selection: dict[str, Any], roots: Sequence[Path | str] | None = None
) -> TrainingFiles:
    """Which files the split recorded in ``selection`` (``DatasetSplit.selection``) trains on,
    drawn exactly as :func:`ml.data.images.load_selection` draws them; :class:`DataError` if
    the selection is incomplete or no longer drawable."""
    keys = ("root", "layout", "n_per_class", "n_heldout", "image_size", "seed", "classes")
    missing = [k for k in keys if k not in selection]
    if missing:
        raise DataError(f"selection lacks {missing}; expected keys {', '.join(keys)}")
    cat = scan(Path(selection["root"]), selection["layout"], roots)
    names = sorted({nfc(c) for c in selection["classes"]})
    unknown = [c for c in names if c not in cat.items]
    if unknown:
        raise DataError(f"unknown classes {unknown} in {cat.root}")
    seen: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    paths: set[str] = set()
    hashes: set[str] = set()
    size = int(selection["image_size"])
    for label, c in enumerate(names):
        _, train, _, _ = draw_class(
            cat,
            c,
            label,
            selection["n_per_class"],
            int(selection["n_heldout"]),
            size,
            int(selection["seed"]),
            seen,
            skipped,
        )
        paths.update(str(Path(d.path).resolve()) for d in train)
        hashes.update(d.hash for d in train)
    return TrainingFiles(frozenset(paths), frozenset(hashes), size)


def image_hash(path: Path, size: int) -> str:
    """The pixel hash of a file as a split of image size ``size`` would record it."""
    return array_hash(np.asarray(load_rgb(path, size), dtype=np.uint8))


__all__ = [
    "Drawn",
    "Pixels",
    "TrainingFiles",
    "array_hash",
    "class_rng",
    "draw_class",
    "image_hash",
    "load_rgb",
    "square_resize",
    "training_files",
]
