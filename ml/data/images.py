"""Data layer: find labelled images in three on-disk layouts and draw small, balanced,
reproducible train / held-out splits from them.

The service trains on ~100 images per class, so the split must be exactly balanced,
rebuildable from a JSON record, robust to the odd corrupt file, and leak-free: held-out
images never share a lesion (HAM10000 ``lesion_id``) or identical pixels with training.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ml.config import MAX_PER_CLASS

# The torch-free catalog lives in ml.data.catalog (the API imports it); re-exported here.
from ml.data.catalog import (
    HAM_CSV,
    HAM_NAMES,
    IMAGE_SUFFIXES,
    LAYOUTS,
    MATEK_CLASSES,
    MATEK_IGNORED,
    Catalog,
    DataError,
    OutsideRootsError,
    data_dir,
    detect_layout,
    max_image_pixels,
    nfc,
    scan,
)
from ml.data.draw import Drawn, Pixels, draw_class, load_rgb

__all__ = [
    "HAM_CSV",
    "HAM_NAMES",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "MATEK_CLASSES",
    "MATEK_IGNORED",
    "MIN_IMAGE_SIZE",
    "Catalog",
    "DataError",
    "DatasetSplit",
    "ImageSet",
    "OutsideRootsError",
    "data_dir",
    "detect_layout",
    "load_image",
    "load_selection",
    "load_split",
    "max_image_pixels",
    "nfc",
    "pixel_hash",
    "scan",
]

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 8
# PIL's own decompression-bomb guard from the same limit (it warns above it, refuses above
# twice it); load_image refuses anything above it itself, before decoding.
Image.MAX_IMAGE_PIXELS = max_image_pixels()


def load_image(path: Path, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """Decode to uint8 (3, size, size): RGB, centre square crop, LANCZOS resize
    (:func:`ml.data.draw.load_rgb`).

    The same steps as the shared data processing, so a 64x64 PNG loads bit-exactly. An image
    whose header declares more than ``max_pixels`` pixels (default :func:`max_image_pixels`)
    raises :class:`DataError` before any pixel is decoded: the file may have changed since the
    dataset was registered.
    """
    return _tensor(np.asarray(load_rgb(path, size, max_pixels), dtype=np.uint8))


def _tensor(pixels: Pixels) -> torch.Tensor:
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def pixel_hash(img: torch.Tensor) -> str:
    """SHA-256 of the uint8 pixel bytes: a content key for caches and prototype links."""
    if img.dtype != torch.uint8:
        raise DataError(f"pixel_hash needs a uint8 image, got {img.dtype}")
    return hashlib.sha256(img.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class ImageSet:
    """Decoded images with integer labels indexing ``classes``, their paths and pixel hashes."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]
    paths: list[str]
    hashes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        keep = idx.tolist()
        return ImageSet(
            self.images[idx],
            self.labels[idx],
            list(self.classes),
            [self.paths[i] for i in keep],
            [self.hashes[i] for i in keep],
        )

    def per_class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts, strict=True))


@dataclass
class DatasetSplit:
    """A balanced train / held-out split; ``selection`` rebuilds it via :func:`load_selection`."""

    train: ImageSet
    heldout: ImageSet
    classes: list[str]
    layout: str
    root: Path
    skipped: list[tuple[str, str]]  # (path, reason)
    selection: dict[str, Any]


def _check_args(n_per_class: int | None, n_heldout: int, image_size: int, seed: int) -> None:
    if n_per_class is not None and not 1 <= n_per_class <= MAX_PER_CLASS:
        raise DataError(
            f"n_per_class must be 1 to {MAX_PER_CLASS} or None (all), got {n_per_class}"
        )
    if not 0 <= n_heldout <= MAX_PER_CLASS:
        raise DataError(f"n_heldout must be 0 to {MAX_PER_CLASS}, got {n_heldout}")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")


_Row = tuple[torch.Tensor, int, str, str]  # image, label, path, pixel hash


def _draw_class(
    cat: Catalog,
    name: str,
    label: int,
    n_per_class: int | None,
    n_heldout: int,
    image_size: int,
    seed: int,
    seen: dict[str, str],
    skipped: list[tuple[str, str]],
) -> tuple[list[_Row], list[_Row], int, int]:
    """Held-out then train rows of one class (:func:`ml.data.draw.draw_class`, decoded by
    :func:`load_image`'s steps); returns them, #skipped and #withheld."""
    held, train, n_bad, n_dropped = draw_class(
        cat, name, label, n_per_class, n_heldout, image_size, seed, seen, skipped, load_rgb
    )

    def rows(drawn: list[Drawn]) -> list[_Row]:
        return [(_tensor(d.pixels), d.label, d.path, d.hash) for d in drawn]

    return rows(held), rows(train), n_bad, n_dropped


def _to_set(rows: list[_Row], classes: list[str], size: int) -> ImageSet:
    empty = torch.empty(0, 3, size, size, dtype=torch.uint8)
    return ImageSet(
        torch.stack([r[0] for r in rows]) if rows else empty,
        torch.tensor([r[1] for r in rows], dtype=torch.int64),
        list(classes),
        [r[2] for r in rows],
        [r[3] for r in rows],
    )


def load_split(
    root: Path | str,
    *,
    layout: str = "auto",
    n_per_class: int | None = None,
    n_heldout: int = 0,
    image_size: int = 64,
    seed: int = 0,
    classes: list[str] | None = None,
    roots: Sequence[Path | str] | None = None,
) -> DatasetSplit:
    """Draw ``n_heldout`` then ``n_per_class`` images per class (None = all the rest).

    ``roots``: folders every file read must resolve inside, symbolic links included (default:
    ``root`` itself); the service passes its data roots, so a folder changed after registration
    to link elsewhere fails here with :class:`OutsideRootsError` (see :func:`ml.data.catalog.scan`).

    Per class, groups (single images unless the layout has lesions) are shuffled with a
    seeded per-class RNG and assigned in that order, held-out first. A group that only
    partly fits the held-out quota gives it what it needs and the rest of that group is
    dropped, so no group spans both sides. Unreadable files and exact pixel duplicates of an
    already chosen image are logged, recorded in ``skipped`` and replaced by the next one.
    """
    _check_args(n_per_class, n_heldout, image_size, seed)
    cat = scan(Path(root), layout, roots)
    if classes is not None:
        classes = [nfc(c) for c in classes]  # as scan names them
        unknown = sorted(set(classes) - set(cat.items))
        if unknown:
            raise DataError(f"unknown classes {unknown} in {cat.root}; valid: {cat.classes}")
    names = sorted(set(classes)) if classes is not None else cat.classes
    if len(names) < 2:
        raise DataError(f"need at least two classes, found {names} in {cat.root} ({cat.layout})")
    for c in names:
        if not cat.items[c]:
            raise DataError(f"class {c!r} has no images (allowed suffixes: {IMAGE_SUFFIXES})")

    skipped = list(cat.missing) + list(cat.not_images)
    seen: dict[str, str] = {}  # pixel hash -> path, across classes: no image on both sides
    train_rows: list[_Row] = []
    held_rows: list[_Row] = []
    for label, c in enumerate(names):
        needed = n_heldout + (n_per_class or 1)
        asked = f"n_heldout={n_heldout} + n_per_class={n_per_class or 'all (at least 1)'}"
        not_images = cat.not_images_per_class.get(c, 0)  # left out by the scan already
        if len(cat.items[c]) < needed and not not_images:
            raise DataError(
                f"class {c!r} has {len(cat.items[c])} images but {needed} were asked ({asked})"
            )
        held: list[_Row]
        train: list[_Row]
        held, train, n_bad, n_dropped, usable = [], [], 0, 0, len(cat.items[c])
        if len(cat.items[c]) >= needed:
            held, train, n_bad, n_dropped = _draw_class(
                cat, c, label, n_per_class, n_heldout, image_size, seed, seen, skipped
            )
            usable = len(held) + len(train)
        if len(held) < n_heldout or len(train) < (n_per_class or 1):
            raise DataError(
                f"class {c!r} has {usable} usable images of {len(cat.items[c]) + not_images} "
                f"({n_bad + not_images} skipped, {n_dropped} withheld with held-out groups) but "
                f"{needed} were asked ({asked})"
            )
        held_rows += held
        train_rows += train

    selection = {
        "root": str(cat.root.resolve()),
        "layout": cat.layout,
        "n_per_class": n_per_class,
        "n_heldout": n_heldout,
        "image_size": image_size,
        "seed": seed,
        "classes": names,
    }
    return DatasetSplit(
        train=_to_set(train_rows, names, image_size),
        heldout=_to_set(held_rows, names, image_size),
        classes=names,
        layout=cat.layout,
        root=cat.root,
        skipped=skipped,
        selection=selection,
    )


def load_selection(
    selection: dict[str, Any], roots: Sequence[Path | str] | None = None
) -> DatasetSplit:
    """Rebuild the exact split recorded in ``DatasetSplit.selection`` (``roots``: as for
    :func:`load_split`; machine-specific, so never part of the selection)."""
    keys = ("layout", "n_per_class", "n_heldout", "image_size", "seed", "classes")
    missing = [k for k in ("root", *keys) if k not in selection]
    if missing:
        raise DataError(f"selection lacks {missing}; expected keys root, {', '.join(keys)}")
    return load_split(selection["root"], **{k: selection[k] for k in keys}, roots=roots)
