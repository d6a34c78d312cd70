"""service.reports: interval, test and kappa statistics against published or hand-computed values,
and a full plausibility report on a small hand-made set of verdicts, every number worked by hand.

z = 1.959964, z^2 = 3.841459 throughout. Wilson: d = 1 + z^2/n, centre c = (p + z^2/2n)/d,
half-width h = z/d * sqrt(p(1-p)/n + z^2/4n^2), interval c -+ h.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.reports import (
    Judgement,
    agreement,
    cohen_kappa,
    fisher_p,
    fleiss_kappa,
    newcombe_difference,
    plausibility_report,
    report_csv,
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
        agreement(js),
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
        agreement(js),
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
    assert (result["method"], result["items"], result["raters"]) == ("fleiss", 1, 3)
    assert result["kappa"] == pytest.approx(-0.5)


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


# 2 models x 2 classes x 2 reviewers (ann, bob); image 205 is rated by ann alone.
#   image cls         model  ann (size, nucleus)   bob (size, nucleus)
#   101   basophil    1      P P  -> yes           P P  -> yes
#   102   basophil    1      F P  -> no            F F  -> no
#   201   basophil    2      P P  -> yes           P P  -> yes
#   202   basophil    2      P P  -> yes           NA F -> no
#   103   neutrophil  1      P F  -> no            P P  -> yes
#   104   neutrophil  1      F P  -> no            F P  -> no
#   203   neutrophil  2      P P  -> yes           P P  -> yes
#   204   neutrophil  2      P P  -> yes           NA P -> yes
#   205   neutrophil  2      P F  -> no            -
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


# Wilson intervals used below (d = 1 + z^2/n; c, h as in the module docstring):
#   2/4: d = 1.960365, c = 0.5,      h = 0.349961 -> [0.150039, 0.849961]
#   3/4: d = 1.960365, c = 0.627527, h = 0.326885 -> [0.300642, 0.954413]
#   1/4: d = 1.960365, c = 0.372473, h = 0.326885 -> [0.045587, 0.699358]
#   4/5: d = 1.768292, c = 0.669655, h = 0.294121 -> [0.375535, 0.963776]
#   3/8: d = 1.480182, c = 0.415551, h = 0.278707 -> [0.136844, 0.694258]
#   7/9: d = 1.426829, c = 0.694682, h = 0.242093 -> [0.452589, 0.936775]
# Fisher two-sided p (hypergeometric, X = baseline plausible):
#   basophil [[2,2],[3,1]]: C(5,x)C(3,4-x)/70 = 5,30,30,5 (x=1..4); x=2 -> all no likelier: 1.0
#   neutrophil [[1,3],[4,1]]: C(5,x)C(4,4-x)/126 = 1,20,60,40,5 (x=0..4); x=1 (20):
#     1 + 20 + 5 = 26/126 = 0.206349
#   pooled [[3,5],[7,2]]: C(10,x)C(7,8-x)/24310 = 10,315,2520,7350,8820,4410,840,45 (x=1..8);
#     x=3 (2520): 10 + 315 + 2520 + 840 + 45 = 3730/24310 = 0.153435
# Newcombe (p2 - p1 = d; lower = d - sqrt((p2-l2)^2 + (u1-p1)^2),
#                        upper = d + sqrt((u2-p2)^2 + (p1-l1)^2)):
#   basophil 2/4 vs 3/4: d = 0.25, [-0.319558, 0.655287] (worked in test_newcombe_small_counts)
#   neutrophil 1/4 vs 4/5: d = 0.55;
#     lower = 0.55 - sqrt((0.8-0.375535)^2 + (0.699358-0.25)^2) = 0.55 - sqrt(0.180171+0.201923)
#           = 0.55 - 0.618137 = -0.068137
#     upper = 0.55 + sqrt((0.963776-0.8)^2 + (0.25-0.045587)^2) = 0.55 + sqrt(0.026822+0.041785)
#           = 0.55 + 0.261930 = 0.811930
#   pooled 3/8 vs 7/9: d = 0.777778 - 0.375 = 0.402778;
#     lower = 0.402778 - sqrt((0.777778-0.452589)^2 + (0.694258-0.375)^2)
#           = 0.402778 - sqrt(0.105748 + 0.101926) = 0.402778 - 0.455712 = -0.052934
#     upper = 0.402778 + sqrt((0.936775-0.777778)^2 + (0.375-0.136844)^2)
#           = 0.402778 + sqrt(0.025280 + 0.056718) = 0.402778 + 0.286353 = 0.689131
EXPECTED: dict[str, Any] = {
    "models": MODELS,
    "baseline_id": 1,
    "prototype_id": 2,
    "classes": [
        {
            "class": "basophil",
            "models": {
                "1": {
                    "images": 2,
                    "reviews": 4,
                    "plausible": 2,
                    "rate": 0.5,
                    "ci": [0.150039, 0.849961],
                },
                "2": {
                    "images": 2,
                    "reviews": 4,
                    "plausible": 3,
                    "rate": 0.75,
                    "ci": [0.300642, 0.954413],
                },
            },
            "difference": {
                "value": 0.25,
                "ci": [-0.319558, 0.655287],
                "p_value": 1.0,
                "test": "fisher-exact",
            },
            "criteria": {
                # model 1: size fails ann-102, bob-102 (2/4); nucleus fails bob-102 (1/4)
                "1": {"cell_size": crit(2, 4), "nucleus": crit(1, 4)},
                # model 2: size na on bob-202 (0/3); nucleus fails bob-202 (1/4)
                "2": {"cell_size": crit(0, 3), "nucleus": crit(1, 4)},
            },
        },
        {
            "class": "neutrophil",
            "models": {
                "1": {
                    "images": 2,
                    "reviews": 4,
                    "plausible": 1,
                    "rate": 0.25,
                    "ci": [0.045587, 0.699358],
                },
                "2": {
                    "images": 3,
                    "reviews": 5,
                    "plausible": 4,
                    "rate": 0.8,
                    "ci": [0.375535, 0.963776],
                },
            },
            "difference": {
                "value": 0.55,
                "ci": [-0.068137, 0.811930],
                "p_value": 26 / 126,
                "test": "fisher-exact",
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
        # macro: (0.5 + 0.25)/2 = 0.375; (0.75 + 0.8)/2 = 0.775 (pooled 7/9 differs)
        "macro": {"1": 0.375, "2": 0.775},
        # both models were judged on both classes: the same averages, 0.775 - 0.375
        "macro_difference": {
            "value": 0.4,
            "baseline": 0.375,
            "prototype": 0.775,
            "classes": ["basophil", "neutrophil"],
            "left_out": [],
        },
        "pooled": {
            "1": {
                "images": 4,
                "reviews": 8,
                "plausible": 3,
                "rate": 0.375,
                "ci": [0.136844, 0.694258],
            },
            "2": {
                "images": 5,
                "reviews": 9,
                "plausible": 7,
                "rate": 7 / 9,
                "ci": [0.452589, 0.936775],
            },
        },
        "difference": {
            "value": 7 / 9 - 3 / 8,
            "ci": [-0.052934, 0.689131],
            "p_value": 3730 / 24310,
            "test": "fisher-exact",
        },
    },
    "criteria": CRITERIA,
    "criteria_failure": {
        "1": {"cell_size": crit(4, 8), "nucleus": crit(2, 8)},
        "2": {"cell_size": crit(0, 7), "nucleus": crit(2, 9)},
    },
    # 8 images rated by both: disagree on 202 and 103 only, p_o = 6/8 = 0.75; ann yes on
    # 101, 201, 202, 203, 204 (5/8), bob on 101, 201, 103, 203, 204 (5/8):
    # p_e = 25/64 + 9/64 = 34/64; kappa = (48/64 - 34/64)/(30/64) = 14/30 = 0.466667.
    "agreement": {
        "method": "cohen",
        "kappa": 14 / 30,
        "items": 8,
        "raters": 2,
        "reviewers": ["ann", "bob"],
        "percent_agreement": 75.0,
    },
}


def test_report_by_hand():
    report = plausibility_report(JUDGEMENTS, MODELS, CRITERIA)
    close(report, EXPECTED)
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable, str keys, no NaN


def test_report_ignores_other_models_and_orders_classes():
    other = verdict(999, "aaa", 7, "cat", F, F)
    report = plausibility_report([other, *reversed(JUDGEMENTS)], MODELS, CRITERIA)
    close(report, EXPECTED)


def test_report_empty_column_and_no_baseline():
    models = [*MODELS, {"id": 3, "mode": "baseline", "label": "baseline #2"}]
    # Two baselines: none is chosen, so there is no difference anywhere.
    report = plausibility_report(JUDGEMENTS, models, CRITERIA)
    assert report["baseline_id"] is None and report["prototype_id"] == 2
    assert all(c["difference"] is None for c in report["classes"])
    assert report["average"]["difference"] is None
    assert report["average"]["macro_difference"] is None
    empty = {"images": 0, "reviews": 0, "plausible": 0, "rate": None, "ci": [0.0, 1.0]}
    for c in report["classes"]:
        assert c["models"]["3"] == empty
        assert c["criteria"]["3"] == {"cell_size": crit(0, 0), "nucleus": crit(0, 0)}
    assert report["average"]["macro"]["3"] is None
    assert report["average"]["pooled"]["3"] == empty
    # Naming the baseline brings the differences back, the same as before.
    named = plausibility_report(JUDGEMENTS, models, CRITERIA, baseline_id=1)
    close(named["classes"][0]["difference"], EXPECTED["classes"][0]["difference"])
    # Only prototype judgements: a baseline column with no reviews means no difference either.
    protos = [x for x in JUDGEMENTS if x.model_id == 2]
    only = plausibility_report(protos, MODELS, CRITERIA)
    assert only["baseline_id"] == 1
    assert all(c["difference"] is None for c in only["classes"])
    with pytest.raises(ValueError):
        plausibility_report(JUDGEMENTS, MODELS, CRITERIA, baseline_id=3)


def test_report_macro_skips_classes_without_reviews():
    # Baseline judged on basophil only (2/4): its macro is 0.5, not (0.5 + 0)/2; its neutrophil
    # cell is empty and the neutrophil difference is None. Prototype macro stays 0.775.
    js = [x for x in JUDGEMENTS if not (x.model_id == 1 and x.class_name == "neutrophil")]
    report = plausibility_report(js, MODELS, CRITERIA)
    close(report["average"]["macro"], {"1": 0.5, "2": 0.775})
    assert report["classes"][1]["models"]["1"]["reviews"] == 0
    assert report["classes"][1]["difference"] is None
    close(report["classes"][0]["difference"], EXPECTED["classes"][0]["difference"])
    # The difference compares like with like: basophil only, where both were judged
    # (0.75 - 0.5), not 0.775 - 0.5 over different class sets; and it says so.
    close(
        report["average"]["macro_difference"],
        {"value": 0.25, "baseline": 0.5, "prototype": 0.75, "classes": ["basophil"],
         "left_out": ["neutrophil"]},
    )  # fmt: skip
    rows = list(csv.reader(io.StringIO(report_csv(report))))
    assert rows[3] == ["average (macro)", "50.00", "77.50", "25.00", "", ""]
    assert rows[5] == [
        "macro difference over classes", "basophil", "left out (not judged for both): neutrophil"
    ]  # fmt: skip
    # No class judged for both: no macro difference, and the note says why.
    only_base = [x for x in JUDGEMENTS if x.model_id == 1 and x.class_name == "basophil"]
    only_proto = [x for x in JUDGEMENTS if x.model_id == 2 and x.class_name == "neutrophil"]
    apart = plausibility_report(only_base + only_proto, MODELS, CRITERIA)
    close(
        apart["average"]["macro_difference"],
        {"value": None, "baseline": None, "prototype": None, "classes": [],
         "left_out": ["basophil", "neutrophil"]},
    )  # fmt: skip
    rows = list(csv.reader(io.StringIO(report_csv(apart))))
    assert rows[3] == ["average (macro)", "50.00", "80.00", "", "", ""]
    assert rows[5][:2] == ["macro difference over classes", "none"]


def test_report_rejects_unknown_criterion_verdict():
    bad = verdict(1, "basophil", 1, "ann", "maybe", P)
    with pytest.raises(ValueError):
        plausibility_report([bad], MODELS, CRITERIA)


def test_report_csv_rows():
    text = report_csv(plausibility_report(JUDGEMENTS, MODELS, CRITERIA))
    rows = list(csv.reader(io.StringIO(text)))
    # Percentages from the hand values above: CIs in pp to 1 decimal, p to 2.
    assert rows == [
        ["class", "baseline #1 (%)", "prototype #1 (%)", "difference (pp)", "95% CI", "p"],
        ["basophil", "50.00 (n=4)", "75.00 (n=4)", "25.00", "[-32.0; 65.5]", "1.00"],
        ["neutrophil", "25.00 (n=4)", "80.00 (n=5)", "55.00", "[-6.8; 81.2]", "0.21"],
        ["average (macro)", "37.50", "77.50", "40.00", "", ""],
        ["pooled", "37.50 (n=8)", "77.78 (n=9)", "40.28", "[-5.3; 68.9]", "0.15"],
        ["macro difference over classes", "basophil; neutrophil"],
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
    assert rows[1] == ["basophil", "50.00 (n=4)", "75.00 (n=4)", "n/a (n=0)", "", "", ""]
    assert rows[3] == ["average (macro)", "37.50", "77.50", "n/a", "", "", ""]
    assert rows[-1] == ["Nucleus", "25.00 (n=8)", "22.22 (n=9)", "n/a (n=0)"]


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
