"""Statistics of the expert study: can readers tell real images from synthetic ones, and do they
agree? Pure functions over counts and short sequences, torch-free and web-free like
:mod:`service.statistics`; the return types are pydantic models so a report can embed them.

- :func:`exact_interval`: Clopper-Pearson interval of a proportion.
- :func:`discrimination`: accuracy, sensitivity and specificity of "real or synthetic?" answers.
- :func:`equivalence_to_chance`: exact TOST of "readers do no better than a coin".
- :func:`krippendorff_alpha_nominal` and :func:`agreement`: agreement between several readers.
- :func:`auc` and :func:`roc_points`: how well a score (a reader's confidence rating, or a single
  image feature such as the PNG's byte size) separates synthetic from real images.

Convention throughout: **positive = synthetic**. Sensitivity is the share of synthetic images
called synthetic, specificity the share of real images called real, and a higher score or
confidence rating means "more likely synthetic".

Each function is checked against an independent reference (R output, published worked examples,
scikit-learn, or the definition computed directly from scipy's distributions) in
tests/test_study_statistics.py. scipy is imported inside the functions that need it: importing
``scipy.stats`` takes about half a second, too slow for the API's start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ml.evaluation.intervals import CONFIDENCE as CONFIDENCE
from ml.evaluation.intervals import check_counts as _check_counts
from service.statistics import fleiss_kappa

# The report's (lower, upper) pair, written out rather than imported: the plausibility report's
# schema (service.report_schemas) embeds this module's models, so it imports this module.
Interval = tuple[float, float]

# Readers whose accuracy lies within 0.5 +- 0.10 (40 % to 60 %) are taken to be guessing: at 60 %
# a reader is wrong on two images in five, barely better than a coin. A narrower margin needs far
# more reads for the same power (n grows as 1/margin^2): with readers truly at 50 %, the exact
# TOST at alpha = 0.05 reaches 80 % power from about 230 reads with 0.10 (the normal
# approximation (1.645 + 1.282)^2 * 0.25 / 0.10^2 gives 214; the exact power saw-tooths), and
# needs four times as many with 0.05, more than a study with a handful of readers collects.
DEFAULT_MARGIN = 0.10


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- proportions ---------------------------------------------------------------------------------


def exact_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Clopper-Pearson ("exact") interval for k successes in n trials, as R's ``binom.test``.

    Exact rather than Wilson (which the plausibility report uses) because the study's counts per
    reader are small and its claims are about chance: Clopper-Pearson never covers less than its
    nominal level, so a reader's accuracy interval that excludes 0.5 is not an artefact of an
    approximation, and it is the inversion of the exact binomial tests that
    :func:`equivalence_to_chance` uses. With n = 0 nothing is known: (0.0, 1.0).
    """
    _check_counts(k, n)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest  # slow import, kept out of the module's import

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


class Proportion(_Model):
    """k of n, with its rate and exact (Clopper-Pearson) interval."""

    k: int
    n: int
    rate: float = Field(description="k / n")
    ci: Interval = Field(description="Clopper-Pearson interval of the rate")


def _proportion(k: int, n: int, confidence: float) -> Proportion | None:
    if n == 0:
        return None
    return Proportion(k=k, n=n, rate=k / n, ci=exact_interval(k, n, confidence))


# --- real or synthetic? --------------------------------------------------------------------------


class Discrimination(_Model):
    """How well answers to "real or synthetic?" match the truth; positive = synthetic."""

    n: int = Field(description="answers scored")
    synthetic: int = Field(description="answers on synthetic images")
    real: int = Field(description="answers on real images")
    accuracy: Proportion | None = Field(description="answers that were right; null without any")
    sensitivity: Proportion | None = Field(
        description="synthetic images called synthetic; null without synthetic images"
    )
    specificity: Proportion | None = Field(
        description="real images called real; null without real images"
    )


def discrimination(
    answers: Sequence[tuple[bool, bool]], confidence: float = CONFIDENCE
) -> Discrimination:
    """Score ``(is_synthetic, answered_synthetic)`` pairs, one per answer.

    Accuracy alone hides a bias: a reader who calls everything synthetic scores the synthetic
    share of the study. Sensitivity and specificity show it (1.0 and 0.0). Intervals are exact
    (:func:`exact_interval`): one reader's answers, or one class's, are few.
    """
    tp = fn = tn = fp = 0
    for is_synthetic, answered_synthetic in answers:
        if is_synthetic:
            tp, fn = (tp + 1, fn) if answered_synthetic else (tp, fn + 1)
        else:
            tn, fp = (tn + 1, fp) if not answered_synthetic else (tn, fp + 1)
    n = tp + fn + tn + fp
    return Discrimination(
        n=n,
        synthetic=tp + fn,
        real=tn + fp,
        accuracy=_proportion(tp + tn, n, confidence),
        sensitivity=_proportion(tp, tp + fn, confidence),
        specificity=_proportion(tn, tn + fp, confidence),
    )


class Equivalence(_Model):
    """Exact two one-sided tests (TOST) of a proportion's equivalence to 0.5."""

    k: int
    n: int
    margin: float = Field(description="equivalence bounds are 0.5 - margin and 0.5 + margin")
    alpha: float = Field(description="level of each one-sided test")
    bounds: Interval
    p_lower: float = Field(description="exact p of H01: p <= 0.5 - margin (rejected when small)")
    p_upper: float = Field(description="exact p of H02: p >= 0.5 + margin (rejected when small)")
    p_value: float = Field(description="TOST p: the larger of p_lower and p_upper")
    equivalent: bool = Field(description="p_value < alpha: both non-equivalence hypotheses fall")
    ci: Interval = Field(description="Clopper-Pearson interval at level 1 - 2 alpha")
    ci_inside: bool = Field(description="the interval lies strictly inside the bounds")


def equivalence_to_chance(
    k: int, n: int, margin: float = DEFAULT_MARGIN, alpha: float = 0.05
) -> Equivalence:
    """Are k correct answers of n equivalent to guessing? Exact TOST against 0.5 +- margin.

    A non-significant test of "better than chance" is no evidence of guessing: 6 correct of 10
    has p = 0.75 against 0.5, yet its exact 95 % interval (0.26, 0.88) holds readers at 80 %.
    Equivalence has to be shown: reject H01 (p <= 0.5 - margin) with the exact one-sided test
    P(X >= k | 0.5 - margin) and H02 (p >= 0.5 + margin) with P(X <= k | 0.5 + margin); the TOST
    p is the larger of the two and equivalence is claimed when it is below alpha. Small n can
    never reach it (6 of 10 gives p = 0.62), which is the point.

    The interval view: equivalence at level alpha holds exactly when the Clopper-Pearson
    interval at level 1 - 2 alpha lies strictly inside the bounds, because its limits are by
    definition the parameters at which these same one-sided exact tests have p = alpha (and
    P(X >= k | p) rises, P(X <= k | p) falls, with p). So ``ci_inside`` and ``equivalent``
    agree, except where a p-value equals alpha to within the root finder's tolerance (about
    1e-12 in scipy), a tie no real count produces; the tests check the agreement over every k
    for several n. They agree only for the *exact* interval: a Wilson or Wald interval inverts a
    different (approximate) test.
    """
    _check_counts(k, n)
    if not 0.0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5), got {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    low, high = 0.5 - margin, 0.5 + margin
    if n == 0:
        p_lower = p_upper = 1.0
    else:
        from scipy.stats import binom  # slow import, kept out of the module's import

        p_lower = float(binom.sf(k - 1, n, low))  # P(X >= k | p = 0.5 - margin)
        p_upper = float(binom.cdf(k, n, high))  # P(X <= k | p = 0.5 + margin)
    p_value = min(1.0, max(p_lower, p_upper))
    ci = exact_interval(k, n, 1.0 - 2.0 * alpha)
    return Equivalence(
        k=k,
        n=n,
        margin=margin,
        alpha=alpha,
        bounds=(low, high),
        p_lower=min(1.0, p_lower),
        p_upper=min(1.0, p_upper),
        p_value=p_value,
        equivalent=p_value < alpha,
        ci=ci,
        ci_inside=low < ci[0] and ci[1] < high,
    )


# --- agreement between readers -------------------------------------------------------------------


def _alpha_from_units(units: Sequence[Sequence[Hashable]]) -> float:
    """Nominal alpha from each unit's values (who gave them does not matter for nominal data).

    Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: every unit with
    m_u >= 2 values adds each ordered pair of its values with weight 1 / (m_u - 1) to the
    coincidence matrix o_ck; n_c are its margins and n = sum n_c the pairable values. For nominal
    values, observed disagreement D_o = 1 - sum_c o_cc / n, expected disagreement
    D_e = 1 - sum_c n_c (n_c - 1) / (n (n - 1)), and alpha = 1 - D_o / D_e.
    """
    matched = 0.0  # sum_c o_cc: coincidences of a value with itself
    margins: Counter[Hashable] = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        matched += sum(c * (c - 1) for c in counts.values()) / (m - 1)
        margins.update(counts)
    n = sum(margins.values())
    if n < 2:
        raise ValueError("no unit has two or more values: alpha needs pairable values")
    observed = 1.0 - matched / n
    expected = 1.0 - sum(c * (c - 1) for c in margins.values()) / (n * (n - 1))
    if expected <= 0.0:
        return 1.0
    return 1.0 - observed / expected


def krippendorff_alpha_nominal(reliability_data: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha for nominal values; rows are readers, columns units, None missing.

    Used beside Fleiss' kappa because it takes missing reads and units read by different numbers
    of readers as they come, which a study whose readers do not finish every image produces.
    Units with fewer than two values are not pairable and drop out, as in Krippendorff's
    definition. Degenerate case as in :func:`service.statistics.cohen_kappa`: when every
    pairable value is the same, expected disagreement is 0 and alpha 0/0; we return 1.0 rather
    than NaN, which would not survive JSON. (Krippendorff calls alpha undefined there: such data
    cannot show reliability. Read it with the number of values.)

    Implemented here via the coincidence matrix (a few lines) rather than with the ``krippendorff``
    package from PyPI: that is GPL-3.0, and protomed is Apache-2.0.
    """
    rows = [list(r) for r in reliability_data]
    if not rows:
        raise ValueError("no readers")
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("every reader needs a (possibly None) value for every unit")
    units = [[r[u] for r in rows if r[u] is not None] for u in range(width)]
    return _alpha_from_units(units)


class Agreement(_Model):
    """Agreement between readers over the units (images) that at least two of them read."""

    kappa: float | None = Field(
        description="Fleiss' kappa over the units with the most common number of reads; null "
        "without units read at least twice"
    )
    kappa_units: int = Field(description="units in kappa")
    reads_per_unit: int = Field(description="reads of each unit in kappa (0 without any)")
    alpha: float | None = Field(
        description="Krippendorff's nominal alpha over every unit read at least twice; null "
        "without such units"
    )
    alpha_units: int = Field(description="units in alpha")
    alpha_reads: int = Field(description="reads in alpha")


def agreement(reads_by_unit: Mapping[Hashable, Sequence[Hashable]]) -> Agreement:
    """Fleiss' kappa and Krippendorff's alpha from each unit's labels (one label per read).

    Fleiss' kappa assumes the same number of reads per unit. When the counts differ (a reader
    skipped images, or some images went to more readers), kappa is computed over the units with
    the modal number of reads (the larger count on a tie), and ``kappa_units`` says how many
    those are; alpha, which needs no such assumption, uses every unit read at least twice. When
    all units have the same count the two cover the same reads, and alpha differs from kappa
    only by its small-sample correction of the expected agreement. Units read once carry no
    agreement and are left out of both.
    """
    units = [list(labels) for labels in reads_by_unit.values() if len(labels) >= 2]
    if not units:
        return Agreement(
            kappa=None, kappa_units=0, reads_per_unit=0, alpha=None, alpha_units=0, alpha_reads=0
        )
    sizes = Counter(len(u) for u in units)
    modal = max(sizes, key=lambda m: (sizes[m], m))
    same = [u for u in units if len(u) == modal]
    categories = sorted({label for u in same for label in u}, key=repr)
    table = [[Counter(u)[c] for c in categories] for u in same]
    return Agreement(
        kappa=fleiss_kappa(table),
        kappa_units=len(same),
        reads_per_unit=modal,
        alpha=_alpha_from_units(units),
        alpha_units=len(units),
        alpha_reads=sum(len(u) for u in units),
    )


# --- scores: AUC and ROC -------------------------------------------------------------------------


def auc(scores_positive: Sequence[float], scores_negative: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive (synthetic) image scores
    higher than a random negative (real) one, ties counting half.

    It is the Mann-Whitney U of the positives over n_pos * n_neg, so it needs no threshold and
    suits both a single image feature (does the PNG's byte size give the synthetic review copies
    away?) and readers' ordinal confidence ratings, where ties are many. 0.5 is no separation;
    below 0.5 the score points the other way.
    """
    if not scores_positive or not scores_negative:
        raise ValueError("AUC needs at least one positive and one negative score")
    from scipy.stats import mannwhitneyu  # slow import, kept out of the module's import

    # The statistic is U of the first sample; the p-value's method does not change it.
    result = mannwhitneyu(scores_positive, scores_negative, method="asymptotic")
    return float(result.statistic) / (len(scores_positive) * len(scores_negative))


def roc_points(truth: Sequence[bool], confidence: Sequence[float]) -> list[tuple[float, float]]:
    """ROC curve of ordinal confidence ratings (e.g. 1 = surely real ... 5 = surely synthetic).

    ``truth`` is True for synthetic images. One point (false positive rate, true positive rate)
    per threshold: calling "synthetic" every rating >= t, for t at each distinct rating from the
    highest down, after (0, 0) for calling nothing synthetic; the last point is (1, 1). As
    scikit-learn's ``roc_curve(..., drop_intermediate=False)``. The trapezoidal area under these
    points is :func:`auc` of the ratings.
    """
    if len(truth) != len(confidence):
        raise ValueError(f"{len(truth)} truths but {len(confidence)} ratings")
    positives = sum(map(bool, truth))
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("an ROC curve needs both synthetic and real images")
    by_rating: dict[float, list[int]] = {}
    for is_positive, rating in zip(truth, confidence, strict=True):
        pos_neg = by_rating.setdefault(rating, [0, 0])
        pos_neg[0 if is_positive else 1] += 1
    points = [(0.0, 0.0)]
    tp = fp = 0
    for rating in sorted(by_rating, reverse=True):
        tp += by_rating[rating][0]
        fp += by_rating[rating][1]
        points.append((fp / negatives, tp / positives))
    return points
