"""Chance levels beside every macro F1 (ml.evaluation.chance): what a classifier that learnt nothing
scores on the same test set."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from ml.evaluation.chance import chance_levels, macro_scores
from ml.schemas.evaluation import DownstreamResult, downstream_table, tables_text


def test_macro_scores_equal_sklearn_on_random_labels() -> None:
    rng = np.random.default_rng(3)
    for k in (2, 5, 7):
        truth, pred = rng.integers(0, k, 200), rng.integers(0, k, 200)
        pred[pred == k - 1] = 0  # one class never predicted: zero_division=0 counts as 0
        want = precision_recall_fscore_support(
            truth, pred, labels=list(range(k)), average="macro", zero_division=0
        )[:3]
        assert macro_scores(truth, pred, k) == pytest.approx(want, abs=1e-12)


def test_uniform_guess_level_matches_independent_guessers_and_covers_them() -> None:
    """The simulated level agrees with sklearn scoring of guessers drawn from another seed, and
    about 95% of those guessers fall inside its range (a referee's 'is this above chance?')."""
    support = [60, 25, 10, 5, 20, 8, 7]  # an uneven mix like HAM10000's
    levels = chance_levels(support)
    truth = np.repeat(np.arange(len(support)), support)
    rng = np.random.default_rng(99)
    f1s = [
        precision_recall_fscore_support(
            truth,
            rng.integers(0, 7, len(truth)),
            labels=list(range(7)),
            average="macro",
            zero_division=0,
        )[2]
        for _ in range(400)
    ]
    u = levels.uniform
    assert u.f1 == pytest.approx(np.mean(f1s), abs=0.005)
    assert u.f1_low is not None and u.f1_high is not None and u.f1_low < u.f1 < u.f1_high
    inside = np.mean([u.f1_low <= f <= u.f1_high for f in f1s])
    assert 0.9 <= inside <= 0.99
    assert u.recall == pytest.approx(1 / 7, abs=0.005)  # a uniform guess recalls 1/k of each


def test_majority_class_level_by_hand() -> None:
    levels = chance_levels([30, 10, 10])
    m = levels.majority  # class 0: precision 0.6, recall 1, F1 0.75; the others 0
    assert (m.precision, m.recall, m.f1) == pytest.approx((0.2, 1 / 3, 0.25))
    assert m.f1_low is None


def test_chance_levels_refuse_a_test_set_without_two_classes() -> None:
    with pytest.raises(ValueError, match="2 classes"):
        chance_levels([12])
    with pytest.raises(ValueError, match="test image"):
        chance_levels([0, 0])


def test_tables_5_6_show_the_chance_rows_beside_the_sets() -> None:
    keys = ("precision", "recall", "f1", "accuracy")
    entry = {
        "n_train": 8,
        "runs": [],
        "per_class_f1": {},
        "mean": dict.fromkeys(keys, 0.5),
        "std": dict.fromkeys(keys, 0.01),
    }
    res = {
        "classes": ["a", "b"],
        "n_test": 40,
        "seeds": [0],
        "config": {},
        "sets": {"real": entry},
        "chance": chance_levels([20, 20]).model_dump(),
    }
    table = downstream_table(DownstreamResult.model_validate(res))
    labels = [row[0] for row in table.rows]
    assert labels[0] == "real"
    assert labels[1].startswith("chance: uniform guess (F1 95% range ")
    assert labels[2] == "chance: majority class"
    assert table.rows[2][5] == "33.33"  # majority F1: (2/3 + 0) / 2
    assert "chance: majority class" in tables_text([table])
    # results stored before chance levels existed still load and render, without those rows
    old = DownstreamResult.model_validate({k: v for k, v in res.items() if k != "chance"})
    assert [row[0] for row in downstream_table(old).rows] == ["real"]
