"""What a classifier scores on a test set without learning anything: the level every macro F1
must be read against.

Two references, both from the test set's class counts alone:

- **uniform guess**: each image labelled with a class drawn uniformly at random. Its macro F1
  depends on the class mix, and on a few hundred images it scatters by several points, so the
  level is simulated (seeded) and given with its central 95% range: a synthetic-trained
  classifier inside that range has not shown it learnt any class signal.
- **majority class**: every image labelled with the most frequent class (precision of that
  class = its share, recall 1, every other class 0, as sklearn scores it with zero_division=0).

Numpy only: the API and dashboard read these numbers back without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ml.errors import Invalid
from ml.schemas.evaluation import ChanceLevel, ChanceLevels

DRAWS = 2000  # simulated guessers: the 95% range's ends move by < 0.5 points between seeds


def macro_scores(
    truth: npt.NDArray[np.integer[Any]], pred: npt.NDArray[np.integer[Any]], k: int
) -> tuple[float, float, float]:
    """Macro precision, recall, F1 over ``k`` classes (zero_division=0, as sklearn's)."""
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (truth, pred), 1)
    tp = np.diag(conf).astype(float)
    pred_n, true_n = conf.sum(0), conf.sum(1)
    p = np.divide(tp, pred_n, out=np.zeros(k), where=pred_n > 0)
    r = np.divide(tp, true_n, out=np.zeros(k), where=true_n > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros(k), where=(p + r) > 0)
    return float(p.mean()), float(r.mean()), float(f.mean())


def chance_levels(support: Sequence[int], draws: int = DRAWS, seed: int = 0) -> ChanceLevels:
    """Uniform-guess (simulated: mean and central 95% range of macro F1) and majority-class
    levels for a test set with ``support[i]`` images of class i."""
    counts = np.asarray(support, dtype=np.int64)
    k, n = len(counts), int(counts.sum())
    if k < 2 or n == 0:
        raise Invalid(f"chance levels need >= 2 classes and >= 1 test image (got {list(support)})")
    truth = np.repeat(np.arange(k), counts)
    rng = np.random.default_rng(seed)
    sims = np.array([macro_scores(truth, rng.integers(0, k, n), k) for _ in range(draws)])
    lo, hi = np.quantile(sims[:, 2], [0.025, 0.975])
    uniform = ChanceLevel(
        precision=float(sims[:, 0].mean()),
        recall=float(sims[:, 1].mean()),
        f1=float(sims[:, 2].mean()),
        f1_low=float(lo),
        f1_high=float(hi),
    )
    majority = macro_scores(truth, np.full(n, int(counts.argmax())), k)
    return ChanceLevels(
        uniform=uniform,
        majority=ChanceLevel(precision=majority[0], recall=majority[1], f1=majority[2]),
        draws=draws,
    )
