"""service.study_statistics against independent references: R's binom.test and pbinom, published
worked examples (Krippendorff 2011, Wikipedia's Krippendorff's alpha and Fleiss' kappa examples),
scikit-learn's ROC functions, and the definitions written out here with exact fractions or beta
quantiles, never values the functions themselves produced.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from test_reports import FLEISS_1971  # Wikipedia's Fleiss (1971) worked example, counts

from service.study_statistics import (
    DEFAULT_MARGIN,
    Agreement,
    agreement,
    auc,
    discrimination,
    equivalence_to_chance,
    exact_interval,
    krippendorff_alpha_nominal,
    roc_points,
)

TOL = 1e-6

# --- exact interval ------------------------------------------------------------------------------


def test_exact_interval_matches_r_binom_test():
    # R 4.x: binom.test(7, 10)$conf.int  -> 0.3475471 0.9332605
    assert exact_interval(7, 10) == pytest.approx((0.3475471, 0.9332605), abs=1e-7)
    # binom.test(0, 10)$conf.int -> 0.0000000 0.3084971
    assert exact_interval(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-7)
    # binom.test(10, 10)$conf.int -> 0.6915029 1.0000000 (the mirror image of 0 of 10)
    assert exact_interval(10, 10) == pytest.approx((0.6915029, 1.0), abs=1e-7)


def test_exact_interval_is_the_beta_quantile_form():
    # Clopper-Pearson's limits are beta quantiles:
    # Beta(k, n-k+1).ppf(a/2) and Beta(k+1, n-k).ppf(1-a/2).
    from scipy.stats import beta

    for k, n, conf in [(3, 17, 0.95), (17, 20, 0.95), (40, 90, 0.90), (1, 4, 0.99)]:
        a = 1 - conf
        expected = (beta.ppf(a / 2, k, n - k + 1), beta.ppf(1 - a / 2, k + 1, n - k))
        assert exact_interval(k, n, conf) == pytest.approx(expected, abs=1e-9)


def test_exact_interval_edges_and_errors():
    assert exact_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        exact_interval(3, 2)
    with pytest.raises(ValueError):
        exact_interval(1, 2, confidence=1.0)


# --- real or synthetic? --------------------------------------------------------------------------


def test_discrimination_counts_and_intervals():
    # 10 synthetic images, 7 called synthetic; 10 real, all called real.
    answers = [(True, True)] * 7 + [(True, False)] * 3 + [(False, False)] * 10
    d = discrimination(answers)
    assert (d.n, d.synthetic, d.real) == (20, 10, 10)
    assert d.sensitivity is not None and d.specificity is not None and d.accuracy is not None
    assert (d.sensitivity.k, d.sensitivity.n, d.sensitivity.rate) == (7, 10, 0.7)
    # R: binom.test(7, 10) -> 0.3475471 0.9332605; binom.test(10, 10) -> 0.6915029 1
    assert d.sensitivity.ci == pytest.approx((0.3475471, 0.9332605), abs=1e-7)
    assert (d.specificity.k, d.specificity.n, d.specificity.rate) == (10, 10, 1.0)
    assert d.specificity.ci == pytest.approx((0.6915029, 1.0), abs=1e-7)
    assert (d.accuracy.k, d.accuracy.n, d.accuracy.rate) == (17, 20, 0.85)
    from scipy.stats import beta  # Clopper-Pearson's beta-quantile form, as above

    assert d.accuracy.ci == pytest.approx(
        (beta.ppf(0.025, 17, 4), beta.ppf(0.975, 18, 3)), abs=1e-9
    )


def test_discrimination_bias_and_empty_classes():
    # Calling everything synthetic: sensitivity 1, specificity 0, accuracy the synthetic share.
    d = discrimination([(True, True)] * 3 + [(False, True)] * 1)
    assert d.sensitivity is not None and d.specificity is not None and d.accuracy is not None
    assert (d.sensitivity.rate, d.specificity.rate, d.accuracy.rate) == (1.0, 0.0, 0.75)
    only_real = discrimination([(False, False), (False, True)])
    assert only_real.sensitivity is None and only_real.specificity is not None
    assert only_real.specificity.rate == 0.5
    empty = discrimination([])
    assert empty.n == 0 and empty.accuracy is None
    assert empty.sensitivity is None and empty.specificity is None


# --- equivalence to chance -----------------------------------------------------------------------


def _tail(k: int, n: int, p: Fraction, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, p), summed exactly from the pmf."""
    js = range(k, n + 1) if upper else range(0, k + 1)
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in js))


def _tost_by_definition(k: int, n: int, margin: Fraction) -> float:
    half = Fraction(1, 2)
    return max(_tail(k, n, half - margin, True), _tail(k, n, half + margin, False))


def test_tost_small_n_is_never_equivalent():
    # 5 of 10 with bounds 0.4, 0.6: H01's p = P(X >= 5 | 10, 0.4) = 1 - pbinom(4, 10, 0.4)
    # = 1 - 0.6331033 = 0.3668967 (R; binomial tables give P(X <= 4) = .6331), and H02's p is
    # the same by symmetry. Half right, and still no evidence of guessing.
    e = equivalence_to_chance(5, 10)
    assert e.p_lower == pytest.approx(0.3668967, abs=1e-7)
    assert e.p_upper == pytest.approx(0.3668967, abs=1e-7)
    assert e.p_value == pytest.approx(0.3668967, abs=1e-7)
    assert not e.equivalent and not e.ci_inside
    # 6 of 10: H02's p = pbinom(6, 10, 0.6) = 0.6177194 (R); not equivalent, although a test of
    # "better than chance" is not significant either (binom.test(6, 10)$p.value = 0.7539).
    six = equivalence_to_chance(6, 10)
    assert six.p_upper == pytest.approx(0.6177194, abs=1e-7)
    assert six.p_value == pytest.approx(0.6177194, abs=1e-7)
    assert not six.equivalent
    # No count of 30 or fewer reads is equivalent at the default margin (every third n).
    for n in range(0, 31, 3):
        assert not any(equivalence_to_chance(k, n).equivalent for k in range(n + 1)), n


@pytest.mark.parametrize(
    ("k", "n", "margin"),
    [(5, 10, "1/10"), (48, 100, "1/10"), (55, 100, "1/10"), (150, 300, "1/20"), (7, 40, "1/5")],
)
def test_tost_p_values_match_the_definition(k: int, n: int, margin: str):
    m = Fraction(margin)
    e = equivalence_to_chance(k, n, margin=float(m))
    assert e.p_lower == pytest.approx(_tail(k, n, Fraction(1, 2) - m, True), abs=1e-12)
    assert e.p_upper == pytest.approx(_tail(k, n, Fraction(1, 2) + m, False), abs=1e-12)
    assert e.p_value == pytest.approx(_tost_by_definition(k, n, m), abs=1e-12)
    assert e.equivalent == (e.p_value < 0.05)
    assert e.bounds == pytest.approx((0.5 - float(m), 0.5 + float(m)))


def test_tost_large_n_agrees_with_the_normal_approximation():
    # 250 of 500 against 0.4: z = (250 - 0.5 - 200) / sqrt(500 * 0.4 * 0.6) = 49.5 / 10.954451
    # = 4.518714, upper normal tail 3.1e-6; the exact p is of that order (tolerance, not equality).
    from scipy.stats import norm

    e = equivalence_to_chance(250, 500)
    approx = float(norm.sf(49.5 / math.sqrt(500 * 0.4 * 0.6)))
    assert e.p_lower == pytest.approx(approx, rel=0.5)
    assert e.equivalent and e.ci_inside
    # 290 of 500 (58 %): z for H02 = (290 + 0.5 - 300) / 10.954451 = -0.867, p ~ 0.193.
    e = equivalence_to_chance(290, 500)
    assert e.p_upper == pytest.approx(float(norm.cdf(-9.5 / math.sqrt(120))), abs=0.01)
    assert not e.equivalent and not e.ci_inside


@pytest.mark.parametrize(
    ("margin", "alpha", "n_large"),
    [(DEFAULT_MARGIN, 0.05, 150), (0.05, 0.025, 600), (0.2, 0.1, 40)],
)
def test_tost_and_the_exact_1_minus_2_alpha_interval_agree(
    margin: float, alpha: float, n_large: int
):
    # The Clopper-Pearson limits invert the same one-sided exact tests, so the two views agree
    # for every count (see the docstring). Small n: every k; the large n (big enough for some
    # counts to be equivalent): every k within 0.15 of the bounds, where the verdicts change.
    seen = set()
    for n in (1, 10, n_large):
        lo, hi = 0.5 - margin - 0.15, 0.5 + margin + 0.15
        ks = range(n + 1) if n <= 10 else range(math.floor(n * lo), math.ceil(n * hi) + 1)
        for k in ks:
            e = equivalence_to_chance(k, n, margin=margin, alpha=alpha)
            assert e.equivalent == e.ci_inside, (k, n)
            seen.add(e.equivalent)
    assert seen == {True, False}
    assert equivalence_to_chance(4, 10, alpha=alpha).ci == exact_interval(4, 10, 1 - 2 * alpha)


def test_tost_errors_and_empty():
    e = equivalence_to_chance(0, 0)
    assert e.p_value == 1.0 and not e.equivalent
    with pytest.raises(ValueError):
        equivalence_to_chance(1, 10, margin=0.5)
    with pytest.raises(ValueError):
        equivalence_to_chance(1, 10, alpha=0.5)
    with pytest.raises(ValueError):
        equivalence_to_chance(11, 10)


# --- agreement -----------------------------------------------------------------------------------

# Krippendorff, K. (2011). Computing Krippendorff's Alpha-Reliability. Annenberg School for
# Communication, University of Pennsylvania (repository.upenn.edu/asc_papers/43), section C,
# "Nominal data, two or more observers, missing values": 4 observers, 12 units, values 1-5,
# "." missing. Published result: alpha_nominal = 0.743. (Unit 12 has a single value and is not
# pairable; 40 pairable values remain.)
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],  # observer A
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],  # observer B
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],  # observer C
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],  # observer D
]

# Wikipedia, "Krippendorff's alpha", section "A computational example": 3 coders, 15 units,
# "*" missing. Published result: alpha_nominal = 0.691.
WIKIPEDIA_ALPHA = [
    [None, None, None, None, None, 3, 4, 1, 2, 1, 1, 3, 3, None, 3],  # coder A
    [1, None, 2, 1, 3, 3, 4, 3, None, None, None, None, None, None, None],  # coder B
    [None, None, 2, 1, 3, 4, 4, None, 2, 1, 1, 3, 3, None, 4],  # coder C
]


def test_krippendorff_alpha_published_examples():
    assert krippendorff_alpha_nominal(KRIPPENDORFF_2011) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal(WIKIPEDIA_ALPHA) == pytest.approx(0.691, abs=5e-4)


def test_krippendorff_alpha_labels_any_hashable_and_identical_readers():
    # Nominal alpha depends only on which values are equal: relabel Krippendorff's example.
    names = {1: "real", 2: "synthetic", 3: "unsure", 4: "x", 5: ("t", 5)}
    relabelled = [[None if v is None else names[v] for v in row] for row in KRIPPENDORFF_2011]
    assert krippendorff_alpha_nominal(relabelled) == pytest.approx(0.743, abs=5e-4)
    reader = ["real", "synthetic", "synthetic", None, "real"]
    assert krippendorff_alpha_nominal([reader, reader, reader]) == 1.0
    # Every value the same: 0/0, reported as 1.0 (as service.statistics' kappas do).
    assert krippendorff_alpha_nominal([[1, 1], [1, 1]]) == 1.0


def test_krippendorff_alpha_errors():
    with pytest.raises(ValueError):
        krippendorff_alpha_nominal([])
    with pytest.raises(ValueError):
        krippendorff_alpha_nominal([[1, 2], [1]])
    with pytest.raises(ValueError):
        krippendorff_alpha_nominal([[1, None], [None, 2]])  # no unit has two values


def _reads_from_counts(counts: list[list[int]]) -> dict[int, list[int]]:
    return {u: [c for c, m in enumerate(row) for _ in range(m)] for u, row in enumerate(counts)}


def test_agreement_equal_reads_is_fleiss_worked_example():
    # Wikipedia's Fleiss' kappa example (Fleiss 1971's layout): kappa = 0.209930, worked in
    # tests/test_reports.py: P-bar = 688/1820 = 0.378022, column totals 20, 28, 39, 21, 32 of 140.
    # Alpha from the same counts by Krippendorff's definition: D_o = 1 - P-bar = 0.621978 and
    # D_e = 1 - (20*19 + 28*27 + 39*38 + 21*20 + 32*31)/(140*139) = 1 - 4030/19460 = 0.792909,
    # alpha = 1 - 0.621978/0.792909 = 0.215575.
    a = agreement(_reads_from_counts(FLEISS_1971))
    assert a.kappa == pytest.approx(0.209930, abs=1e-5)
    assert a.alpha == pytest.approx(0.215575, abs=1e-5)
    assert (a.kappa_units, a.reads_per_unit, a.alpha_units, a.alpha_reads) == (10, 14, 10, 140)


def test_agreement_unequal_reads_by_hand():
    # u1: a a a; u2: a b b; u3: b b; u4: a (read once: left out of both).
    # Kappa over the modal count (3 reads: u1, u2): P_i = (9-3)/6 = 1 and (1+4-3)/6 = 1/3,
    # P-bar = 2/3; shares a 4/6, b 2/6, P_e = 20/36; kappa = (2/3 - 5/9)/(4/9) = 0.25.
    # Alpha over u1-u3: o_aa = 3*2/2 = 3, o_bb = 2*1/2 + 2*1/1 = 3, n = 8 (a 4, b 4);
    # D_o = 1 - 6/8 = 1/4, D_e = 1 - (4*3 + 4*3)/(8*7) = 4/7, alpha = 1 - 7/16 = 0.5625.
    reads = {"u1": ["a", "a", "a"], "u2": ["a", "b", "b"], "u3": ["b", "b"], "u4": ["a"]}
    a = agreement(reads)
    assert a.kappa == pytest.approx(0.25, abs=TOL)
    assert a.alpha == pytest.approx(0.5625, abs=TOL)
    assert (a.kappa_units, a.reads_per_unit, a.alpha_units, a.alpha_reads) == (2, 3, 3, 8)
    # The same reads as a readers x units matrix give the same alpha.
    matrix = [["a", "a", "b", "a"], ["a", "b", "b", None], ["a", "b", None, None]]
    assert krippendorff_alpha_nominal(matrix) == pytest.approx(0.5625, abs=TOL)


def test_agreement_without_pairable_units():
    assert agreement({"u1": [True], "u2": []}) == Agreement(
        kappa=None, kappa_units=0, reads_per_unit=0, alpha=None, alpha_units=0, alpha_reads=0
    )
    # Booleans (real/synthetic answers) as labels; perfect agreement.
    a = agreement({1: [True, True], 2: [False, False]})
    assert a.kappa == 1.0 and a.alpha == 1.0


# --- AUC and ROC ---------------------------------------------------------------------------------


def test_auc_by_hand_and_sklearn():
    # Positives 3, 4, 5 vs negatives 1, 3: pairs won 1 + 2 + 2 = 5, one tie (3 vs 3) = 0.5,
    # of 3 * 2 = 6 pairs: AUC = 5.5/6.
    assert auc([3, 4, 5], [1, 3]) == pytest.approx(5.5 / 6, abs=1e-12)
    assert auc([1, 3], [3, 4, 5]) == pytest.approx(0.5 / 6, abs=1e-12)  # the other way round
    assert auc([2, 2], [2]) == 0.5
    from sklearn.metrics import roc_auc_score

    pos = [5, 4, 4, 3, 5, 2, 4, 3, 1, 5]
    neg = [1, 2, 2, 3, 1, 4, 2, 1, 3]
    expected = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    sizes_pos = [48211.0, 51002.5, 47990.0, 60123.0]  # continuous scores, e.g. PNG byte sizes
    sizes_neg = [45000.0, 52001.0, 47990.0]
    expected = roc_auc_score([1] * 4 + [0] * 3, sizes_pos + sizes_neg)
    assert auc(sizes_pos, sizes_neg) == pytest.approx(expected, abs=1e-12)


def test_auc_errors():
    with pytest.raises(ValueError):
        auc([], [1.0])
    with pytest.raises(ValueError):
        auc([1.0], [])


def test_roc_points_match_sklearn_roc_curve():
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = [True, True, False, True, False, False, True, False, True, False, True]
    ratings = [5, 4, 1, 3, 2, 3, 5, 1, 2, 4, 3]
    fpr, tpr, _ = roc_curve(truth, ratings, drop_intermediate=False)
    points = roc_points(truth, ratings)
    assert [x for point in points for x in point] == pytest.approx(
        [x for point in zip(fpr, tpr, strict=True) for x in point], abs=1e-12
    )
    assert len(points) == len(fpr)
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))
    assert area == pytest.approx(roc_auc_score(truth, ratings), abs=1e-12)


def test_roc_points_errors():
    with pytest.raises(ValueError):
        roc_points([True, False], [1])
    with pytest.raises(ValueError):
        roc_points([True, True], [1, 2])
