"""What the replicated real-data comparison (bench/compare_real.py) may claim rests on these:
intervals over generative seeds (classifier seeds averaged within a run first), paired
differences, three disjoint data parts, and a budget chosen on validation numbers alone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from bench.replication import (
    choose_budget,
    paired_difference,
    run_means,
    seed_interval,
    split_three,
    summarise,
)
from ml.data.images import load_split


def test_seed_interval_is_the_one_sample_t_interval() -> None:
    x = [0.21, 0.25, 0.30]
    ref = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    got = seed_interval(x)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(np.mean(x))
    assert got["sd"] == pytest.approx(np.std(x, ddof=1))
    assert got["ci"] == pytest.approx([ref.low, ref.high])
    # n = 3: t(0.975, 2) = 4.30, so the half-width is 2.5 sd
    assert (got["ci"][1] - got["mean"]) / got["sd"] == pytest.approx(4.3027 / np.sqrt(3), 1e-4)
    assert seed_interval([0.4])["ci"] is None


def test_paired_difference_matches_the_paired_t_test() -> None:
    base = {0: 0.20, 1: 0.30, 2: 0.25}
    proto = {0: 0.23, 1: 0.34, 2: 0.30}
    ref = stats.ttest_rel([proto[s] for s in (0, 1, 2)], [base[s] for s in (0, 1, 2)])
    got = paired_difference(proto, base)
    assert got["differences"] == pytest.approx([0.03, 0.04, 0.05])
    assert got["mean"] == pytest.approx(0.04)
    assert got["ci"] == pytest.approx(list(ref.confidence_interval(0.95)))
    assert got["p_paired_t"] == pytest.approx(ref.pvalue)
    # pairing matters: seeds vary more than the difference, so unpaired is far wider
    unpaired = stats.ttest_ind(list(proto.values()), list(base.values())).confidence_interval()
    assert got["ci"][1] - got["ci"][0] < unpaired.high - unpaired.low
    with pytest.raises(ValueError, match="unpaired"):
        paired_difference(proto, {0: 0.2, 1: 0.2})


def _records() -> list[dict[str, object]]:
    """2 modes x 3 generative seeds x 3 classifier seeds, one budget, validation only."""
    rng = np.random.default_rng(0)
    out = []
    for mode in ("baseline", "prototype"):
        for g in range(3):
            for c in range(3):
                f1 = float(rng.uniform(0.1, 0.4))
                out.append(
                    {
                        "mode": mode,
                        "gseed": g,
                        "budget": 100,
                        "split": "validation",
                        "clf_seed": c,
                        "precision": f1,
                        "recall": f1,
                        "f1": f1,
                    }
                )
    return out


def test_classifier_seeds_are_averaged_within_a_generative_run() -> None:
    records = _records()
    means = run_means(records)
    assert len(means) == 6 and {m["n_classifier_seeds"] for m in means} == {3}
    base = [r for r in records if r["mode"] == "baseline"]
    per_run = [np.mean([r["f1"] for r in base if r["gseed"] == g]) for g in range(3)]
    out = summarise(means, "validation", 100)
    f1 = out["modes"]["baseline"]["f1"]
    ref = stats.ttest_1samp(per_run, 0.0).confidence_interval()
    assert f1["n"] == 3  # the generative seeds, not the 9 classifiers
    assert f1["ci"] == pytest.approx([ref.low, ref.high])
    proto = [r for r in records if r["mode"] == "prototype"]
    proto_run = [np.mean([r["f1"] for r in proto if r["gseed"] == g]) for g in range(3)]
    ref_p = stats.ttest_rel(proto_run, per_run)
    assert out["paired"]["f1"]["p_paired_t"] == pytest.approx(ref_p.pvalue)


def test_budget_follows_validation_even_where_test_ranks_otherwise() -> None:
    """Validation prefers 300 steps, the test part 600: the choice is 300, and changing the
    test numbers cannot change it."""
    val = {300: 0.30, 600: 0.25}
    test = {300: 0.20, 600: 0.35}
    rows = []
    for mode in ("baseline", "prototype"):
        for g in range(3):
            for b in (300, 600):
                rows.append(
                    {
                        "mode": mode,
                        "gseed": g,
                        "budget": b,
                        "split": "validation",
                        "f1": val[b] + 0.01 * g,
                    }
                )
                rows.append({"mode": mode, "gseed": g, "budget": b, "split": "test", "f1": test[b]})
    budget, score = choose_budget(rows)
    assert budget == 300
    assert score == pytest.approx({300: 0.31, 600: 0.26})
    flipped = [{**r, "f1": 1.0} if r["split"] == "test" else r for r in rows]
    assert choose_budget(flipped)[0] == 300
    # ties go to the smaller budget
    tie = [{**r, "f1": 0.3} for r in rows]
    assert choose_budget(tie)[0] == 300


def _dataset(root: Path, per_class: dict[str, int]) -> None:
    """PNG class folders; in class 'a' images come in pairs that share a split group."""
    rows = []
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            px = np.full((8, 8, 3), (i * 7 + (c == "b") * 3) % 256, dtype=np.uint8)
            px[0, 0] = [i, ord(c), 1]
            Image.fromarray(px).save(root / c / f"{c}{i:03d}.png")
            rows.append((f"{c}{i:03d}", f"{c}-lesion{i // 2}" if c == "a" else f"{c}{i}"))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "split_group"])
        w.writerows(rows)


def test_split_three_gives_disjoint_parts_of_the_requested_sizes(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", {"a": 30, "b": 25})
    n_train, n_val, n_test = 12, 6, 7
    counts = split_three(tmp_path / "data", tmp_path / "out", n_test, seed=1)
    # class a: pairs, so a 7th test image splits a pair; its partner is withheld
    assert counts["a"] == {"test": 7, "trainval": 22, "withheld": 1}
    assert counts["b"] == {"test": 7, "trainval": 18, "withheld": 0}
    split = load_split(
        tmp_path / "out" / "trainval", n_per_class=n_train, n_heldout=n_val, image_size=8
    )
    test = load_split(tmp_path / "out" / "test", image_size=8).train
    parts = {"train": split.train, "validation": split.heldout, "test": test}
    names = {k: {Path(p).name for p in v.paths} for k, v in parts.items()}
    assert split.train.per_class_counts() == {"a": n_train, "b": n_train}
    assert split.heldout.per_class_counts() == {"a": n_val, "b": n_val}
    assert test.per_class_counts() == {"a": n_test, "b": n_test}
    assert not names["train"] & names["validation"]
    assert not names["train"] & names["test"]
    assert not names["validation"] & names["test"]
    # no lesion (pair) of class a on two sides
    group = {n: n[:1] + str(int(n[1:4]) // 2) for s in names.values() for n in s if n[0] == "a"}
    sides = {k: {group[n] for n in v if n in group} for k, v in names.items()}
    assert not sides["train"] & sides["validation"]
    assert not (sides["train"] | sides["validation"]) & sides["test"]
    # seeded: the same call gives the same test part; another seed another
    again = split_three(tmp_path / "data", tmp_path / "again", n_test, seed=1)
    assert again == counts
    assert sorted(p.name for p in (tmp_path / "again" / "test" / "b").iterdir()) == sorted(
        p.name for p in (tmp_path / "out" / "test" / "b").iterdir()
    )
    with pytest.raises(ValueError, match="leave none"):
        split_three(tmp_path / "data", tmp_path / "none", 25)
