"""Confidence intervals for proportions and their differences, torch-free.

Shared by the service's review reports (:mod:`service.statistics` re-exports them) and the demo's
checker-rate comparison (:mod:`ml.demo`), so both state intervals the same way.
"""

from __future__ import annotations

import math

CONFIDENCE = 0.95  # two-sided level of every interval


def check_counts(k: int, n: int) -> None:
    """Refuse impossible counts (k successes out of n trials)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (scipy's ``binomtest``).

    Chosen over the Wald interval because review counts per class are small and rates often sit
    at 0 or 1, where Wald collapses to a point. With n = 0 nothing is known: (0.0, 1.0).
    """
    check_counts(k, n)
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest  # slow import, kept out of the module's import

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def newcombe_difference(
    k1: int, n1: int, k2: int, n2: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Interval for p2 - p1 by Newcombe's hybrid score method (method 10, Stat Med 1998).

    Built from the two Wilson intervals, so it keeps their good coverage for small n and never
    leaves [-1, 1]. Side 2 is the prototype model, so a positive difference favours it. With
    n = 0 on either side the difference is unknown: (-1.0, 1.0), as :func:`wilson` gives (0, 1).
    """
    check_counts(k1, n1)
    check_counts(k2, n2)
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, confidence)
    l2, u2 = wilson(k2, n2, confidence)
    d = p2 - p1
    lower = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    upper = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return max(-1.0, lower), min(1.0, upper)
