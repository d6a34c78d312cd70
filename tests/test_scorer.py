"""``ml.scorer``: the plausibility scorer's fit, its cross-validated report and its file.

Separable verdicts give an AUC near 1; verdicts that are coin flips give one near 0.5 whose
interval covers 0.5; the calibration bins count every image once (and bin as scikit-learn's
``calibration_curve`` does); too few images, or one verdict only, are refused with the reason;
the weights survive a safetensors round trip (no pickle); ``keep`` picks the top of a draw."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from ml.scorer import Scorer, ScorerError, assess, delong_auc, fit_scorer, keep

CLASSES = ["basophil", "lymphocyte", "neutrophil"]


def data(n: int, d: int = 16, signal: float = 3.0, seed: int = 0):
    """Embeddings, verdicts and classes; the verdict follows the first dimension (times
    ``signal``; 0: coin flips)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (signal * x[:, 0] + rng.normal(size=n) > 0).astype(int)
    if signal == 0:
        y = rng.integers(0, 2, n)
    return x, y, [CLASSES[i % 3] for i in range(n)]


def test_separable_verdicts_give_an_auc_near_one() -> None:
    x, y, cls = data(150)
    scorer, m = fit_scorer(x, y, cls, "enc")
    assert m.cv.auc is not None and m.cv.auc_ci is not None
    assert m.cv.auc > 0.95 and m.cv.auc_ci[0] > 0.9, m.cv
    assert m.cv.auc_ci[0] <= m.cv.auc <= m.cv.auc_ci[1] <= 1.0
    assert m.cv.brier < m.cv.brier_base  # better than the base rate alone
    assert m.folds == 5 and m.cv.n == 150 and m.cv.n_plausible == int(y.sum())
    assert sum(m.per_class[c][0] for c in CLASSES) == 150
    fresh, fresh_y, fresh_cls = data(100, seed=1)
    p = scorer.score(fresh, fresh_cls)
    assert roc_auc_score(fresh_y, p) > 0.95  # and it generalises to new images


def test_coin_flip_verdicts_give_an_auc_whose_interval_covers_one_half() -> None:
    x, y, cls = data(200, signal=0.0, seed=3)
    _scorer, m = fit_scorer(x, y, cls, "enc")
    assert m.cv.auc is not None and m.cv.auc_ci is not None
    assert abs(m.cv.auc - 0.5) < 0.12, m.cv.auc
    assert m.cv.auc_ci[0] < 0.5 < m.cv.auc_ci[1], m.cv.auc_ci


def test_calibration_bins_count_every_image_and_bin_as_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(137)
    y = (rng.random(137) < p).astype(int)
    a = assess(y, p)
    assert sum(b.count for b in a.calibration) == 137
    assert len(a.calibration) == 10
    true, pred = calibration_curve(y, p, n_bins=10, strategy="quantile")
    assert np.allclose(true, [b.observed for b in a.calibration])
    assert np.allclose(pred, [b.mean_predicted for b in a.calibration])
    for b in a.calibration:
        assert b.observed_ci[0] <= b.observed <= b.observed_ci[1]
    x, yy, cls = data(60)
    _s, m = fit_scorer(x, yy, cls, "enc")
    assert sum(b.count for b in m.cv.calibration) == 60


def test_delong_auc_matches_scikit_learn_with_ties() -> None:
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.2, 0.6, 0.7])
    auc, se = delong_auc(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p))
    assert 0 < se < 0.5
    with pytest.raises(ValueError, match="both verdicts"):
        delong_auc(np.ones(4), np.arange(4.0))


@pytest.mark.parametrize(
    ("n", "plausible", "message"),
    [
        (12, 6, "12 reviewed images; a scorer needs at least 20"),
        (40, 40, "40 plausible and 0 implausible"),
        (40, 2, "at least 3 of each verdict"),
    ],
)
def test_too_few_images_or_one_verdict_are_refused(n: int, plausible: int, message: str) -> None:
    x, _y, cls = data(n)
    y = np.array([1] * plausible + [0] * (n - plausible))
    with pytest.raises(ScorerError, match=message):
        fit_scorer(x, y, cls, "enc")


def test_the_weights_round_trip_through_safetensors_without_pickle() -> None:
    x, y, cls = data(80)
    scorer, _m = fit_scorer(x, y, cls, "ViT-B-32|untrained")
    blob = scorer.to_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])  # a JSON header and raw arrays: nothing to unpickle
    assert set(header) == {"__metadata__", "mean", "scale", "coef", "intercept"}
    assert header["__metadata__"]["encoder"] == "ViT-B-32|untrained"
    again = Scorer.from_bytes(blob)
    assert again.classes == CLASSES and again.c == scorer.c
    assert np.array_equal(again.score(x, cls), scorer.score(x, cls))
    # an unseen class scores as the average class, not an error
    assert np.all(np.isfinite(again.score(x[:2], ["monocyte", "monocyte"])))
    from safetensors.numpy import save

    with pytest.raises(ValueError, match="not a protomed scorer"):
        Scorer.from_bytes(save({"a": np.zeros(2)}))


def test_keep_takes_the_highest_scores_in_draw_order() -> None:
    scores = [0.2, 0.9, 0.5, 0.9, 0.1, 0.7]
    assert keep(scores, 3) == [1, 3, 5]
    assert keep(scores, 2) == [1, 3]  # ties: the earlier draw first
    assert keep(scores, 3, threshold=0.6) == [1, 3, 5]
    assert keep(scores, 3, threshold=0.8) == [1, 3]  # fewer when not enough reach it
    assert keep(scores, 3, threshold=0.95) == []
