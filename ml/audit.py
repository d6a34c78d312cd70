"""Memorisation audit of generated images: is any of them a (near) copy of a training image?

Small medical training sets (~100 images per class) are where diffusion models copy training
images (Somepalli et al. 2023; Carlini et al. 2023). For every generated image this finds its
nearest training image in two spaces (``ml.schemas.audit``: RMS pixel difference at the model's
image size, and cosine distance between the project's CLIP embeddings), both minimised over the
flips the model was trained with (``TrainConfig.flip``: a flipped training image is what such a
model can reproduce, so a flipped copy counts as a copy).

**Reference.** Real held-out images of the same split (never trained on) measured the same way
against the training set say how close two *different* real images get on this dataset. Per
class they are split at random into a calibration half and a check half:

- thresholds: per class and space, the k-th smallest calibration distance with
  k = max(1, floor(q (n + 1))). A fresh real image of the class is exchangeable with the n
  calibration images, so it falls at or below that value with probability k / (n + 1) (the
  split-conformal rank argument; Vovk et al. 2005, Angelopoulos & Bates 2021), at most q once
  n >= 1/q - 1. An image is flagged when it is at or below the threshold in any audited space,
  so the expected false-flag rate is at most the sum over spaces (reported).
- the check half, never used for thresholds, gives the measured false-flag rate on fresh real
  images with a Clopper-Pearson interval: the calibration's honesty, in the report.
- the distance-to-closest-record ratio: median DCR of the generated images over the median DCR
  of the calibration images (DCR as in Park et al. 2018 and the holdout comparison of Platzer &
  Reutterer 2021, "Holdout-based empirical assessment of mixed-type synthetic data"), and per
  image the nearest-neighbour distance ratio d1 / d2 (NNDR; Zhao et al. 2021, CTAB-GAN).

A nearest-neighbour audit finds copies and near-copies in these two spaces; it is no formal
privacy guarantee (no differential privacy): an image can leak a patient's features without
being close to any one training image, and a flag says "closer than real images get", not that
a patient is identifiable.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from ml.data.images import DatasetSplit, load_image, pixel_hash
from ml.errors import Invalid, NotFound
from ml.models.checkpoint import LoadedModel
from ml.prototypes.encoder import EmbeddingCache, ImageEncoder, embed
from ml.schemas.audit import (
    AuditConfig,
    AuditReport,
    AuditTotals,
    Calibration,
    ClassAudit,
    ImageAudit,
    Neighbour,
    Space,
    nearest,
)

FLIP_NAMES = ("none", "h", "v", "hv")
Progress = Callable[[str, float], None]  # (stage, fraction of the audit)


def flip_views(images: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """The image set as the model may reproduce it: itself, and with the training's random
    horizontal and vertical flips its three flipped versions (order of ``FLIP_NAMES``)."""
    if not flips:
        return [images]
    return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]


def pixel_distances(views: Sequence[torch.Tensor], train: torch.Tensor) -> torch.Tensor:
    """(F, N, M) RMS differences of [0, 1] pixels between each view of N images and M training
    images (float64 so exact copies come out exactly 0)."""
    ref = train.reshape(len(train), -1).double() / 255.0
    scale = math.sqrt(ref.shape[1])
    out = []
    for v in views:
        q = v.flatten(1).double() / 255.0  # flatten, not reshape(-1): a batch may be empty
        # differences, not the |a|^2 + |b|^2 - 2ab expansion, whose rounding makes copies > 0
        out.append(torch.cdist(q, ref, compute_mode="donot_use_mm_for_euclid_dist") / scale)
    return torch.stack(out)


def clip_distances(
    encoder: ImageEncoder,
    views: Sequence[torch.Tensor],
    train_emb: torch.Tensor,
    cache: EmbeddingCache | None,
) -> torch.Tensor:
    """(F, N, M) cosine distances between each view's CLIP embedding and the training
    embeddings (all L2-normalised)."""
    out = []
    for v in views:
        emb = embed(encoder, v.contiguous(), [pixel_hash(x) for x in v], cache)
        out.append(1.0 - emb.double() @ train_emb.double().T)
    return torch.stack(out).clamp_min(0.0)


# Per image: nearest distance, training index, flip, NNDR.
Nearest = tuple[
    npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]
]


def _nearest(dist: torch.Tensor) -> Nearest:
    """From (F, N, M): per image the nearest distance, training index, flip and NNDR."""
    best, flip = dist.min(0)  # (N, M): each training image at its best flip
    k = min(2, best.shape[1])
    top, idx = best.topk(k, dim=1, largest=False)
    d1 = top[:, 0]
    d2 = top[:, 1] if k > 1 else top[:, 0]
    nndr = torch.where(d2 > 0, d1 / d2.clamp_min(1e-12), torch.ones_like(d1))
    nn_flip = flip.gather(1, idx[:, :1])[:, 0]
    return d1.numpy(), idx[:, 0].numpy(), nn_flip.numpy(), nndr.numpy()


def _median(x: npt.NDArray[np.float64]) -> float | None:
    return float(np.median(x)) if len(x) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _upper95(flagged: int, n: int) -> float | None:
    if n == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(flagged, n).proportion_ci(0.95, method="exact").high)


def _halves(
    labels: npt.NDArray[np.int64], classes: Sequence[str], cfg: AuditConfig
) -> dict[str, tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """Per class the held-out indices for calibration and for the check, a seeded shuffle."""
    out = {}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        rng = np.random.default_rng([cfg.seed, c])
        idx = rng.permutation(idx)
        n_cal = min(len(idx), max(1, math.ceil(cfg.calibration_share * len(idx))))
        out[name] = (idx[:n_cal], idx[n_cal:])
    return out


Measured = dict[Space, Nearest]


def _measure(
    images: torch.Tensor,
    spaces: Sequence[Space],
    flips: bool,
    train: torch.Tensor,
    train_emb: torch.Tensor | None,
    encoder: ImageEncoder | None,
    cache: EmbeddingCache | None,
) -> Measured:
    views = flip_views(images, flips)
    out: Measured = {}
    for space in spaces:
        if space == "pixel":
            out[space] = _nearest(pixel_distances(views, train))
        else:
            assert encoder is not None and train_emb is not None
            out[space] = _nearest(clip_distances(encoder, views, train_emb, cache))
    return out


def audit_images(
    images: torch.Tensor,
    image_classes: Sequence[str],
    split: DatasetSplit,
    encoder: ImageEncoder | None,
    cfg: AuditConfig | None = None,
    *,
    flips: bool = True,
    cache: EmbeddingCache | None = None,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> AuditReport:
    """Audit uint8 (N, 3, S, S) ``images`` of the named classes against ``split`` (the model's
    training split with its held-out part, at the model's image size S). ``flips``: whether
    the model was trained with random flips (``cfg.flips`` overrides). ``encoder`` may be None
    only when ``cfg.spaces`` leaves out ``clip``."""
    t0 = time.perf_counter()
    cfg = cfg or AuditConfig()
    flips = cfg.flips if cfg.flips is not None else flips
    spaces: list[Space] = list(dict.fromkeys(cfg.spaces))
    classes = list(split.classes)
    unknown = sorted(set(image_classes) - set(classes))
    if unknown:
        raise Invalid(f"images of {', '.join(unknown)}: the training split has {classes}")
    if len(image_classes) != len(images):
        raise ValueError(f"{len(images)} images but {len(image_classes)} class names")
    size = split.train.images.shape[-1]
    if len(images) and tuple(images.shape[1:]) != (3, size, size):
        raise Invalid(
            f"images are {tuple(images.shape[1:])}, the training split ({size}x{size}) is at "
            "the model's image size: audit images the model generated"
        )
    if "clip" in spaces and encoder is None:
        raise Invalid("the clip space needs an encoder")
    held_labels = split.heldout.labels.numpy()
    counts = split.heldout.per_class_counts() if len(split.heldout) else {}
    empty = [c for c in classes if counts.get(c, 0) < 2]
    if empty:
        raise Invalid(
            f"fewer than 2 held-out real images for {', '.join(empty)}: the audit calibrates on "
            "held-out images (train with n_heldout >= 2; 20 or more per class make the "
            "threshold meaningful)"
        )

    def tick(stage: str, f: float) -> None:
        if progress is not None:
            progress(stage, f)

    train = split.train.images
    train_emb = None
    if "clip" in spaces:
        assert encoder is not None
        train_emb = embed(encoder, train, split.train.hashes, cache)
    tick("embed training images", 0.3)
    held = _measure(split.heldout.images, spaces, flips, train, train_emb, encoder, cache)
    tick("held-out images", 0.6)
    gen = _measure(images, spaces, flips, train, train_emb, encoder, cache)
    tick("generated images", 0.9)

    halves = _halves(held_labels, classes, cfg)
    calibrations: dict[str, Calibration] = {}
    for name, (cal, check) in halves.items():
        n = len(cal)
        rank = min(n, max(1, math.floor(cfg.quantile * (n + 1))))
        thresholds = {s: float(np.sort(held[s][0][cal])[rank - 1]) for s in spaces}
        medians = {s: float(np.median(held[s][0][cal])) for s in spaces}
        check_flags = np.zeros(len(check), dtype=bool)
        for s in spaces:
            check_flags |= held[s][0][check] <= thresholds[s]
        flagged = int(check_flags.sum())
        calibrations[name] = Calibration(
            n_calibration=n,
            n_check=len(check),
            rank=rank,
            thresholds=thresholds,
            heldout_median=medians,
            expected_false_flag_rate=min(1.0, len(spaces) * rank / (n + 1)),
            check_flagged=flagged,
            check_rate=flagged / len(check) if len(check) else None,
            check_upper95=_upper95(flagged, len(check)),
        )

    audits = []
    for i, cls in enumerate(image_classes):
        cal_ = calibrations[cls]
        neighbours: dict[str, Neighbour] = {}
        for s in spaces:
            d, j, f, r = (a[i] for a in gen[s])
            med = cal_.heldout_median[s]
            neighbours[s] = Neighbour(
                distance=float(d),
                train_index=int(j),
                train_path=split.train.paths[int(j)],
                flip=FLIP_NAMES[int(f)],
                nndr=float(r),
                ratio=float(d) / med if med > 0 else None,
            )
        by: list[Space] = [s for s in spaces if gen[s][0][i] <= cal_.thresholds[s]]
        audits.append(
            ImageAudit(
                index=i,
                class_name=cls,
                name=names[i] if names is not None else "",
                pixel=neighbours.get("pixel"),
                clip=neighbours.get("clip"),
                flagged=bool(by),
                flagged_by=by,
            )
        )

    per_class = []
    for name in classes:
        mine = [a for a in audits if a.class_name == name]
        if not mine:
            continue
        cal_ = calibrations[name]
        n_flagged = sum(a.flagged for a in mine)
        median_dcr = {s: _median(gen[s][0][[a.index for a in mine]]) for s in spaces}
        per_class.append(
            ClassAudit(
                class_name=name,
                n_images=len(mine),
                n_flagged=n_flagged,
                flag_rate=n_flagged / len(mine),
                flagged_by={s: sum(s in a.flagged_by for a in mine) for s in spaces},
                median_dcr=dict(median_dcr),
                dcr_ratio={s: _ratio(median_dcr[s], cal_.heldout_median[s]) for s in spaces},
                calibration=cal_,
            )
        )
    n_flagged = sum(a.flagged for a in audits)
    # the check over the classes audited (all of them for an empty batch)
    audited = [calibrations[c.class_name] for c in per_class] or list(calibrations.values())
    n_check = sum(c.n_check for c in audited)
    check_flagged = sum(c.check_flagged for c in audited)
    totals = AuditTotals(
        n_images=len(audits),
        n_flagged=n_flagged,
        flag_rate=n_flagged / len(audits) if audits else None,
        n_check=n_check,
        check_flagged=check_flagged,
        check_rate=check_flagged / n_check if n_check else None,
        check_upper95=_upper95(check_flagged, n_check),
    )
    tick("done", 1.0)
    return AuditReport(
        config=cfg,
        classes=classes,
        image_size=size,
        flips=list(FLIP_NAMES if flips else FLIP_NAMES[:1]),
        encoder=encoder.identity if encoder is not None and "clip" in spaces else "",
        n_train=split.train.per_class_counts(),
        n_heldout=counts,
        per_class=per_class,
        totals=totals,
        images=audits,
        seconds=round(time.perf_counter() - t0, 2),
    )


def read_batch_folder(folder: Path | str) -> tuple[torch.Tensor, list[str], list[str]]:
    """A folder of generated images with its ``manifest.csv`` (``protomed sample``'s output,
    or an unpacked batch zip: both list ``file`` and ``class``): (images, classes, files)."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if not folder.is_dir():
        raise NotFound(f"no batch folder at {folder}")
    if not manifest.is_file():
        raise NotFound(
            f"{folder} has no manifest.csv: give the folder `protomed sample --out` wrote "
            "(or an unpacked batch zip)"
        )
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "class"} <= set(rows[0]):
        raise Invalid(f"{manifest} lists no images (columns file and class are needed)")
    images, classes, files = [], [], []
    size = None
    for row in rows:
        path = folder / row["file"]
        if not path.is_file():
            raise NotFound(f"{manifest} lists {row['file']}, which is not in {folder}")
        from PIL import Image

        with Image.open(path) as im:
            side = im.size[0]
        size = size or side
        images.append(load_image(path, size))
        classes.append(row["class"])
        files.append(row["file"])
    return torch.stack(images), classes, files


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def audit_table(report: AuditReport) -> str:
    """The per-class summary as text (the CLI's output)."""
    spaces = list(report.config.spaces)
    head = f"{'class':<14}{'images':>7}{'flagged':>9}{'rate':>7}"
    head += "".join(f"{'DCR ratio ' + s:>17}" for s in spaces)
    head += f"{'calib n':>9}{'expected':>10}{'check':>9}{'check rate':>12}"
    lines = [head]
    for c in report.per_class:
        cal = c.calibration
        line = f"{c.class_name:<14}{c.n_images:>7}{c.n_flagged:>9}{_f(c.flag_rate, '.1%'):>7}"
        line += "".join(f"{_f(c.dcr_ratio.get(s), '.3f'):>17}" for s in spaces)
        line += f"{cal.n_calibration:>9}{cal.expected_false_flag_rate:>10.1%}"
        line += f"{f'{cal.check_flagged}/{cal.n_check}':>9}{_f(cal.check_rate, '.1%'):>12}"
        lines.append(line)
    t = report.totals
    lines.append(
        f"flagged {t.n_flagged} of {t.n_images} generated images ({_f(t.flag_rate, '.1%')}); "
        f"fresh real held-out images flagged: {t.check_flagged} of {t.n_check} "
        f"({_f(t.check_rate, '.1%')}, 95% upper bound {_f(t.check_upper95, '.1%')})"
    )
    for a in report.flagged():
        nn = nearest(a)
        dists = ", ".join(
            f"{s} {_f(getattr(a, s).distance, '.4f')}" for s in spaces if getattr(a, s)
        )
        lines.append(
            f"  flagged: {a.name or a.index} ({a.class_name}) by {'+'.join(a.flagged_by)}: "
            f"nearest training image {nn.train_path} (flip {nn.flip}); distances {dists}"
        )
    lines.append(
        "A nearest-neighbour audit finds (near-)copies of training images; it is no formal "
        "privacy guarantee."
    )
    return "\n".join(lines)


def model_split(
    model: LoadedModel, root: str | None = None, roots: Sequence[Path | str] | None = None
) -> DatasetSplit:
    """The training split (with held-out images) a loaded model was trained on, at its size."""
    from ml.evaluation.evaluate import real_split

    return real_split({"model": model}, root, roots)
