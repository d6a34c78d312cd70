"""Statistics of the plausibility report, pure and small: proportions and their differences
(Wilson, Newcombe, Fisher), Holm's multiple-comparison adjustment, the Cochran-Mantel-Haenszel
test with the Mantel-Haenszel common odds ratio, and Cohen's and Fleiss' kappa.

Each function takes counts, so each is checked against published or hand-worked values
(tests/test_reports.py). scipy is imported inside the functions that need it: importing
``scipy.stats`` takes about half a second, too slow for the API's start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

# Wilson and Newcombe live in ml.evaluation.intervals (torch-free), shared with the demo's checker
# rates.
from ml.evaluation.intervals import CONFIDENCE as CONFIDENCE
from ml.evaluation.intervals import check_counts as _check_counts
from ml.evaluation.intervals import newcombe_difference as newcombe_difference
from ml.evaluation.intervals import wilson as wilson

# --- proportions ---------------------------------------------------------------------------------


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p for k1/n1 vs k2/n2: exact, as counts per class are small."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    from scipy.stats import fisher_exact  # slow import, kept out of the module's import

    _, p = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided")
    return min(1.0, float(p))


# --- several tests ------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Scand J Stat 1979), in the input's order.

    The i-th smallest of k p-values is multiplied by k - i + 1, the results are made
    non-decreasing in that order and capped at 1. It controls the family-wise error rate for any
    dependence between the tests and is uniformly more powerful than Bonferroni. scipy offers
    only false-discovery-rate control (``false_discovery_control``) and statsmodels, which has
    it, is not a dependency; the computation is these few lines.
    """
    if any(not 0.0 <= p <= 1.0 for p in p_values):
        raise ValueError(f"p-values must lie in [0, 1], got {list(p_values)}")
    k = len(p_values)
    adjusted = [0.0] * k
    running = 0.0
    for rank, i in enumerate(sorted(range(k), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


class MantelHaenszel(NamedTuple):
    statistic: float  # continuity-corrected CMH chi-square, 1 degree of freedom
    p_value: float
    odds_ratio: float | None  # Mantel-Haenszel common odds ratio; None if infinite or 0/0
    odds_ratio_ci: tuple[float, float] | None  # Robins-Breslow-Greenland; None if OR is 0 or inf


def mantel_haenszel(
    tables: Sequence[tuple[tuple[int, int], tuple[int, int]]], confidence: float = CONFIDENCE
) -> MantelHaenszel | None:
    """Cochran-Mantel-Haenszel test of conditional independence in 2x2xK tables, with the
    Mantel-Haenszel common odds ratio and its Robins-Breslow-Greenland interval, as R's
    ``mantelhaen.test`` (``correct=TRUE``) computes them.

    Each table is ``((a, b), (c, d))``: rows are the two groups, columns success and failure;
    the odds ratio is group 1's odds over group 2's. Strata with fewer than 2 observations carry
    no information and are skipped (R refuses them). None when no stratum has both groups and
    both outcomes (the statistic's variance is 0). scipy has no CMH (``scipy.stats.contingency``
    covers two-way tables only).
    """
    strata = [((a, b), (c, d)) for (a, b), (c, d) in tables if a + b + c + d >= 2]
    for (a, b), (c, d) in strata:
        if min(a, b, c, d) < 0:
            raise ValueError(f"counts must be non-negative, got {((a, b), (c, d))}")
    delta = variance = 0.0
    r_sum = s_sum = pr = ps_qr = qs = 0.0
    for (a, b), (c, d) in strata:
        n = a + b + c + d
        delta += a - (a + b) * (a + c) / n
        variance += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
        r, s, p, q = a * d / n, b * c / n, (a + d) / n, (b + c) / n
        r_sum, s_sum = r_sum + r, s_sum + s
        pr, ps_qr, qs = pr + p * r, ps_qr + p * s + q * r, qs + q * s
    if variance <= 0.0:
        return None
    from scipy.stats import chi2, norm  # slow import, kept out of the module's import

    yates = 0.5 if abs(delta) >= 0.5 else 0.0
    statistic = (abs(delta) - yates) ** 2 / variance
    odds_ratio = r_sum / s_sum if s_sum > 0 else None
    ci = None
    if r_sum > 0 and s_sum > 0:
        se = math.sqrt(pr / (2 * r_sum**2) + ps_qr / (2 * r_sum * s_sum) + qs / (2 * s_sum**2))
        z = float(norm.ppf((1 + confidence) / 2))
        log_or = math.log(r_sum / s_sum)
        ci = (math.exp(log_or - z * se), math.exp(log_or + z * se))
    return MantelHaenszel(statistic, float(chi2.sf(statistic, 1)), odds_ratio, ci)


# --- agreement -----------------------------------------------------------------------------------


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa for two raters' binary verdicts on the same items.

    Degenerate case: when both raters give one and the same verdict to every item, chance
    agreement is 1 and kappa is 0/0; we return 1.0 (they agree perfectly) rather than NaN, which
    would not survive JSON. (sklearn returns NaN there.) This is the only case with chance
    agreement 1, so every other input has the usual value.
    """
    if len(a) != len(b):
        raise ValueError(f"raters rated different numbers of items: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("no items")
    observed = sum(bool(x) == bool(y) for x, y in zip(a, b, strict=True)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    if chance >= 1.0:
        return 1.0
    return (observed - chance) / (1 - chance)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa (1971) from an items x categories table of rating counts.

    Every item must have the same number (>= 2) of ratings, as the statistic assumes; raters may
    differ between items. Degenerate case as in :func:`cohen_kappa`: all ratings in one category
    gives 1.0.
    """
    rows = [list(r) for r in counts]
    if not rows:
        raise ValueError("no items")
    k = len(rows[0])
    if k < 1 or any(len(r) != k for r in rows):
        raise ValueError("every item needs the same, non-zero, number of categories")
    if any(c < 0 for r in rows for c in r):
        raise ValueError("counts must be non-negative")
    m = sum(rows[0])
    if m < 2 or any(sum(r) != m for r in rows):
        raise ValueError("every item needs the same number (>= 2) of ratings")
    n_items = len(rows)
    observed = sum((sum(c * c for c in r) - m) / (m * (m - 1)) for r in rows) / n_items
    shares = [sum(r[j] for r in rows) / (n_items * m) for j in range(k)]
    chance = sum(p * p for p in shares)
    if chance >= 1.0:
        return 1.0
    return (observed - chance) / (1 - chance)
