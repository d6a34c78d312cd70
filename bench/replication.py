"""Replicated generative runs: the pieces of ``bench/compare_real.py`` that decide what its
numbers may claim, kept apart so tests can check them against scipy.

- :func:`split_three`: three disjoint parts per class (train for the codebook and the diffusion
  models, validation for choosing the budget, test for reporting), built as two folders so the
  test images are files the models' data selection cannot reach.
- :func:`run_means`: classifier seeds are nested inside each generative run, so they are
  averaged within the run first; the generative run (training and sampling seed) is the unit.
- :func:`seed_interval`, :func:`paired_difference`: mean, sd and a t-interval over generative
  seeds; seed ``s`` of one mode against seed ``s`` of the other (same split, codebook and
  classifier seeds), as paired differences.
- :func:`choose_budget`: one training budget per dataset from validation numbers only.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ml.data.catalog import scan

SCORES = ("precision", "recall", "f1")


# ---------------------------------------------------------------- the split


def _class_order(seed: int, name: str, n: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """A permutation per class, stable across processes (hash() is salted per process)."""
    offset = int.from_bytes(hashlib.sha256(f"split_three:{name}".encode()).digest()[:4], "big")
    return np.random.default_rng(seed + offset).permutation(n)


def split_three(
    root: Path | str, out: Path | str, n_test: int, seed: int = 0
) -> dict[str, dict[str, int]]:
    """Copy ``n_test`` images per class into ``out/test`` and every other image into
    ``out/trainval`` (class folders, plus a ``manifest.csv`` of split groups so lesions stay on
    one side of the later train / validation split as well).

    Whole split groups (e.g. HAM10000 lesions) are drawn in a seeded order per class until the
    test part holds ``n_test`` images; the rest of a group that overflows it is left out of both
    folders, so no group spans test and trainval. The train and validation parts are then drawn
    from ``trainval`` by the codebook's own selection (``n_per_class`` train, ``n_heldout``
    validation), which keeps those two disjoint; so all three are. Returns images per class in
    each folder and the number withheld.
    """
    cat = scan(Path(root))
    out = Path(out)
    for part in ("trainval", "test"):
        if (out / part).exists():
            shutil.rmtree(out / part)
    counts: dict[str, dict[str, int]] = {}
    rows: dict[str, list[tuple[str, str]]] = {"trainval": [], "test": []}
    for name in cat.classes:
        by_group: dict[str, list[Path]] = defaultdict(list)
        for p in cat.items[name]:
            by_group[cat.groups[p]].append(p)
        groups = list(by_group.items())
        if sum(len(ps) for _, ps in groups) <= n_test:
            raise ValueError(
                f"class {name!r} has {len(cat.items[name])} images; {n_test} test "
                "images leave none for training"
            )
        test: list[tuple[str, Path]] = []
        rest: list[tuple[str, Path]] = []
        withheld = 0
        for i in _class_order(seed, name, len(groups)):
            group, paths = groups[i]
            room = n_test - len(test)
            if room > 0:
                test += [(group, p) for p in paths[:room]]
                withheld += max(0, len(paths) - room)
            else:
                rest += [(group, p) for p in paths]
        for part, chosen in (("test", test), ("trainval", rest)):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for group, p in chosen:
                shutil.copy2(p, folder / p.name)
                rows[part].append((p.stem, group))
        counts[name] = {"test": len(test), "trainval": len(rest), "withheld": withheld}
    for part, entries in rows.items():
        with open(out / part / "manifest.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", "split_group"])
            writer.writerows(entries)
    return counts


# ---------------------------------------------------------------- aggregation


def run_means(
    records: Iterable[Mapping[str, Any]], keys: Sequence[str] = ("mode", "gseed", "budget", "split")
) -> list[dict[str, Any]]:
    """Average the classifier seeds within each generative run (``keys`` name the run and the
    part it was tested on): classifier seeds share one synthetic set, so they are not
    independent replicates of the generative model and must not enter its n."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n_classifier_seeds"] = len(rs)
        for score in SCORES:
            row[score] = float(np.mean([r[score] for r in rs]))
        out.append(row)
    return out


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd (ddof=1) and the two-sided Student-t interval for the mean over ``n``
    generative seeds (df = n - 1); no interval for a single seed."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("seed_interval needs at least one value")
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci": None, "confidence": confidence}
    sd = float(x.std(ddof=1))
    sem = sd / np.sqrt(n)
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
    return {"n": n, "mean": mean, "sd": sd, "ci": [float(lo), float(hi)], "confidence": confidence}


def paired_difference(
    a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = 0.95
) -> dict[str, Any]:
    """``a[s] - b[s]`` over the seeds both have: their mean, sd, t-interval and the paired
    t-test's two-sided p (None where every difference is equal, e.g. n = 1)."""
    seeds = sorted(set(a) & set(b))
    if set(a) != set(b):
        raise ValueError(f"unpaired seeds: {sorted(set(a) ^ set(b))}")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    out = seed_interval(diffs, confidence)
    p = None
    if len(diffs) > 1 and np.std(diffs) > 0:
        p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return {**out, "seeds": seeds, "differences": diffs, "p_paired_t": p}


# ---------------------------------------------------------------- budget


def choose_budget(
    means: Iterable[Mapping[str, Any]], modes: Sequence[str] = ("baseline", "prototype")
) -> tuple[int, dict[int, float]]:
    """The one budget used for both modes: the highest validation F1 averaged over both modes'
    generative runs (the smaller budget on a tie). Rows of any other split are ignored, so the
    test part cannot move the choice. Returns (budget, validation F1 per budget)."""
    per_budget: dict[int, list[float]] = defaultdict(list)
    for row in means:
        if row["split"] == "validation" and row["mode"] in modes:
            per_budget[int(row["budget"])].append(float(row["f1"]))
    if not per_budget:
        raise ValueError("no validation rows to choose a budget from")
    score = {b: float(np.mean(v)) for b, v in sorted(per_budget.items())}
    best = max(score.values())
    return min(b for b, v in score.items() if v == best), score


def summarise(
    means: Sequence[Mapping[str, Any]],
    split: str,
    budget: int,
    modes: Sequence[str] = ("baseline", "prototype"),
) -> dict[str, Any]:
    """Per mode the interval over generative seeds of each score, and the paired difference
    (``modes[1]`` minus ``modes[0]``) at one budget on one split."""
    rows = [r for r in means if r["split"] == split and int(r["budget"]) == budget]
    per_mode = {m: {r["gseed"]: r for r in rows if r["mode"] == m} for m in modes}
    out: dict[str, Any] = {"split": split, "budget": budget, "modes": {}, "paired": {}}
    for m in modes:
        out["modes"][m] = {s: seed_interval([r[s] for r in per_mode[m].values()]) for s in SCORES}
    a, b = per_mode[modes[1]], per_mode[modes[0]]
    for s in SCORES:
        out["paired"][s] = paired_difference(
            {g: r[s] for g, r in a.items()}, {g: r[s] for g, r in b.items()}
        )
    return out
