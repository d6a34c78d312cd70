"""Toy cytology domain: procedurally drawn white blood cells and a rule-based checker.

Why it exists: every later stage (diffusion training, simulated expert review, evaluation) needs a
domain where "is this image plausible for class X?" can be answered without a human. The classes
differ in what a haematologist looks at (cell size, nucleus lobes, N:C ratio, cytoplasm colour,
granules), and one table of class specs (`SPECS`) drives both the drawer and the checker, so the
two cannot drift apart.

The checker measures each criterion from pixels by linear colour unmixing against the expected
class's palette (cytoplasm, nucleus, granule colours). Unmixing is linear in colour, so it is
robust to the moderate blur a small diffusion model produces, while a wrong class, a blank image
or noise leaves measurements outside the expected ranges.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

from ml.errors import Invalid

TOY_CLASSES: tuple[str, ...] = ("lymphocyte", "neutrophil", "eosinophil", "monocyte", "basophil")
CRITERIA: tuple[str, ...] = (
    "cell_size",
    "nucleus_lobes",
    "nc_ratio",
    "cytoplasm_colour",
    "granules",
)

RGB = tuple[int, int, int]
Grid = npt.NDArray[np.float32]  # canvas coordinates (fractions of the side)
Mask = npt.NDArray[np.bool_]
Images = npt.NDArray[Any] | Iterable[npt.NDArray[Any] | Image.Image]  # N,H,W,3 / N,3,H,W or list
BACKGROUND: RGB = (236, 218, 226)  # pale pink smear background
NUCLEUS: RGB = (130, 35, 150)  # dark purple chromatin, shared by all classes
WORK_SIZE = 64  # the checker resizes every image to this side
BG_DIST, NUC_LEVEL = 28.0, 0.5  # colour distance from background for "cell"; nucleus abundance
# Acceptance tolerances around the drawn ranges (absorb blur, resizing and segmentation error).
SIZE_TOL, NC_TOL, COLOUR_TOL, GRANULE_TOL, GRANULE_MAX_ABSENT = 0.025, 0.07, 30.0, 0.15, 0.1


@dataclass(frozen=True)
class ClassSpec:
    """What a cell of one class looks like; the single source of truth for drawer and checker."""

    name: str
    radius: tuple[float, float]  # cell radius, fraction of the image side
    lobes: tuple[int, int]  # number of separate nucleus lobes
    nc_ratio: tuple[float, float]  # nucleus area / cell area
    cytoplasm_rgb: RGB
    granule_rgb: RGB | None  # None: agranular cytoplasm
    granule_density: tuple[float, float]  # share of cytoplasm covered by granules
    descriptions: tuple[str, ...]  # one plain-language line per entry of CRITERIA

    @property
    def description(self) -> dict[str, str]:
        """Criterion -> what an expert expects, for prompts and review sheets."""
        return dict(zip(CRITERIA, self.descriptions, strict=True))


SPECS: dict[str, ClassSpec] = {
    "lymphocyte": ClassSpec(
        "lymphocyte",
        (0.18, 0.21),
        (1, 1),
        (0.42, 0.56),
        (150, 195, 238),
        None,
        (0.0, 0.0),
        (
            "small cell",
            "single round nucleus",
            "high N:C, scant cytoplasm",
            "sky-blue cytoplasm",
            "no granules",
        ),
    ),
    "neutrophil": ClassSpec(
        "neutrophil",
        (0.24, 0.28),
        (3, 5),
        (0.18, 0.28),
        (208, 170, 208),
        None,
        (0.0, 0.0),
        (
            "medium cell",
            "3-5 nucleus lobes",
            "low N:C",
            "pale pink-lilac cytoplasm",
            "no visible granules",
        ),
    ),
    "eosinophil": ClassSpec(
        "eosinophil",
        (0.25, 0.29),
        (2, 2),
        (0.18, 0.28),
        (246, 176, 132),
        (214, 72, 44),
        (0.35, 0.55),
        (
            "medium cell",
            "bilobed nucleus",
            "low N:C",
            "orange-pink cytoplasm",
            "coarse orange-red granules",
        ),
    ),
    "monocyte": ClassSpec(
        "monocyte",
        (0.31, 0.35),
        (1, 1),
        (0.30, 0.42),
        (164, 172, 206),
        None,
        (0.0, 0.0),
        (
            "large cell",
            "single kidney-shaped nucleus",
            "moderate N:C",
            "grey-blue cytoplasm",
            "no granules",
        ),
    ),
    "basophil": ClassSpec(
        "basophil",
        (0.21, 0.25),
        (1, 2),
        (0.24, 0.36),
        (196, 170, 214),
        (10, 50, 90),
        (0.42, 0.62),
        (
            "small-medium cell",
            "1-2 nucleus lobes",
            "moderate N:C",
            "lilac cytoplasm",
            "dense dark blue-black granules",
        ),
    ),
}


def _spec(cls: str) -> ClassSpec:
    """Look up a class, failing loudly with the valid names."""
    if cls not in SPECS:
        raise Invalid(f"unknown class {cls!r}; valid classes: {', '.join(TOY_CLASSES)}")
    return SPECS[cls]


# ----------------------------------------------------------------------------------- drawing


def _ellipse(x: Grid, y: Grid, cx: float, cy: float, a: float, b: float, ang: float) -> Mask:
    """Boolean ellipse mask on coordinate grids (units: fraction of image side)."""
    c, s = np.cos(ang), np.sin(ang)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    inside: Mask = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return inside


def _nucleus(
    spec: ClassSpec,
    rng: np.random.Generator,
    x: Grid,
    y: Grid,
    cx: float,
    cy: float,
    radius: float,
    rot: float,
) -> tuple[Mask, list[tuple[float, float]]]:
    """Nucleus mask (N:C and lobe count inside the spec) plus lobe centres for chromatin threads."""
    area = rng.uniform(*spec.nc_ratio) * np.pi * radius**2
    n = int(rng.integers(spec.lobes[0], spec.lobes[1] + 1))
    gap = 0.055  # lobe separation (fraction of side): stays >1.5 px even at 32x32
    if spec.name == "monocyte":  # kidney: notched ellipse, rescaled to the target area
        squash = rng.uniform(0.7, 0.8)

        def kidney(scale: float) -> Mask:
            a, b = 0.2 * scale, 0.2 * squash * scale
            ox, oy = cx - 0.25 * b * np.sin(rot), cy + 0.25 * b * np.cos(rot)
            nx, ny = ox - 1.05 * b * np.sin(rot), oy + 1.05 * b * np.cos(rot)
            notch = _ellipse(x, y, nx, ny, 0.45 * a, 0.55 * b, rot)
            return _ellipse(x, y, ox, oy, a, b, rot) & ~notch

        return kidney(np.sqrt(area / max(kidney(1.0).mean(), 1e-9))), []
    if n == 1:
        rn = np.sqrt(area / np.pi)
        off = rng.uniform(0.3, 0.7) * max(radius - rn - 0.01, 0.0)  # eccentric nucleus
        e1 = rng.uniform(0.88, 1.0)
        ox, oy = cx + off * np.cos(rot), cy + off * np.sin(rot)
        return _ellipse(x, y, ox, oy, rn / e1**0.5, rn * e1**0.5, rot + 1.0), []
    rl = np.sqrt(area / (n * np.pi))  # equal-area lobes, elongated along an arc round the centre
    e = rng.uniform(0.65, 0.85, size=n)
    chord = 2 * rl / e.min() ** 0.5 + gap
    rho = max(radius - rl - 0.015, chord / 2 + 1e-3)
    step = 2 * np.arcsin(min(chord / (2 * rho), 1.0)) * rng.uniform(1.0, 1.08)
    mask, centres = np.zeros_like(x, dtype=bool), []
    for i in range(n):
        t = rot + (i - (n - 1) / 2) * step
        lx, ly = cx + rho * np.cos(t), cy + rho * np.sin(t)
        if n == 2:  # spectacle nucleus: lobes on a line through the centre
            lx, ly = cx + (i - 0.5) * chord * np.cos(rot), cy + (i - 0.5) * chord * np.sin(rot)
            t = rot
        mask |= _ellipse(x, y, lx, ly, rl / e[i] ** 0.5, rl * e[i] ** 0.5, t + np.pi / 2)
        centres.append((lx, ly))
    return mask, centres


def _segment_dist(
    x: Grid, y: Grid, p: tuple[float, float], q: tuple[float, float]
) -> npt.NDArray[np.floating[Any]]:
    """Distance from every grid point to the segment p-q."""
    d = np.subtract(q, p)
    t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / max(d @ d, 1e-12), 0, 1)
    dist: npt.NDArray[np.floating[Any]] = np.hypot(x - p[0] - t * d[0], y - p[1] - t * d[1])
    return dist


@lru_cache(maxsize=4)
def _grid(big: int) -> tuple[Grid, Grid]:
    """Pixel-centre coordinates (y, x) of a big x big canvas, in fractions of the side."""
    y, x = (np.mgrid[0:big, 0:big].astype(np.float32) + 0.5) / big
    return y, x


def draw_cell(cls: str, rng: np.random.Generator, size: int = 64) -> npt.NDArray[np.uint8]:
    """Draw one (size, size, 3) uint8 RGB cell of `cls`, jittered but inside its spec.

    Rendered supersampled and box-downsampled, so edges and granules are anti-aliased at any size.
    """
    spec = _spec(cls)
    ss = max(1, 128 // size)
    big = size * ss
    y, x = _grid(big)
    shade = 1.0 - 0.05 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)  # mild vignetting
    for _ in range(int(rng.integers(0, 3))):  # faint out-of-focus red cells at the edges
        t, d, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 0.65), rng.uniform(0.12, 0.16)
        dist = np.hypot(x - 0.5 - d * np.cos(t), y - 0.5 - d * np.sin(t)) / r
        shade -= np.clip(1.0 - dist, 0, 1) ** 0.3 * (0.6 + 0.4 * (dist > 0.5)) * 0.06
    img = shade[..., None] * np.array(BACKGROUND, np.float32)
    radius = rng.uniform(*spec.radius)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    theta, dist = np.arctan2(y - cy, x - cx), np.hypot(x - cx, y - cy)
    wobble = 1.0 + sum(
        rng.uniform(0, 0.03) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    cell = dist <= radius * wobble
    nucleus, centres = _nucleus(spec, rng, x, y, cx, cy, radius * 0.97, rot)
    nucleus &= cell
    img[cell] = np.array(spec.cytoplasm_rgb) + rng.normal(0, 4, 3)
    if spec.granule_rgb is not None:  # random discs covering a target share of the cytoplasm
        region = cell & ~nucleus & (dist <= radius * 0.97)
        rg = 0.018 * big  # granule radius in canvas pixels (about 1 px at 64)
        target = rng.uniform(*spec.granule_density)
        k = int(rg) + 1
        disc = (np.hypot(*np.mgrid[-k : k + 1, -k : k + 1]) <= rg).sum()  # pixels per granule
        pts, grains = np.ones_like(region), np.zeros_like(region)
        for _ in range(3):  # Poisson discs into the free area, topped up towards the target
            free = region & ~grains
            want = target * region.sum() - grains.sum()  # pixels still to cover
            if want < 0.02 * region.sum():
                break
            count = int(-np.log(1.0 - want / free.sum()) * free.sum() / disc) + 1
            pts.flat[rng.choice(np.flatnonzero(free), size=count)] = False
            grains = (ndimage.distance_transform_edt(pts) <= rg) & region
        img[grains] = np.array(spec.granule_rgb) + rng.normal(0, 4, 3)
    nuc_rgb = np.array(NUCLEUS) + rng.normal(0, 4, 3)
    if centres:  # faint chromatin threads joining lobes (too faint to count as nucleus)
        thread = np.zeros_like(x)
        for p, q in pairwise(centres):
            thread = np.maximum(thread, 0.4 * (_segment_dist(x, y, p, q) < 0.006))
        img += thread[..., None] * (nuc_rgb - img)
    img[nucleus] = nuc_rgb
    small = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    small += rng.normal(0, 2.0, small.shape)
    pixels: npt.NDArray[np.uint8] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return pixels


def make_toy_images(
    n_per_class: int, size: int = 64, seed: int = 0
) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """Draw n_per_class cells of every class in TOY_CLASSES order; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for cls in TOY_CLASSES:
        for _ in range(n_per_class):
            images.append(draw_cell(cls, rng, size))
            labels.append(cls)
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), labels


def write_toy_dataset(root: Path, n_per_class: int = 100, size: int = 64, seed: int = 0) -> Path:
    """Write root/<class>/<class>_<i:04d>.png plus root/manifest.csv (image_id,class)."""
    root = Path(root)
    images, labels = make_toy_images(n_per_class, size, seed)
    rows, counters = [], dict.fromkeys(TOY_CLASSES, 0)
    for image, cls in zip(images, labels, strict=True):
        (root / cls).mkdir(parents=True, exist_ok=True)
        image_id = f"{cls}_{counters[cls]:04d}"
        counters[cls] += 1
        Image.fromarray(image).save(root / cls / f"{image_id}.png")
        rows.append((image_id, cls))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "class"])
        writer.writerows(rows)
    return root


# ----------------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class CriterionResult:
    """One measured criterion and the acceptance interval it was compared with."""

    name: str
    value: float
    low: float
    high: float
    passed: bool


@dataclass(frozen=True)
class Verdict:
    """The checker's judgement of one image against one expected class."""

    expected_class: str
    criteria: tuple[CriterionResult, ...]

    @property
    def plausible(self) -> bool:
        """The seed's rule: a single failed criterion makes the image implausible."""
        return all(c.passed for c in self.criteria)

    @property
    def failed(self) -> list[str]:
        """Names of the failed criteria, in CRITERIA order."""
        return [c.name for c in self.criteria if not c.passed]

    @property
    def values(self) -> dict[str, float]:
        """Criterion -> measured value, for reports."""
        return {c.name: c.value for c in self.criteria}


def _to_work(image: npt.NDArray[Any] | Image.Image) -> npt.NDArray[np.float32]:
    """Any RGB image (HWC, CHW or PIL) -> float32 (WORK_SIZE, WORK_SIZE, 3) in 0..255."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
            arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise Invalid(f"expected an RGB image (HxWx3, 3xHxW or PIL), got shape {arr.shape}")
        if arr.dtype != np.uint8:  # floats in 0..1 (or 0..255) are accepted too
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
            arr = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


_CENTRE = np.hypot(*(np.mgrid[0:WORK_SIZE, 0:WORK_SIZE] - WORK_SIZE / 2)) < 0.2 * WORK_SIZE


def _cell_mask(work: npt.NDArray[np.float32]) -> Mask:
    """The central cell: pixels far from the border (background) colour, one filled component."""
    ring = np.concatenate(
        [
            work[:2].reshape(-1, 3),
            work[-2:].reshape(-1, 3),
            work[:, :2].reshape(-1, 3),
            work[:, -2:].reshape(-1, 3),
        ]
    )
    mask: Mask = np.linalg.norm(work - np.median(ring, axis=0), axis=-1) > BG_DIST
    mask = ndimage.binary_opening(mask)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    overlap = np.bincount(labels[_CENTRE], minlength=n + 1)[1:]
    if overlap.max() == 0:
        return np.zeros_like(mask)
    filled: Mask = ndimage.binary_fill_holes(labels == 1 + int(overlap.argmax()))
    return filled


def _unmix(
    pix: npt.NDArray[np.float32],
    cyto: npt.NDArray[np.floating[Any]],
    granule: npt.NDArray[np.floating[Any]] | None,
) -> npt.NDArray[np.floating[Any]]:
    """Abundances of nucleus (and granule) colour per pixel, cytoplasm as the reference.

    Linear in colour, so blur that mixes the three colours mixes the abundances the same way.
    """
    ends = [np.array(NUCLEUS, np.float32) - cyto]
    if granule is not None:
        ends.append(granule - cyto)
    return (pix - cyto) @ np.linalg.pinv(np.stack(ends, axis=1)).T


def _in(name: str, value: float, low: float, high: float) -> CriterionResult:
    """Compare a measurement with its acceptance interval (NaN never passes)."""
    return CriterionResult(name, float(value), float(low), float(high), bool(low <= value <= high))


def check_image(image: npt.NDArray[Any] | Image.Image, expected_class: str) -> Verdict:
    """Measure the five criteria from pixels and compare them with `expected_class`'s spec.

    Accepts HxWx3 uint8, 3xHxW uint8 or PIL images of any size (32..256 intended); the image is
    resized to WORK_SIZE first so thresholds are size independent.
    """
    spec = _spec(expected_class)
    work = _to_work(image)
    cell = _cell_mask(work)
    cyto = np.array(spec.cytoplasm_rgb, np.float32)
    granule = None if spec.granule_rgb is None else np.array(spec.granule_rgb, np.float32)
    ab = _unmix(work.reshape(-1, 3), cyto, granule).reshape(WORK_SIZE, WORK_SIZE, -1)
    nucleus = cell & (ab[..., 0] > NUC_LEVEL)
    cell_area = max(int(cell.sum()), 1)
    labels, n = ndimage.label(nucleus)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    lobes = int((sizes >= max(4.0, 0.015 * cell_area)).sum())
    region = ndimage.binary_erosion(cell, iterations=2) & ~nucleus  # cytoplasm, off the rim
    pix = work[region]
    far = ~ndimage.binary_dilation(nucleus, iterations=2)[region]  # clear of nucleus blur
    if far.sum() < 5:
        colour_dist, grains = np.inf, np.nan
    else:
        clean = pix[far]
        if granule is not None:  # remove the granules' share of the colour
            clean = clean - np.clip(ab[region][far][:, 1:], 0, 1) @ (granule - cyto)[None]
        colour_dist = float(np.linalg.norm(np.median(clean, axis=0) - cyto))
        if granule is not None:
            grains = float(np.clip(ab[region][:, 1], 0, 1).mean())  # share of granule colour
        else:  # granule evidence, measured against this cell's own typical cytoplasm colour
            ref = np.median(pix, axis=0)
            grains = max(
                float(_unmix(pix, ref, np.array(g.granule_rgb, np.float32))[:, 1].mean())
                for g in SPECS.values()
                if g.granule_rgb is not None
            )
    g_lo, g_hi = (
        (-GRANULE_MAX_ABSENT, GRANULE_MAX_ABSENT)
        if granule is None
        else (spec.granule_density[0] - GRANULE_TOL, spec.granule_density[1] + GRANULE_TOL)
    )
    results = (
        _in(
            "cell_size",
            np.sqrt(cell.sum() / np.pi) / WORK_SIZE,
            spec.radius[0] - SIZE_TOL,
            spec.radius[1] + SIZE_TOL,
        ),
        _in("nucleus_lobes", lobes, *spec.lobes),
        _in(
            "nc_ratio",
            nucleus.sum() / cell_area,
            spec.nc_ratio[0] - NC_TOL,
            spec.nc_ratio[1] + NC_TOL,
        ),
        _in("cytoplasm_colour", colour_dist, 0.0, COLOUR_TOL),
        _in("granules", grains, g_lo, g_hi),
    )
    return Verdict(expected_class, results)


def check_images(images: Images, expected_class: str) -> list[Verdict]:
    """check_image over a batch (array N,H,W,3 / N,3,H,W or an iterable of images)."""
    _spec(expected_class)
    return [check_image(im, expected_class) for im in images]


def plausibility(images: Images, expected_class: str) -> float:
    """Share of images judged plausible for expected_class (0..1; 0 for an empty batch)."""
    verdicts = check_images(images, expected_class)
    return sum(v.plausible for v in verdicts) / len(verdicts) if verdicts else 0.0
