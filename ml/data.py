"""Data layer: find labelled images in three on-disk layouts and draw small, balanced,
reproducible train / held-out splits from them.

The service trains on ~100 images per class, so the split must be exactly balanced,
rebuildable from a JSON record, robust to the odd corrupt file, and leak-free: held-out
images never share a lesion (HAM10000 ``lesion_id``) or identical pixels with training.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "folder", "ham10000", "matek")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
HAM_CSV = "HAM10000_metadata.csv"
MIN_IMAGE_SIZE = 8

#: The 16 Matek-19 bone-marrow classes we train on (abbreviation -> full name).
MATEK_CLASSES: dict[str, str] = {
    "ART": "artefact",
    "BAS": "basophil",
    "BLA": "blast",
    "EBO": "erythroblast",
    "EOS": "eosinophil",
    "HAC": "hairy cell",
    "LYT": "lymphocyte",
    "MMZ": "metamyelocyte",
    "MON": "monocyte",
    "MYB": "myelocyte",
    "NGB": "band neutrophil",
    "NGS": "segmented neutrophil",
    "NIF": "not identifiable",
    "PEB": "proerythroblast",
    "PLM": "plasma cell",
    "PMO": "promyelocyte",
}
#: Other Matek abbreviations: rare classes, recognised for detection but not used.
MATEK_IGNORED: dict[str, str] = {
    "ABE": "abnormal eosinophil",
    "FGC": "faggot cell",
    "KSC": "smudge cell",
    "LYI": "immature lymphocyte",
    "OTH": "other cell",
}
HAM_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


class DataError(ValueError):
    """Bad data or arguments; the message names the problem and what is allowed."""


def data_dir() -> Path:
    """Shared real-data folder: ``PROTOMED_DATA_DIR``, else ``<repo>/../shared/data``."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("PROTOMED_DATA_DIR", default))


def _visible_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive), skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found)


def _check_root(root: Path | str) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"data root {root} {what}; expected a folder of images")
    return root


def detect_layout(root: Path) -> str:
    """Guess the layout: HAM10000 CSV present, mostly Matek abbreviations, else plain folders."""
    root = _check_root(root)
    if (root / HAM_CSV).is_file():
        return "ham10000"
    names = [d.name for d in _visible_dirs(root)]
    known = sum(n in MATEK_CLASSES or n in MATEK_IGNORED for n in names)
    return "matek" if names and known > len(names) / 2 else "folder"


@dataclass(frozen=True)
class Catalog:
    """What :func:`scan` found: class -> sorted image paths, plus split groups per path."""

    root: Path
    layout: str
    items: dict[str, list[Path]]
    groups: dict[Path, str]  # images sharing a group id must stay on one side of a split
    display_names: dict[str, str]
    missing: list[tuple[str, str]] = field(default_factory=list)  # listed but not on disk

    @property
    def classes(self) -> list[str]:
        return sorted(self.items)

    def counts(self) -> dict[str, int]:
        return {c: len(self.items[c]) for c in self.classes}


def _scan_folder(root: Path) -> dict[str, list[Path]]:
    return {d.name: _image_files(d) for d in _visible_dirs(root)}


def _manifest_groups(root: Path, items: dict[str, list[Path]]) -> dict[Path, str]:
    """Split groups from a ``manifest.csv`` (image_id, split_group) beside the class folders.

    derm64 ships one: several images of one lesion share a group, and must not straddle the split.
    """
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"image_id", "split_group"} <= set(reader.fieldnames or ()):
            return {}
        by_id = {r["image_id"].strip(): r["split_group"].strip() for r in reader}
    return {p: by_id[p.stem] for ps in items.values() for p in ps if by_id.get(p.stem)}


def _scan_matek(root: Path) -> dict[str, list[Path]]:
    items = {}
    for d in _visible_dirs(root):
        if d.name in MATEK_CLASSES:
            items[d.name] = _image_files(d)
        else:
            log.info("matek layout: ignoring folder %s (not one of %s)", d, sorted(MATEK_CLASSES))
    return items


def _scan_ham(root: Path) -> tuple[dict[str, list[Path]], dict[Path, str], list[tuple[str, str]]]:
    by_stem: dict[str, Path] = {}
    for p in _image_files(root):  # sorted, so duplicate copies resolve the same way every time
        by_stem.setdefault(p.stem, p)
    items: dict[str, list[Path]] = {}
    groups: dict[Path, str] = {}
    missing: list[tuple[str, str]] = []
    with open(root / HAM_CSV, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"image_id", "dx"} <= set(reader.fieldnames or ()):
            raise DataError(
                f"{root / HAM_CSV} has columns {reader.fieldnames}; "
                "needs image_id and dx (lesion_id for group-aware splits)"
            )
        for row in reader:
            image_id, dx = row["image_id"].strip(), row["dx"].strip()
            path = by_stem.get(image_id)
            if path is None:
                missing.append((image_id, f"listed in {HAM_CSV} but no image file under {root}"))
                continue
            if path in groups:
                continue  # repeated CSV row
            items.setdefault(dx, []).append(path)
            groups[path] = (row.get("lesion_id") or "").strip() or str(path)
    if missing:  # one line, not thousands, for a partial download
        ids = [m[0] for m in missing]
        log.warning(
            "skipping %d images listed in %s but not on disk: %s", len(ids), HAM_CSV, ids[:5]
        )
    return {c: sorted(ps) for c, ps in items.items()}, groups, missing


def scan(root: Path, layout: str = "auto") -> Catalog:
    """List every labelled image under ``root`` without decoding any of them."""
    root = _check_root(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    groups: dict[Path, str] = {}
    missing: list[tuple[str, str]] = []
    if layout == "ham10000":
        if not (root / HAM_CSV).is_file():
            raise DataError(f"ham10000 layout needs {root / HAM_CSV}")
        items, groups, missing = _scan_ham(root)
        names = {c: HAM_NAMES.get(c, c) for c in items}
    elif layout == "matek":
        items = _scan_matek(root)
        names = {c: MATEK_CLASSES[c] for c in items}
    else:
        items = _scan_folder(root)
        names = {c: c for c in items}
        groups = _manifest_groups(root, items)
    for paths in items.values():
        for p in paths:
            groups.setdefault(p, str(p))
    return Catalog(root, layout, items, groups, names, missing)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode to uint8 (3, size, size): RGB, centre square crop, LANCZOS resize.

    The same steps as the shared data processing, so a 64x64 PNG loads bit-exactly.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


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


def _class_rng(seed: int, name: str) -> np.random.Generator:
    """Per-class stream, stable across runs (Python's hash() is salted per process)."""
    offset = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    return np.random.default_rng(seed + offset)


def _check_args(n_per_class: int | None, n_heldout: int, image_size: int, seed: int) -> None:
    if n_per_class is not None and n_per_class <= 0:
        raise DataError(f"n_per_class must be a positive integer or None (all), got {n_per_class}")
    if n_heldout < 0:
        raise DataError(f"n_heldout must be >= 0, got {n_heldout}")
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
    """Held-out then train rows of one class; returns them, #skipped and #withheld."""
    by_group: dict[str, list[Path]] = {}
    for p in cat.items[name]:
        by_group.setdefault(cat.groups[p], []).append(p)
    groups = list(by_group.values())
    groups = [groups[i] for i in _class_rng(seed, name).permutation(len(groups))]
    held: list[_Row] = []
    train: list[_Row] = []
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
            try:
                img = load_image(p, image_size)
            except Exception as exc:  # PIL raises many exception types for bad files
                log.warning("skipping unreadable image %s: %s", p, exc)
                skipped.append((str(p), f"unreadable: {exc}"))
                n_bad += 1
                continue
            h = pixel_hash(img)
            if h in seen:
                log.warning("skipping %s: same pixels as %s", p, seen[h])
                skipped.append((str(p), f"duplicate pixels of {seen[h]}"))
                n_bad += 1
                continue
            seen[h] = str(p)
            (held if to_held else train).append((img, label, str(p), h))
    return held, train, n_bad, n_dropped


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
) -> DatasetSplit:
    """Draw ``n_heldout`` then ``n_per_class`` images per class (None = all the rest).

    Per class, groups (single images unless the layout has lesions) are shuffled with a
    seeded per-class RNG and assigned in that order, held-out first. A group that only
    partly fits the held-out quota gives it what it needs and the rest of that group is
    dropped, so no group spans both sides. Unreadable files and exact pixel duplicates of an
    already chosen image are logged, recorded in ``skipped`` and replaced by the next one.
    """
    _check_args(n_per_class, n_heldout, image_size, seed)
    cat = scan(Path(root), layout)
    if classes is not None:
        unknown = sorted(set(classes) - set(cat.items))
        if unknown:
            raise DataError(f"unknown classes {unknown} in {cat.root}; valid: {cat.classes}")
    names = sorted(set(classes)) if classes is not None else cat.classes
    if len(names) < 2:
        raise DataError(f"need at least two classes, found {names} in {cat.root} ({cat.layout})")
    for c in names:
        if not cat.items[c]:
            raise DataError(f"class {c!r} has no images (allowed suffixes: {IMAGE_SUFFIXES})")

    skipped = list(cat.missing)
    seen: dict[str, str] = {}  # pixel hash -> path, across classes: no image on both sides
    train_rows: list[_Row] = []
    held_rows: list[_Row] = []
    for label, c in enumerate(names):
        needed = n_heldout + (n_per_class or 1)
        asked = f"n_heldout={n_heldout} + n_per_class={n_per_class or 'all (at least 1)'}"
        if len(cat.items[c]) < needed:
            raise DataError(
                f"class {c!r} has {len(cat.items[c])} images but {needed} were asked ({asked})"
            )
        held, train, n_bad, n_dropped = _draw_class(
            cat, c, label, n_per_class, n_heldout, image_size, seed, seen, skipped
        )
        if len(held) < n_heldout or len(train) < (n_per_class or 1):
            raise DataError(
                f"class {c!r} has {len(held) + len(train)} usable images of "
                f"{len(cat.items[c])} ({n_bad} skipped, {n_dropped} withheld with held-out "
                f"groups) but {needed} were asked ({asked})"
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


def load_selection(selection: dict[str, Any]) -> DatasetSplit:
    """Rebuild the exact split recorded in ``DatasetSplit.selection``."""
    keys = ("layout", "n_per_class", "n_heldout", "image_size", "seed", "classes")
    missing = [k for k in ("root", *keys) if k not in selection]
    if missing:
        raise DataError(f"selection lacks {missing}; expected keys root, {', '.join(keys)}")
    return load_split(selection["root"], **{k: selection[k] for k in keys})
