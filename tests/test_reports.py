"""service.statistics and service.reports: interval, test and kappa statistics against published
or hand-computed values, and a full plausibility report on a small hand-made set of verdicts,
every number worked by hand, with the image as the unit (its reviewers' majority verdict).

z = 1.959964, z^2 = 3.841459 throughout. Wilson: d = 1 + z^2/n, centre c = (p + z^2/2n)/d,
half-width h = z/d * sqrt(p(1-p)/n + z^2/4n^2), interval c -+ h.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service.report_schemas import Methods, PlausibilityReport
from service.reports import Judgement, agreement, plausibility_report, report_csv
from service.statistics import (
    cohen_kappa,
    fisher_p,
    fleiss_kappa,
    holm,
    mantel_haenszel,
    newcombe_difference,
    wilson,
)

TOL = 1e-4


def close(actual: Any, expected: Any, path: str = "") -> None:
    """Recursive equality, floats to TOL; says where the first mismatch is."""
    if isinstance(expected, float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), path
        assert actual == pytest.approx(expected, abs=TOL), f"{path}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{path}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            close(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def dump(model: Any) -> Any:
    """A report part as its JSON (aliases such as ``class``, lists for intervals)."""
    assert model is not None
    return model.model_dump(mode="json")


# --- Wilson --------------------------------------------------------------------------------------


def test_wilson_empty_is_uninformative():
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_textbook_5_of_10():
    # p = 0.5, z^2/n = 0.384146, d = 1.384146, c = 0.5,
    # h = 1.959964/1.384146 * sqrt(0.025 + 3.841459/400) = 1.416009 * 0.186020 = 0.263408.
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=TOL)
    assert hi == pytest.approx(0.7634, abs=TOL)


def test_wilson_zero_successes():
    # k = 0: c = h = (z^2/2n)/d, so the interval is [0, (z^2/n)/d] = [0, 0.384146/1.384146].
    lo, hi = wilson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=TOL)


def test_wilson_matches_scipy_and_rejects_bad_counts():
    from scipy.stats import binomtest

    for k, n in [(1, 4), (3, 8), (7, 9), (12, 12)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)
    for k, n in [(-1, 3), (4, 3), (0, -1)]:
        with pytest.raises(ValueError):
            wilson(k, n)


# --- Newcombe ------------------------------------------------------------------------------------


def test_newcombe_worked_example():
    # Newcombe (1998), Table II example (a): 56/70 - 48/80 = 0.8 - 0.6 = 0.2, method 10 gives
    # 0.0524 to 0.3339 for p1 - p2 (the whole interval above 0). Our function returns p2 - p1,
    # so with the arguments in Newcombe's order it gives the mirror image -0.3339 to -0.0524,
    # and with them swapped Newcombe's own interval.
    lo, hi = newcombe_difference(56, 70, 48, 80)
    assert (lo, hi) == pytest.approx((-0.3339, -0.0524), abs=TOL)
    lo, hi = newcombe_difference(48, 80, 56, 70)
    assert (lo, hi) == pytest.approx((0.0524, 0.3339), abs=TOL)


def test_newcombe_small_counts_by_hand():
    # 2/4 vs 3/4: Wilson(2,4) = 0.5 -+ 0.349961 = [0.150039, 0.849961];
    # Wilson(3,4): c = (0.75 + 0.480182)/1.960365 = 0.627527, h = 0.326885 -> [0.300642, 0.954413].
    # d = 0.25; lower = 0.25 - sqrt((0.75-0.300642)^2 + (0.849961-0.5)^2)
    #                 = 0.25 - sqrt(0.201923 + 0.122473) = 0.25 - 0.569558 = -0.319558;
    # upper = 0.25 + sqrt((0.954413-0.75)^2 + (0.5-0.150039)^2)
    #       = 0.25 + sqrt(0.041785 + 0.122473) = 0.25 + 0.405287 = 0.655287.
    assert newcombe_difference(2, 4, 3, 4) == pytest.approx((-0.319558, 0.655287), abs=TOL)
    assert newcombe_difference(0, 0, 3, 4) == (-1.0, 1.0)


# --- Fisher --------------------------------------------------------------------------------------


def test_fisher_known_table():
    # [[3,1],[1,3]]: margins 4,4 / 4,4, C(8,4) = 70; P(X=x) = C(4,x)C(4,4-x)/70 for x = 0..4
    # = 1, 16, 36, 16, 1 (/70). Observed x = 3 (16/70); two-sided sums tables no likelier:
    # (1 + 16 + 16 + 1)/70 = 34/70 = 0.485714.
    assert fisher_p(3, 4, 1, 4) == pytest.approx(34 / 70, abs=1e-9)
    assert fisher_p(2, 4, 3, 4) == pytest.approx(1.0)


# --- Holm ----------------------------------------------------------------------------------------


def test_holm_worked_example():
    # k = 4: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; made
    # non-decreasing in that order: 0.02, 0.03, 0.06, 0.06; back in the input's order.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # 0.4 * 2 = 0.8, then 0.9 * 1; capped at 1; a single test is unadjusted; none is fine
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert holm([0.6, 0.9]) == [1.0, 1.0]
    assert holm([0.3]) == [0.3] and holm([]) == []
    with pytest.raises(ValueError):
        holm([1.2])


def test_holm_is_closed_testing_with_bonferroni():
    # Holm's adjusted p_i is, by its definition as a closed test, the largest Bonferroni p over
    # every subset S of the hypotheses that contains i: max_S min(1, |S| * min_{j in S} p_j).
    # Enumerating the subsets is an independent reference for the step-down shortcut.
    from itertools import combinations
    from random import Random

    rng = Random(5)
    for _ in range(50):
        ps = [rng.choice([rng.random(), rng.random() / 20, 0.5]) for _ in range(rng.randint(1, 6))]
        k = range(len(ps))
        reference = [
            max(
                min(1.0, len(sub) * min(ps[j] for j in sub))
                for size in range(1, len(ps) + 1)
                for sub in combinations(k, size)
                if i in sub
            )
            for i in k
        ]
        assert holm(ps) == pytest.approx(reference, abs=1e-12), ps


# --- Cochran-Mantel-Haenszel ---------------------------------------------------------------------


def test_mantel_haenszel_published_examples():
    # R's mantelhaen.test (correct = TRUE) on the Rabbits example of its documentation (penicillin
    # given at once or 1.5 h late, cured/died, 5 dose strata): "Mantel-Haenszel X-squared =
    # 3.9286, df = 1, p-value = 0.04747; common odds ratio 7, 95 percent CI 1.026713 47.725133"
    # (the values statsmodels' StratifiedTable tests record from R). The CMH statistic and the
    # odds ratio do not change when every table is transposed.
    rabbits = [
        ((0, 0), (6, 5)),
        ((3, 0), (3, 6)),
        ((6, 2), (0, 4)),
        ((5, 6), (1, 0)),
        ((2, 5), (0, 0)),
    ]
    got = mantel_haenszel(rabbits)
    assert got is not None
    assert got.statistic == pytest.approx(3.9286, abs=1e-4)
    assert got.p_value == pytest.approx(0.04747, abs=1e-5)
    assert got.odds_ratio == pytest.approx(7.0)
    assert got.odds_ratio_ci == pytest.approx((1.026713, 47.725133), abs=1e-5)
    # The second R reference of the same suite: X-squared = 11.8852, p = 0.0005658, common odds
    # ratio 3.5912, 95% CI 1.781135 7.240633.
    second = [
        ((20, 14), (10, 24)),
        ((15, 12), (3, 15)),
        ((3, 2), (3, 2)),
        ((12, 3), (7, 5)),
        ((1, 0), (3, 2)),
    ]
    got = mantel_haenszel(second)
    assert got is not None
    assert (got.statistic, got.p_value) == pytest.approx((11.8852, 0.0005658), abs=1e-4)
    assert got.odds_ratio == pytest.approx(3.5912, abs=1e-4)
    assert got.odds_ratio_ci == pytest.approx((1.781135, 7.240633), abs=1e-5)


def test_mantel_haenszel_degenerate_strata():
    # A stratum of one observation carries nothing: the same result without it.
    base = [((1, 1), (1, 1)), ((2, 1), (0, 2))]
    assert mantel_haenszel([*base, ((1, 0), (0, 0))]) == mantel_haenszel(base)
    # Only one group judged in every stratum: the variance is 0, no test.
    assert mantel_haenszel([((3, 1), (0, 0)), ((0, 0), (2, 2))]) is None
    # Every stratum favours group 1 (b * c = 0 throughout): the odds ratio is infinite, None.
    got = mantel_haenszel([((3, 0), (1, 2)), ((2, 0), (0, 2))])
    assert got is not None and got.odds_ratio is None and got.odds_ratio_ci is None
    with pytest.raises(ValueError):
        mantel_haenszel([((-1, 2), (1, 1))])


# --- kappas --------------------------------------------------------------------------------------


def test_cohen_kappa_by_hand_and_sklearn():
    # 10 items: both yes 4, a yes/b no 1, a no/b yes 2, both no 3.
    # p_o = 7/10 = 0.7; a says yes 5/10, b 6/10; p_e = 0.5*0.6 + 0.5*0.4 = 0.5;
    # kappa = (0.7 - 0.5)/(1 - 0.5) = 0.4.
    a = [True] * 4 + [True] + [False] * 2 + [False] * 3
    b = [True] * 4 + [False] + [True] * 2 + [False] * 3
    from sklearn.metrics import cohen_kappa_score

    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_cohen_kappa_degenerate_and_errors():
    # Both raters constant and equal: p_e = 1, kappa 0/0 -> defined as 1.0 (perfect agreement).
    assert cohen_kappa([True] * 3, [True] * 3) == 1.0
    assert cohen_kappa([False] * 3, [False] * 3) == 1.0
    # Constant but different: p_o = 0, p_e = 0 -> kappa 0.
    assert cohen_kappa([True] * 3, [False] * 3) == 0.0
    with pytest.raises(ValueError):
        cohen_kappa([True], [True, False])
    with pytest.raises(ValueError):
        cohen_kappa([], [])


FLEISS_1971 = [  # Wikipedia's worked example: 10 items, 5 categories, 14 raters each
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_worked_example():
    # P_i = (sum n_ij^2 - 14)/(14*13): numerators 182, 46, 56, 80, 60, 84, 44, 32, 52, 52
    # (sum 688), so P-bar = 688/1820 = 0.378022. Column totals 20, 28, 39, 21, 32 (of 140):
    # P_e = (400 + 784 + 1521 + 441 + 1024)/19600 = 4170/19600 = 0.212755.
    # kappa = (0.378022 - 0.212755)/(1 - 0.212755) = 0.165267/0.787245 = 0.209930.
    assert fleiss_kappa(FLEISS_1971) == pytest.approx(0.209930, abs=1e-5)


def test_fleiss_kappa_degenerate_and_errors():
    assert fleiss_kappa([[3, 0], [3, 0]]) == 1.0
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 1], [1, 1]])  # 3 ratings, then 2
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 0]])  # a single rating per item
    with pytest.raises(ValueError):
        fleiss_kappa([])


# --- agreement -----------------------------------------------------------------------------------


def j(image: int, reviewer: str, plausible: bool, **kw: Any) -> Judgement:
    defaults: dict[str, Any] = {"class_name": "c", "model_id": 1, "mode": "baseline"}
    defaults.update(kw)
    return Judgement(
        image_id=image,
        reviewer=reviewer,
        plausible=plausible,
        criteria=defaults.pop("criteria", {}),
        **defaults,
    )


def test_agreement_none_with_one_reviewer_or_no_overlap():
    assert agreement([]) is None
    assert agreement([j(1, "ann", True), j(2, "ann", False)]) is None
    assert agreement([j(1, "ann", True), j(2, "bob", False)]) is None


def test_agreement_two_reviewers_is_cohen():
    # Images 1-4 rated by both: (T,T) (T,F) (F,F) (F,F); image 5 by ann only, left out.
    # p_o = 3/4; ann yes 2/4, bob yes 1/4: p_e = 0.5*0.25 + 0.5*0.75 = 0.5;
    # kappa = (0.75 - 0.5)/0.5 = 0.5.
    js = [
        j(1, "bob", True),
        j(1, "ann", True),
        j(2, "ann", True),
        j(2, "bob", False),
        j(3, "ann", False),
        j(3, "bob", False),
        j(4, "ann", False),
        j(4, "bob", False),
        j(5, "ann", True),
    ]
    close(
        dump(agreement(js)),
        {
            "method": "cohen",
            "kappa": 0.5,
            "items": 4,
            "raters": 2,
            "reviewers": ["ann", "bob"],
            "percent_agreement": 75.0,
        },
    )


def test_agreement_three_reviewers_is_fleiss():
    # Images 1-3 rated by all 3 (the most common count), image 4 by 2 only: left out.
    # Table (yes, no): [3,0], [2,1], [0,3]. P_i = (9-3)/6 = 1, (4+1-3)/6 = 1/3, 1: P-bar = 7/9.
    # yes 5/9, no 4/9: P_e = 25/81 + 16/81 = 41/81. kappa = (63/81 - 41/81)/(40/81) = 22/40.
    js = [
        j(1, "ann", True),
        j(1, "bob", True),
        j(1, "cat", True),
        j(2, "ann", True),
        j(2, "bob", True),
        j(2, "cat", False),
        j(3, "ann", False),
        j(3, "bob", False),
        j(3, "cat", False),
        j(4, "ann", True),
        j(4, "bob", False),
    ]
    close(
        dump(agreement(js)),
        {
            "method": "fleiss",
            "kappa": 0.55,
            "items": 3,
            "raters": 3,
            "reviewers": ["ann", "bob", "cat"],
            "percent_agreement": 100 * 7 / 9,
        },
    )


def test_agreement_fleiss_tie_takes_more_raters():
    # One image rated by 2, one by 3: counts tie, so m = 3 (more raters per item) is used.
    # Table [[2, 1]]: P-bar = (4+1-3)/6 = 1/3; P_e = (2/3)^2 + (1/3)^2 = 5/9;
    # kappa = (3/9 - 5/9)/(4/9) = -0.5.
    js = [j(1, "ann", True), j(1, "bob", True)]
    js += [j(2, "ann", True), j(2, "bob", True), j(2, "cat", False)]
    result = agreement(js)
    assert result is not None
    assert (result.method, result.items, result.raters) == ("fleiss", 1, 3)
    assert result.kappa == pytest.approx(-0.5)


# --- the report ----------------------------------------------------------------------------------

MODELS = [
    {"id": 1, "mode": "baseline", "label": "baseline #1"},
    {"id": 2, "mode": "prototype", "label": "prototype #1"},
]
CRITERIA = [{"key": "cell_size", "label": "Cell size"}, {"key": "nucleus", "label": "Nucleus"}]
P, F, NA = "pass", "fail", "na"


def verdict(image: int, cls: str, model: int, reviewer: str, size: str, nucleus: str) -> Judgement:
    return Judgement(
        image_id=image,
        class_name=cls,
        model_id=model,
        mode="baseline" if model == 1 else "prototype",
        reviewer=reviewer,
        plausible=F not in (size, nucleus),
        criteria={"cell_size": size, "nucleus": nucleus},
    )


# 2 models x 2 classes x 2 reviewers (ann, bob); image 205 is rated by ann alone. The image's
# verdict is its reviewers' majority, a tie counting as implausible (with two reviewers: both).
#   image cls         model  ann (size, nucleus)   bob (size, nucleus)    image
#   101   basophil    1      P P  -> yes           P P  -> yes            yes
#   102   basophil    1      F P  -> no            F F  -> no             no
#   201   basophil    2      P P  -> yes           P P  -> yes            yes
#   202   basophil    2      P P  -> yes           NA F -> no             no (tie)
#   103   neutrophil  1      P F  -> no            P P  -> yes            no (tie)
#   104   neutrophil  1      F P  -> no            F P  -> no             no
#   203   neutrophil  2      P P  -> yes           P P  -> yes            yes
#   204   neutrophil  2      P P  -> yes           NA P -> yes            yes
#   205   neutrophil  2      P F  -> no            -                      no
JUDGEMENTS = [
    verdict(101, "basophil", 1, "ann", P, P),
    verdict(101, "basophil", 1, "bob", P, P),
    verdict(102, "basophil", 1, "ann", F, P),
    verdict(102, "basophil", 1, "bob", F, F),
    verdict(201, "basophil", 2, "ann", P, P),
    verdict(201, "basophil", 2, "bob", P, P),
    verdict(202, "basophil", 2, "ann", P, P),
    verdict(202, "basophil", 2, "bob", NA, F),
    verdict(103, "neutrophil", 1, "ann", P, F),
    verdict(103, "neutrophil", 1, "bob", P, P),
    verdict(104, "neutrophil", 1, "ann", F, P),
    verdict(104, "neutrophil", 1, "bob", F, P),
    verdict(203, "neutrophil", 2, "ann", P, P),
    verdict(203, "neutrophil", 2, "bob", P, P),
    verdict(204, "neutrophil", 2, "ann", P, P),
    verdict(204, "neutrophil", 2, "bob", NA, P),
    verdict(205, "neutrophil", 2, "ann", P, F),
]


def crit(fail: int, judged: int) -> dict[str, Any]:
    return {"fail": fail, "judged": judged, "rate": fail / judged if judged else None}


def entry(
    images: int,
    reviews: int,
    plausible: int,
    ties: int,
    ci: list[float],
    kept_apart: int = 0,
    incomplete: int = 0,
) -> dict:
    rate = plausible / images if images else None
    return {
        "images": images,
        "reviews": reviews,
        "plausible": plausible,
        "ties": ties,
        "rate": rate,
        "ci": ci,
        "kept_apart": kept_apart,
        "incomplete": incomplete,
    }


# Counts of images: basophil 1/2 vs 1/2, neutrophil 0/2 vs 2/3, pooled 1/4 vs 3/5.
# Wilson intervals (d = 1 + z^2/n; c, h as in the module docstring):
#   1/2: d = 2.920729, c = 0.5,      h = 0.405469 -> [0.094531, 0.905469]
#   0/2: d = 2.920729, c = 0.328810, h = 0.328810 -> [0, 0.657620]
#   2/3: d = 2.280486, c = 0.573084, h = 0.365424 -> [0.207660, 0.938508]
#   1/4: d = 1.960365, c = 0.372473, h = 0.326885 -> [0.045587, 0.699358]
#   3/5: d = 1.768292, c = 0.556552, h = 0.325827 -> [0.230724, 0.882379]
# Fisher two-sided p (hypergeometric, X = baseline plausible):
#   basophil [[1,1],[1,1]]: symmetric, every table as likely or likelier: 1.0
#   neutrophil [[0,2],[2,1]]: C(2,x)C(3,2-x)/10 = 3,6,1 (x=0..2); x=0 (3): 3 + 1 = 4/10 = 0.4
#   pooled [[1,3],[3,2]]: C(4,x)C(5,4-x)/126 = 5,40,60,20,1 (x=0..4); x=1 (40):
#     5 + 40 + 20 + 1 = 66/126 = 0.523810
# Holm over the k = 2 classes: sorted 0.4 * 2 = 0.8, then 1.0 * 1 = 1.0.
# Newcombe (p2 - p1 = d; lower = d - sqrt((p2-l2)^2 + (u1-p1)^2),
#                        upper = d + sqrt((u2-p2)^2 + (p1-l1)^2)):
#   basophil 1/2 vs 1/2: d = 0, -+ sqrt(0.164405 + 0.164405) = -+ 0.573419
#   neutrophil 0/2 vs 2/3: d = 0.666667;
#     lower = d - sqrt((0.666667-0.207660)^2 + (0.657620-0)^2) = d - sqrt(0.210687+0.432464)
#           = 0.666667 - 0.801967 = -0.135300
#     upper = d + sqrt((0.938508-0.666667)^2 + 0) = 0.666667 + 0.271841 = 0.938508
#   pooled 1/4 vs 3/5: d = 0.35;
#     lower = 0.35 - sqrt((0.6-0.230724)^2 + (0.699358-0.25)^2) = 0.35 - sqrt(0.136365+0.201923)
#           = 0.35 - 0.581625 = -0.231625
#     upper = 0.35 + sqrt((0.882379-0.6)^2 + (0.25-0.045587)^2) = 0.35 + sqrt(0.079738+0.041785)
#           = 0.35 + 0.348601 = 0.698601
# CMH by class, rows (prototype, baseline), columns (plausible, not): basophil ((1,1),(1,1)),
# n = 4; neutrophil ((2,1),(0,2)), n = 5.
#   E[a] = (a+b)(a+c)/n = 1 and 1.2; sum(a - E) = 0 + 0.8 = 0.8;
#   Var = (a+b)(c+d)(a+c)(b+d)/(n^2 (n-1)) = 16/48 = 1/3 and 36/100 = 0.36;
#   X^2 = (0.8 - 0.5)^2 / (1/3 + 0.36) = 0.09/0.693333 = 0.129808, p = P(chi2_1 > X^2) = 0.718632
#   (scipy's chi2.sf; sqrt(X^2) = 0.360289, 2 * (1 - Phi(0.360289)) = 0.7186).
#   MH OR = sum(ad/n) / sum(bc/n) = (1/4 + 4/5) / (1/4 + 0) = 1.05/0.25 = 4.2.
#   RGB: P = (a+d)/n, Q = (b+c)/n, R = ad/n, S = bc/n: (0.5, 0.5, 0.25, 0.25), (0.8, 0.2, 0.8, 0)
#   var(log OR) = sum PR/(2 R+^2) + sum(PS+QR)/(2 R+ S+) + sum QS/(2 S+^2)
#              = 0.765/2.205 + 0.41/0.525 + 0.125/0.125 = 0.346939 + 0.780952 + 1 = 2.127891;
#   log 4.2 = 1.435085 -+ 1.959964 * 1.458730 = -+ 2.859057 -> [0.240756, 73.2693].
EXPECTED: dict[str, Any] = {
    "methods": {
        "unit": "image",
        "consensus": "plausible iff more of the image's reviewers said plausible than not; a "
        "tie counts as implausible",
        "intervals": "Wilson score 95% per rate; Newcombe hybrid score 95% per difference",
        "class_test": "Fisher's exact, two-sided, over images; Holm-adjusted over k classes",
        "pooled_test": "Cochran-Mantel-Haenszel stratified by class (continuity-corrected), with "
        "the Mantel-Haenszel common odds ratio; unstratified Fisher over pooled images alongside",
        "criteria": "failure rates per verdict (descriptive, no test)",
        "sample": "every number counts only images of a simple random sample of their batch "
        "(review sample 'random'; a batch sent whole is one); images sent because the scorer "
        "was least sure about them (sample 'uncertain') are kept apart: counted in kept_apart, "
        "in no rate, test, failure rate or agreement",
        "verdicts": "a verdict is implausible if a criterion failed or the overall choice is "
        "implausible, plausible only with an overall 'plausible' and every criterion judged; any "
        "other verdict is incomplete: counted in 'incomplete', in no rate, test, failure rate, "
        "agreement or scorer label",
        "holm_classes": 2,
        "controls": "real images from a dataset's held-out part (never a reviewed model's "
        "training images) reviewed blinded among the synthetic ones: per class their plausible "
        "rate (Wilson) and each model's rate minus it (Newcombe), counted like a model's",
        # stated where the question is implemented; tests/test_origin_question.py checks it
        "discrimination": Methods.model_fields["discrimination"].default,
    },
    "models": MODELS,
    "baseline_id": 1,
    "prototype_id": 2,
    "classes": [
        {
            "class": "basophil",
            "real": None,  # no controls
            "versus_real": {},
            "models": {
                "1": entry(2, 4, 1, 0, [0.094531, 0.905469]),
                "2": entry(2, 4, 1, 1, [0.094531, 0.905469]),
            },
            "difference": {
                "value": 0.0,
                "ci": [-0.573419, 0.573419],
                "p_value": 1.0,
                "test": "fisher-exact",
                "p_holm": 1.0,
            },
            "criteria": {
                # per verdict: model 1: size fails ann-102, bob-102 (2/4); nucleus bob-102 (1/4)
                "1": {"cell_size": crit(2, 4), "nucleus": crit(1, 4)},
                # model 2: size na on bob-202 (0/3); nucleus fails bob-202 (1/4)
                "2": {"cell_size": crit(0, 3), "nucleus": crit(1, 4)},
            },
        },
        {
            "class": "neutrophil",
            "real": None,  # no controls
            "versus_real": {},
            "models": {
                "1": entry(2, 4, 0, 1, [0.0, 0.657620]),
                "2": entry(3, 5, 2, 0, [0.207660, 0.938508]),
            },
            "difference": {
                "value": 2 / 3,
                "ci": [-0.135300, 0.938508],
                "p_value": 0.4,
                "test": "fisher-exact",
                "p_holm": 0.8,
            },
            "criteria": {
                # model 1: size fails ann-104, bob-104 (2/4); nucleus fails ann-103 (1/4)
                "1": {"cell_size": crit(2, 4), "nucleus": crit(1, 4)},
                # model 2: size na on bob-204 (0/4 of 5); nucleus fails ann-205 (1/5)
                "2": {"cell_size": crit(0, 4), "nucleus": crit(1, 5)},
            },
        },
    ],
    "average": {
        # macro: (0.5 + 0)/2 = 0.25; (0.5 + 2/3)/2 = 0.583333 (pooled 3/5 differs)
        "macro": {"1": 0.25, "2": 7 / 12},
        # both models were judged on both classes: the same averages, 7/12 - 1/4
        "macro_difference": {
            "value": 1 / 3,
            "baseline": 0.25,
            "prototype": 7 / 12,
            "classes": ["basophil", "neutrophil"],
            "left_out": [],
        },
        "pooled": {
            "1": entry(4, 8, 1, 1, [0.045587, 0.699358]),
            "2": entry(5, 9, 3, 1, [0.230724, 0.882379]),
        },
        "difference": {
            "value": 0.35,
            "ci": [-0.231625, 0.698601],
            "p_value": 66 / 126,
            "test": "fisher-exact",
        },
        "stratified": {
            "test": "cochran-mantel-haenszel",
            "statistic": 0.129808,
            "p_value": 0.718632,
            "odds_ratio": 4.2,
            "odds_ratio_ci": [0.240756, 73.2693],
            "strata": ["basophil", "neutrophil"],
        },
    },
    "criteria": CRITERIA,
    "criteria_failure": {
        "1": {"cell_size": crit(4, 8), "nucleus": crit(2, 8)},
        "2": {"cell_size": crit(0, 7), "nucleus": crit(2, 9)},
    },
    # Agreement stays over verdicts. 8 images rated by both: disagree on 202 and 103 only,
    # p_o = 6/8 = 0.75; ann yes on 101, 201, 202, 203, 204 (5/8), bob on 101, 201, 103, 203,
    # 204 (5/8): p_e = 25/64 + 9/64 = 34/64; kappa = (48/64 - 34/64)/(30/64) = 14/30 = 0.466667.
    "agreement": {
        "method": "cohen",
        "kappa": 14 / 30,
        "items": 8,
        "raters": 2,
        "reviewers": ["ann", "bob"],
        "percent_agreement": 75.0,
    },
    "kept_apart": 0,
    "incomplete": 0,
    "flagged": 0,
    "on_edited_tasks": 0,
    "filters": None,
    "control_leaks": [],  # no real control images reviewed
    "discrimination": None,  # nobody was asked "real or synthetic?"
}


def as_json(report: Any) -> dict[str, Any]:
    """The report as the API sends it."""
    assert isinstance(report, PlausibilityReport)
    return report.model_dump(mode="json")


def test_report_by_hand():
    report = as_json(plausibility_report(JUDGEMENTS, MODELS, CRITERIA))
    close(report, EXPECTED)
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable, str keys, no NaN
    assert PlausibilityReport.model_validate(report).model_dump(mode="json") == report


def test_report_ignores_other_models_and_orders_classes():
    other = verdict(999, "aaa", 7, "cat", F, F)
    report = plausibility_report([other, *reversed(JUDGEMENTS)], MODELS, CRITERIA)
    close(as_json(report), EXPECTED)


def test_report_empty_column_and_no_baseline():
    models = [*MODELS, {"id": 3, "mode": "baseline", "label": "baseline #2"}]
    # Two baselines: none is chosen, so there is no difference anywhere.
    report = as_json(plausibility_report(JUDGEMENTS, models, CRITERIA))
    assert report["baseline_id"] is None and report["prototype_id"] == 2
    assert all(c["difference"] is None for c in report["classes"])
    assert report["average"]["difference"] is None
    assert report["average"]["macro_difference"] is None
    assert report["average"]["stratified"] is None
    assert report["methods"]["holm_classes"] == 0
    empty = entry(0, 0, 0, 0, [0.0, 1.0])
    for c in report["classes"]:
        assert c["models"]["3"] == empty
        assert c["criteria"]["3"] == {"cell_size": crit(0, 0), "nucleus": crit(0, 0)}
    assert report["average"]["macro"]["3"] is None
    assert report["average"]["pooled"]["3"] == empty
    # Naming the baseline brings the differences back, the same as before.
    named = as_json(plausibility_report(JUDGEMENTS, models, CRITERIA, baseline_id=1))
    close(named["classes"][0]["difference"], EXPECTED["classes"][0]["difference"])
    close(named["average"]["stratified"], EXPECTED["average"]["stratified"])
    # Only prototype judgements: a baseline column with no reviews means no difference either.
    protos = [x for x in JUDGEMENTS if x.model_id == 2]
    only = as_json(plausibility_report(protos, MODELS, CRITERIA))
    assert only["baseline_id"] == 1
    assert all(c["difference"] is None for c in only["classes"])
    assert only["average"]["stratified"] is None  # no class with both: nothing to test
    with pytest.raises(ValueError):
        plausibility_report(JUDGEMENTS, MODELS, CRITERIA, baseline_id=3)


def test_report_macro_skips_classes_without_reviews():
    # Baseline judged on basophil only (1/2): its macro is 0.5, not (0.5 + 0)/2; its neutrophil
    # cell is empty and the neutrophil difference is None. Prototype macro stays 7/12. Holm
    # then adjusts over the one class compared: basophil's p unchanged.
    js = [x for x in JUDGEMENTS if not (x.model_id == 1 and x.class_name == "neutrophil")]
    report = as_json(plausibility_report(js, MODELS, CRITERIA))
    close(report["average"]["macro"], {"1": 0.5, "2": 7 / 12})
    assert report["classes"][1]["models"]["1"]["images"] == 0
    assert report["classes"][1]["difference"] is None
    close(report["classes"][0]["difference"], EXPECTED["classes"][0]["difference"])
    assert report["methods"]["holm_classes"] == 1
    assert report["average"]["stratified"]["strata"] == ["basophil"]
    # The difference compares like with like: basophil only, where both were judged
    # (0.5 - 0.5), not 7/12 - 0.5 over different class sets; and it says so.
    close(
        report["average"]["macro_difference"],
        {
            "value": 0.0,
            "baseline": 0.5,
            "prototype": 0.5,
            "classes": ["basophil"],
            "left_out": ["neutrophil"],
        },
    )
    rows = list(csv.reader(io.StringIO(report_csv(plausibility_report(js, MODELS, CRITERIA)))))
    assert rows[3] == ["average (macro)", "50.00", "58.33", "0.00", "", "", ""]
    assert rows[6] == [
        "macro difference over classes",
        "basophil",
        "left out (not judged for both): neutrophil",
    ]
    # No class judged for both: no macro difference, and the note says why; no stratified test.
    only_base = [x for x in JUDGEMENTS if x.model_id == 1 and x.class_name == "basophil"]
    only_proto = [x for x in JUDGEMENTS if x.model_id == 2 and x.class_name == "neutrophil"]
    apart = plausibility_report(only_base + only_proto, MODELS, CRITERIA)
    close(
        as_json(apart)["average"]["macro_difference"],
        {
            "value": None,
            "baseline": None,
            "prototype": None,
            "classes": [],
            "left_out": ["basophil", "neutrophil"],
        },
    )
    rows = list(csv.reader(io.StringIO(report_csv(apart))))
    assert rows[3] == ["average (macro)", "50.00", "66.67", "", "", "", ""]
    assert rows[5][:2] == ["macro difference over classes", "none"]
    assert not any(r and r[0].startswith("pooled, stratified") for r in rows)


def test_report_rejects_unknown_criterion_verdict():
    bad = verdict(1, "basophil", 1, "ann", "maybe", P)
    with pytest.raises(ValueError):
        plausibility_report([bad], MODELS, CRITERIA)


def test_report_csv_rows():
    text = report_csv(plausibility_report(JUDGEMENTS, MODELS, CRITERIA))
    rows = list(csv.reader(io.StringIO(text)))
    # Percentages from the hand values above: CIs in pp to 1 decimal, p to 2; n = images.
    holm_p = "p (Holm-adjusted over 2 classes)"
    assert rows == [
        ["class", "baseline #1 (%)", "prototype #1 (%)", "difference (pp)", "95% CI", "p", holm_p],
        [
            "basophil",
            "50.00 (n=2; 4 reviews)",
            "50.00 (n=2; 4 reviews)",
            "0.00",
            "[-57.3; 57.3]",
            "1.00",
            "1.00",
        ],
        [
            "neutrophil",
            "0.00 (n=2; 4 reviews)",
            "66.67 (n=3; 5 reviews)",
            "66.67",
            "[-13.5; 93.9]",
            "0.40",
            "0.80",
        ],
        ["average (macro)", "25.00", "58.33", "33.33", "", "", ""],
        [
            "pooled",
            "25.00 (n=4; 8 reviews)",
            "60.00 (n=5; 9 reviews)",
            "35.00",
            "[-23.2; 69.9]",
            "0.52",
            "",
        ],
        ["pooled, stratified by class (Cochran-Mantel-Haenszel)", "", "", "", "", "0.72", ""],
        ["macro difference over classes", "basophil; neutrophil"],
        ["Mantel-Haenszel common odds ratio, prototype vs baseline: 4.20, 95% CI [0.24; 73.27]"],
        [
            "n",
            "images; plausible iff more of the image's reviewers said plausible than not; a "
            "tie counts as implausible",
        ],
        [],
        ["criterion", "baseline #1 fail %", "prototype #1 fail %"],
        ["Cell size", "50.00 (n=8)", "0.00 (n=7)"],
        ["Nucleus", "25.00 (n=8)", "22.22 (n=9)"],
    ]


def test_report_csv_without_difference_and_empty_column():
    models = [*MODELS, {"id": 3, "mode": "baseline", "label": "baseline #2"}]
    rows = list(
        csv.reader(io.StringIO(report_csv(plausibility_report(JUDGEMENTS, models, CRITERIA))))
    )
    assert rows[0][-1] == "p (Holm-adjusted over 0 classes)"
    assert rows[1] == [
        "basophil",
        "50.00 (n=2; 4 reviews)",
        "50.00 (n=2; 4 reviews)",
        "n/a (n=0; 0 reviews)",
        "",
        "",
        "",
        "",
    ]
    assert rows[3] == ["average (macro)", "25.00", "58.33", "n/a", "", "", "", ""]
    assert rows[-1] == ["Nucleus", "25.00 (n=8)", "22.22 (n=9)", "n/a (n=0)"]


# --- the image as the unit -----------------------------------------------------------------------


def panel(plausible: dict[int, int], reviewers: Sequence[str], n: int = 20) -> list[Judgement]:
    """n images per model (1 = baseline, 2 = prototype), the first ``plausible[model]`` of them
    plausible, each judged identically by every reviewer."""
    return [
        verdict(100 * model + i, "basophil", model, who, P if i < plausible[model] else F, P)
        for model in (1, 2)
        for i in range(n)
        for who in reviewers
    ]


def without_reviews(report: dict[str, Any]) -> dict[str, Any]:
    """The report's statistics: verdict counts, criteria, agreement and filters left out."""
    out = json.loads(json.dumps(report))
    for part in [*(c["models"] for c in out["classes"]), out["average"]["pooled"]]:
        for e in part.values():
            e.pop("reviews")
    for c in out["classes"]:
        c.pop("criteria")
    for key in ("criteria_failure", "agreement", "filters"):
        out.pop(key)
    return out


def test_identical_reviewers_do_not_multiply_n():
    # 20 images per model, one reviewer finds 8 (40%) and 14 (70%) plausible.
    # Fisher's exact p for 8/20 vs 14/20: 0.1110 (scipy.stats.fisher_exact), the interval
    # includes 0. Two more reviewers with identical verdicts are the same evidence about the
    # same 40 images: counting each verdict as a sample gave 24/60 vs 42/60, p = 0.0017.
    one = as_json(plausibility_report(panel({1: 8, 2: 14}, ["ann"]), MODELS, CRITERIA))
    three = plausibility_report(panel({1: 8, 2: 14}, ["ann", "bob", "cat"]), MODELS, CRITERIA)
    diff = one["classes"][0]["difference"]
    assert diff["p_value"] == pytest.approx(0.1110, abs=1e-4)
    assert diff["p_value"] == pytest.approx(fisher_p(8, 20, 14, 20))
    assert diff["ci"] == pytest.approx(newcombe_difference(8, 20, 14, 20))
    assert diff["ci"][0] < 0 < diff["ci"][1]
    base = one["classes"][0]["models"]["1"]
    assert (base["images"], base["plausible"], base["rate"]) == (20, 8, 0.4)
    assert base["ci"] == pytest.approx(wilson(8, 20))
    # Exactly the one-reviewer answer: rates, intervals, p (raw, Holm, CMH), macro, pooled.
    assert without_reviews(as_json(three)) == without_reviews(one)
    assert three.classes[0].models["1"].reviews == 60 and three.agreement is not None
    assert three.agreement.kappa == 1.0


def test_majority_and_ties():
    # Three reviewers, one dissenting: the majority decides. Two reviewers split: a tie,
    # counted implausible (and counted as a tie).
    js = [
        verdict(1, "basophil", 2, "ann", P, P),
        verdict(1, "basophil", 2, "bob", P, P),
        verdict(1, "basophil", 2, "cat", F, P),  # 2 of 3 plausible: plausible
        verdict(2, "basophil", 2, "ann", F, P),
        verdict(2, "basophil", 2, "bob", F, P),
        verdict(2, "basophil", 2, "cat", P, P),  # 1 of 3: implausible
        verdict(3, "basophil", 2, "ann", P, P),
        verdict(3, "basophil", 2, "bob", F, P),  # tie
        # a reviewer judging an image twice counts once, with the later verdict
        verdict(4, "basophil", 2, "ann", F, P),
        verdict(4, "basophil", 2, "ann", P, P),
    ]
    got = plausibility_report(js, MODELS, CRITERIA).classes[0].models["2"]
    assert (got.images, got.reviews, got.plausible, got.ties) == (4, 10, 2, 1)
    assert got.rate == 0.5


def test_stratified_test_respects_the_classes():
    # Within each class the models are alike (90% vs 90%, 10% vs 10%), but the prototype has
    # more images of the easy class: pooled over classes, 13/50 vs 37/50 looks like a large
    # difference (unstratified Fisher p < 0.001); stratified by class there is none (CMH: the
    # observed prototype counts equal their expectations, X^2 = 0, p = 1, common OR = 1).
    def cls(name: str, model: int, yes: int, n: int) -> list[Judgement]:
        return [
            verdict(
                1000 * model + 100 * (name == "hard") + i,
                name,
                model,
                "ann",
                P if i < yes else F,
                P,
            )
            for i in range(n)
        ]

    js = cls("easy", 1, 9, 10) + cls("easy", 2, 36, 40) + cls("hard", 1, 4, 40)
    js += cls("hard", 2, 1, 10)
    report = plausibility_report(js, MODELS, CRITERIA)
    assert report.average.difference is not None and report.average.difference.p_value < 0.001
    s = report.average.stratified
    assert s is not None and s.strata == ["easy", "hard"]
    assert (s.statistic, s.p_value, s.odds_ratio) == pytest.approx((0.0, 1.0, 1.0))
    assert all(c.difference is not None and c.difference.value == 0 for c in report.classes)


def test_openapi_publishes_the_report_schema():
    # GET /reports/plausibility answers with the typed report, so the spec carries its schema
    # (and still names the CSV).
    from api.main import create_app

    spec = create_app().openapi()
    content = spec["paths"]["/reports/plausibility"]["get"]["responses"]["200"]["content"]
    assert "text/csv" in content
    ref = content["application/json"]["schema"]["$ref"]
    schemas = spec["components"]["schemas"]
    report = schemas[ref.rsplit("/", 1)[-1]]
    assert set(report["properties"]) >= {
        "methods",
        "models",
        "baseline_id",
        "prototype_id",
        "classes",
        "average",
        "criteria",
        "criteria_failure",
        "agreement",
        "kept_apart",
        "filters",
    }
    assert set(schemas["ClassRow"]["properties"]) == {
        "class",
        "models",
        "difference",
        "criteria",
        "real",
        "versus_real",
    }
    assert {
        "images",
        "reviews",
        "plausible",
        "ties",
        "rate",
        "ci",
        "kept_apart",
        "incomplete",
    } == set(schemas["RateEntry"]["properties"])
    assert "sample" in schemas["Methods"]["properties"]
    review = schemas["ReviewRequest"]["properties"]  # the selection is published too
    assert {"select", "per_batch", "random_share"} <= set(review)
    assert "selected" in schemas["ReviewAccepted"]["properties"]
    assert "p_holm" in schemas["ClassDifference"]["properties"]
    assert "stratified" in schemas["Average"]["properties"]


def test_import_is_light():
    # The API imports this module at start: no scipy/sklearn/torch at import time. (What is
    # imported is the check; a wall-clock bound would only measure the machine's load.)
    code = (
        "import sys; import service.reports; "
        "print(any(m.split('.')[0] in ('scipy', 'sklearn', 'torch') for m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.split() == ["False"]
