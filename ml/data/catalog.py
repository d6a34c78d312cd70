"""Dataset catalog: find labelled images in three on-disk layouts without decoding them.

Torch-free, so the API can validate a dataset folder without loading the ML stack (PIL is
imported only to read image headers); :mod:`ml.data.images` re-exports everything here and adds
decoding and balanced splits.
"""

from __future__ import annotations

import csv
import logging
import os
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ml.errors import Invalid

# Under "ml.data", beside the loader: configuring the "ml.data" logger covers both.
log = logging.getLogger(__name__)

Layout = Literal["auto", "folder", "ham10000", "matek"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
HAM_CSV = "HAM10000_metadata.csv"

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


#: File signatures of the formats in IMAGE_SUFFIXES: a file named like an image whose first bytes
#: match none of them (a text file, a link to /etc/passwd) is not an image and is skipped.
IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"\xff\xd8\xff",  # JPEG
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
MAX_SHOWN = 10  # offending files named in one message
#: Default of ``PROTOMED_MAX_IMAGE_PIXELS``: the most pixels (width x height) an image's header
#: may declare. Real datasets hold images of at most a few megapixels; a tiny PNG can declare
#: 13000x13000 and cost over a gigabyte and half a minute of CPU each time it is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
PIXELS_ENV = "PROTOMED_MAX_IMAGE_PIXELS"


class DataError(Invalid):
    """Bad data or arguments; the message names the problem and what is allowed."""


class OutsideRootsError(DataError):
    """A file or folder of the dataset resolves (through a symbolic link) outside the allowed
    roots: reading it would let whoever controls the folder make protomed read any file."""


def data_dir() -> Path:
    """Shared real-data folder: ``PROTOMED_DATA_DIR``, else ``<repo>/../shared/data``."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("PROTOMED_DATA_DIR", default))


def max_image_pixels() -> int:
    """The pixel limit: ``PROTOMED_MAX_IMAGE_PIXELS`` (the service's setting of that name), else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`. Read from the environment because the workers' training
    processes (torchrun included) run the ML core without the service's settings."""
    value = os.environ.get(PIXELS_ENV, "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else DEFAULT_MAX_IMAGE_PIXELS


def nfc(name: str) -> str:
    """A class name in Unicode NFC: ``café`` typed on one system and read from a folder on
    another (macOS writes NFD) must be one class, as reviewers see one name."""
    return unicodedata.normalize("NFC", name)


def too_many_pixels(size: tuple[int, int], limit: int) -> str | None:
    """Why an image of ``size`` (width, height) is refused, or None if it is within ``limit``."""
    width, height = size
    if width * height <= limit:
        return None
    return (
        f"too large: {width}x{height} pixels ({width * height}) is over the limit of {limit} "
        f"pixels ({PIXELS_ENV}); it is not decoded"
    )


def bomb_refusal(exc: Exception, limit: int) -> str:
    """Why an image PIL itself refused to open as a decompression bomb is refused (PIL refuses
    above twice its ``MAX_IMAGE_PIXELS``, which :mod:`ml.data.images` sets to ``limit``)."""
    return f"too large: {exc} (limit {limit} pixels, {PIXELS_ENV}); it is not decoded"


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
    # (path, reason) of files named like images whose content is not an image; not in items
    not_images: list[tuple[str, str]] = field(default_factory=list)
    not_images_per_class: dict[str, int] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)  # where its files may resolve (resolved)

    def check_inside(self, path: Path) -> None:
        """Raise :class:`OutsideRootsError` if ``path`` resolves outside :attr:`roots` now: the
        loaders call it again right before opening each file, which a link could replace
        after the scan."""
        check_inside([path], self.roots or [self.root.resolve()], self.root)

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


def _resolved_roots(root: Path, roots: Sequence[Path | str] | None) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in (roots if roots is not None else [root])]


def _outside(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return not any(real.is_relative_to(r) for r in roots)


def check_inside(paths: Sequence[Path], roots: list[Path], root: Path) -> None:
    """Raise :class:`OutsideRootsError` naming every path (up to MAX_SHOWN) that resolves
    outside ``roots``. Checked on the real path, so it holds however deep the link is."""
    bad = [p for p in paths if _outside(p, roots)]
    if not bad:
        return
    shown = "; ".join(f"{p} -> {os.path.realpath(p)}" for p in bad[:MAX_SHOWN])
    more = f" (and {len(bad) - MAX_SHOWN} more)" if len(bad) > MAX_SHOWN else ""
    allowed = ", ".join(str(r) for r in roots)
    raise OutsideRootsError(
        f"{len(bad)} path(s) in dataset {root} lead outside the allowed data roots ({allowed}) "
        f"through symbolic links: {shown}{more}; remove those links or copy the files in "
        "(links that stay inside the allowed roots are followed)"
    )


def _is_image(path: Path, max_pixels: int) -> str | None:
    """None if ``path`` is an image within ``max_pixels``, else why not. Reads the first bytes,
    then the header (PIL's ``open`` decodes no pixels)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not any(head.startswith(sig) for sig in IMAGE_SIGNATURES):
        return "unreadable: not an image (its content is not PNG, JPEG, BMP or TIFF)"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return too_many_pixels(im.size, max_pixels)
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice its limit
        return bomb_refusal(exc, max_pixels)
    except Exception as exc:  # PIL raises many types for a bad header
        return f"unreadable: {exc}"


def _normalise(
    items: dict[str, list[Path]], names: dict[str, str], what: str
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """``items`` and ``names`` keyed by NFC class names (the paths keep the names on disk);
    :class:`DataError` if two spellings on disk are one name after normalising."""
    spelled: dict[str, str] = {}
    for raw in sorted(items):
        key = nfc(raw)
        if key in spelled:
            raise DataError(
                f"{what} {spelled[key]!a} and {raw!a} are the same class name "
                f"{key!r} in two Unicode spellings (class names are compared in NFC); rename "
                "or merge one of them"
            )
        spelled[key] = raw
    return (
        {key: items[raw] for key, raw in spelled.items()},
        {key: nfc(names[raw]) for key, raw in spelled.items()},
    )


def scan(
    root: Path,
    layout: str = "auto",
    roots: Sequence[Path | str] | None = None,
    max_pixels: int | None = None,
) -> Catalog:
    """List every labelled image under ``root`` without decoding any of them.

    ``roots``: the folders every file read must resolve inside (default: ``root`` itself).
    Symbolic links are allowed as long as their targets stay inside; any class folder, image,
    metadata CSV or manifest leading outside raises :class:`OutsideRootsError`, so a dataset
    folder cannot make the service read (or count) files it was not allowed to. Files named
    like images whose first bytes are no image, or whose header declares more than
    ``max_pixels`` pixels (default :func:`max_image_pixels`), are left out and listed in
    ``not_images``. Class names are NFC (:func:`nfc`); two spellings of one name on disk raise
    :class:`DataError`.
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    root = _check_root(root)
    allowed = _resolved_roots(root, roots)
    check_inside(
        [root, *(p for p in (root / HAM_CSV, root / "manifest.csv") if p.exists())], allowed, root
    )
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
    check_inside(
        [
            *(root / c for c in items if (root / c).is_dir()),  # class folders, even empty ones
            *(p for ps in items.values() for p in ps),
        ],
        allowed,
        root,
    )
    items, names = _normalise(
        items, names, "class folders" if layout != "ham10000" else "dx values"
    )
    not_images: list[tuple[str, str]] = []
    per_class: dict[str, int] = {}
    for c, paths in items.items():
        keep = []
        for p in paths:
            reason = _is_image(p, limit)
            if reason is None:
                keep.append(p)
            else:
                not_images.append((str(p), reason))
                per_class[c] = per_class.get(c, 0) + 1
        items[c] = keep
    if not_images:
        log.warning(
            "skipping %d files that are not images: %s", len(not_images), not_images[:MAX_SHOWN]
        )
    for paths in items.values():
        for p in paths:
            groups.setdefault(p, str(p))
    return Catalog(root, layout, items, groups, names, missing, not_images, per_class, allowed)
