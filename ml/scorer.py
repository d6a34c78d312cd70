"""A plausibility scorer learnt from expert verdicts: a small classifier on image embeddings.

The service's version of a reward model trained on pathologists' verdicts: per review domain,
images that experts judged (label 1: most of an image's reviewers found it plausible) are
embedded with the project's CLIP encoder, and an L2-regularised logistic regression on the
standardised embedding plus the image's expected class (one-hot: an image is plausible *as the
class it should show*, so the same picture can be right for one class and wrong for another)
learns the probability that an expert accepts an image. New images are then scored, and a batch
can keep the ones the scorer rates most plausible.

Why logistic regression: verdicts come by the dozen to the few hundred per domain, embeddings
have 32-1024 dimensions; a linear model on frozen features is what such counts support, its
probabilities are close to calibrated by construction (it minimises log loss), and it is a few
vectors to store. The regularisation strength ``C`` is chosen by an inner cross-validation on
log loss from :data:`C_GRID` (n and d vary by orders of magnitude between domains, so no fixed
``C`` fits all); the reported AUC comes from an outer stratified k-fold whose folds never saw
their test images, the choice of ``C`` included (nested CV), so it is not tuned on itself.

Reported (:class:`~ml.schemas.scorer.ScorerMetrics`): the out-of-fold ROC AUC with DeLong's 95%
interval, the Brier score against the base rate's, and a calibration curve in quantile bins with
counts and Wilson intervals. Weights are stored as safetensors (no pickle), with the classes,
``C`` and the encoder identity in the file's metadata. numpy, scipy and scikit-learn only
(scikit-learn imported where a scorer is fitted): no torch.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.errors import Invalid
from ml.evaluation.intervals import wilson
from ml.schemas.scorer import Assessment, CalibrationBin, ScorerMetrics

MIN_IMAGES = 20  # fewer reviewed images: no scorer (a 5-fold AUC on less says nothing)
MIN_PER_VERDICT = 3  # images of each verdict needed, so every outer fold's training part has 2
MAX_FOLDS = 5
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
DEFAULT_C = 1.0  # when a training fold has too few images of a verdict for an inner CV
FORMAT = "protomed-scorer/1"
Z95 = 1.959963984540054
Floats = npt.NDArray[np.float64]


class ScorerError(Invalid):
    """Verdicts a scorer cannot be fitted on (too few, one class only); the message says why."""


def delong_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[float, float]:
    """ROC AUC of scores ``p`` for labels ``y`` (1 positive) and its standard error by DeLong's
    structural components (midranks, so ties count half), as in Sun & Xu 2014's fast form."""
    from scipy.stats import rankdata

    y, p = np.asarray(y).astype(bool), np.asarray(p, dtype=float)
    pos, neg = p[y], p[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError("an AUC needs both verdicts")
    all_ranks = rankdata(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = rankdata(pos), rankdata(neg)
    v10 = (all_ranks[:m] - pos_ranks) / n  # per positive: share of negatives below it
    v01 = 1.0 - (all_ranks[m:] - neg_ranks) / m  # per negative: share of positives above it
    auc = float(v10.mean())
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    return auc, float(np.sqrt(var))


def calibration_bins(
    y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int | None = None
) -> list[CalibrationBin]:
    """The calibration curve in quantile bins of ``p`` (equal counts where ties allow): the
    binning of scikit-learn's ``calibration_curve(strategy='quantile')``, with counts and a
    Wilson interval per bin. Default bins: one per 10 images, 2 to 10."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if n_bins is None:
        n_bins = int(min(10, max(2, len(p) // 10)))
    edges = np.percentile(p, np.linspace(0, 100, n_bins + 1))
    which = np.searchsorted(edges[1:-1], p)  # calibration_curve's assignment (left side)
    out = []
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count == 0:
            continue
        k = int(y[mask].sum())
        out.append(
            CalibrationBin(
                low=float(edges[b]),
                high=float(edges[b + 1]),
                count=count,
                mean_predicted=float(p[mask].mean()),
                observed=k / count,
                observed_ci=wilson(k, count),
            )
        )
    return out


def assess(y: npt.ArrayLike, p: npt.ArrayLike) -> Assessment:
    """AUC (DeLong interval), Brier score and calibration of probabilities ``p`` for verdicts
    ``y``: the same report for cross-validated and for held-out predictions."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(y) != len(p) or len(y) == 0:
        raise ValueError(f"need one probability per verdict (got {len(p)} for {len(y)})")
    k, n = int(y.sum()), len(y)
    auc = ci = None
    if 0 < k < n:
        auc, se = delong_auc(y, p)
        ci = (max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se))
    base = k / n
    return Assessment(
        n=n,
        n_plausible=k,
        base_rate=base,
        auc=auc,
        auc_ci=ci,
        brier=float(np.mean((p - y) ** 2)),
        brier_base=float(np.mean((base - y) ** 2)),
        calibration=calibration_bins(y, p),
    )


@dataclass
class Scorer:
    """A fitted scorer: standardisation, logistic weights and the classes of the one-hot part.
    Features are ``[embedding, one-hot(class)]``; a class it never saw gets no one-hot (scored
    as the average class)."""

    mean: Floats
    scale: Floats
    coef: Floats
    intercept: float
    classes: list[str]
    c: float
    encoder: str

    @property
    def dim(self) -> int:
        return len(self.mean) - len(self.classes)

    def score(self, x: npt.ArrayLike, class_names: Sequence[str]) -> Floats:
        """Probability that an expert finds each image plausible; ``x`` (n, dim) embeddings."""
        z = (features(x, class_names, self.classes) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def to_bytes(self) -> bytes:
        """safetensors: the four arrays, and the rest as JSON in the header's metadata."""
        from safetensors.numpy import save

        meta = {
            "format": FORMAT,
            "classes": json.dumps(self.classes),
            "c": repr(self.c),
            "encoder": self.encoder,
        }
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": np.array([self.intercept]),
        }
        return save({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> Scorer:
        from safetensors.numpy import load

        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise Invalid(f"not a protomed scorer file (format {meta.get('format')!r})")
        t = load(data)
        return cls(
            mean=t["mean"],
            scale=t["scale"],
            coef=t["coef"],
            intercept=float(t["intercept"][0]),
            classes=json.loads(meta["classes"]),
            c=float(meta["c"]),
            encoder=meta["encoder"],
        )


def features(x: npt.ArrayLike, class_names: Sequence[str], classes: Sequence[str]) -> Floats:
    """``[embedding, one-hot(class)]`` as float64 (n, dim + len(classes))."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(class_names):
        raise ValueError(
            f"need (n, dim) embeddings and n classes (got {x.shape}, {len(class_names)})"
        )
    onehot = np.zeros((len(x), len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for row, name in enumerate(class_names):
        if name in index:
            onehot[row, index[name]] = 1.0
    return np.hstack([x, onehot])


def _check(y: npt.NDArray[np.int_], min_images: int) -> None:
    n, k = len(y), int(y.sum())
    if n < min_images:
        raise ScorerError(f"{n} reviewed images; a scorer needs at least {min_images}")
    if min(k, n - k) < MIN_PER_VERDICT:
        raise ScorerError(
            f"{k} plausible and {n - k} implausible images; a scorer needs at least "
            f"{MIN_PER_VERDICT} of each verdict"
        )


def _fit_one(
    z: Floats, y: npt.NDArray[np.int_], seed: int
) -> tuple[Floats, Floats, Floats, float, float]:
    """(mean, scale, coef, intercept, C) of standardise + logistic regression on ``z``, with C
    chosen by stratified inner CV on log loss (:data:`DEFAULT_C` if a verdict is too rare)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(z)
    zs = scaler.transform(z)
    minority = int(min(y.sum(), len(y) - y.sum()))
    c = DEFAULT_C
    if minority >= 2:
        inner = StratifiedKFold(min(3, minority), shuffle=True, random_state=seed)
        losses = [
            cross_val_score(
                LogisticRegression(C=cand, max_iter=5000), zs, y, cv=inner, scoring="neg_log_loss"
            ).mean()
            for cand in C_GRID
        ]
        c = C_GRID[int(np.argmax(losses))]  # ties: the first, i.e. the strongest penalty
    model = LogisticRegression(C=c, max_iter=5000).fit(zs, y)
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    return mean, scale, np.asarray(model.coef_[0], dtype=np.float64), float(model.intercept_[0]), c


def _strata(y: npt.NDArray[np.int_], class_names: Sequence[str], folds: int) -> npt.NDArray[Any]:
    """What the outer folds stratify on: (class, verdict) where every such pair has an image
    per fold, else the verdict alone. Per-class plausible shares that differ between folds
    bias a pooled out-of-fold AUC below 0.5 (a fold's training part then holds the opposite
    share of its test part: "anti-learning"), so they are kept equal where the counts allow."""
    pairs = np.array([f"{c}|{v}" for c, v in zip(class_names, y, strict=True)])
    _values, counts = np.unique(pairs, return_counts=True)
    return pairs if counts.min() >= folds else y


def fit_scorer(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    class_names: Sequence[str],
    encoder: str,
    *,
    seed: int = 0,
    min_images: int = MIN_IMAGES,
) -> tuple[Scorer, ScorerMetrics]:
    """Fit on embeddings ``x`` (n, d) with verdicts ``y`` (1 plausible) and the images' expected
    classes; returns the scorer (refitted on all images) and its nested-CV report.
    :class:`ScorerError` with too few images or verdicts of one kind only."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(int)
    x = np.asarray(x, dtype=np.float64)
    _check(y, min_images)
    classes = sorted(set(class_names))
    z = features(x, class_names, classes)
    folds = min(MAX_FOLDS, int(min(y.sum(), len(y) - y.sum())))
    oof = np.zeros(len(y))
    strata = _strata(y, class_names, folds)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, strata):
        mean, scale, coef, b, _c = _fit_one(z[train], y[train], seed)
        oof[test] = 1.0 / (1.0 + np.exp(-(((z[test] - mean) / scale) @ coef + b)))
    mean, scale, coef, b, c = _fit_one(z, y, seed)
    scorer = Scorer(mean, scale, coef, b, classes, c, encoder)
    names = np.asarray(class_names)
    per_class = {k: (int((names == k).sum()), int(y[names == k].sum())) for k in classes}
    metrics = ScorerMetrics(
        cv=assess(y, oof),
        folds=folds,
        c=c,
        c_grid=list(C_GRID),
        classes=classes,
        per_class=per_class,
        dim=x.shape[1],
        encoder=encoder,
    )
    return scorer, metrics


def keep(scores: npt.ArrayLike, n: int, threshold: float | None = None) -> list[int]:
    """Which of the drawn images a filtered batch keeps, as draw positions in draw order: the
    ``n`` highest-scored (ties: the earlier draw), or with ``threshold`` those scored at least
    that, the highest first, at most ``n`` (fewer when not enough reach it)."""
    s = np.asarray(scores, dtype=float)
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    if threshold is not None:
        order = [i for i in order if s[i] >= threshold]
    return sorted(order[:n])
