"""Plausibility report: expert verdicts turned into the seed paper's Tables 3-4.

Per class, the share of generated images that reviewers judged plausible, for each model column
(baseline vs prototype-guided), with Wilson intervals, the prototype-minus-baseline difference
(Newcombe's hybrid score interval, Fisher's exact test), per-criterion failure rates and
inter-reviewer agreement (Cohen's or Fleiss' kappa).

Pure and torch-free, with no web code, so the API and the CLI can both use it and it is cheap to
test. scipy is imported only inside :func:`fisher_p` (importing ``scipy.stats`` takes about half a
second, too slow for the API's start).

Unit of counting: one :class:`Judgement`, i.e. one reviewer's verdict on one image; ``images``
counts distinct images. Rates and interval limits are fractions in [0, 1] and are left unrounded
(rounding is the presentation's job, see :func:`report_csv`); ``percent_agreement`` alone is a
percentage, as its name says. Dict keys naming models are ``str(model_id)`` so a report survives a
JSON round trip unchanged.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ml.intervals import CONFIDENCE as CONFIDENCE  # re-exported
from ml.intervals import check_counts as _check_counts
from ml.intervals import newcombe_difference, wilson
from service.criteria import VERDICTS


@dataclass(frozen=True)
class Judgement:
    """One reviewer's verdict on one generated image."""

    image_id: int
    class_name: str
    model_id: int
    mode: str  # "baseline" | "prototype"
    reviewer: str
    plausible: bool  # already derived: any failed criterion => False
    criteria: dict[str, str]  # criterion key -> "pass" | "fail" | "na"


# --- proportions ---------------------------------------------------------------------------------
# wilson and newcombe_difference live in ml.intervals (torch-free, shared with the demo) and are
# re-exported here.


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p for k1/n1 vs k2/n2: exact, as counts per class are small."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    from scipy.stats import fisher_exact  # slow import, kept out of the module's import

    _, p = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided")
    return min(1.0, float(p))


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


def agreement(judgements: Sequence[Judgement]) -> dict[str, Any] | None:
    """Inter-reviewer agreement on the plausible/implausible verdict.

    None with fewer than 2 reviewers or no image rated by >= 2 of them. Exactly 2 reviewers:
    Cohen's kappa on the images both rated. More: Fleiss' kappa on the images rated by the most
    common number m >= 2 of reviewers (ties: the larger m, more raters per item), since Fleiss
    needs the same number of ratings per item. A reviewer judging one image twice counts once,
    with the later verdict. ``percent_agreement`` is the observed pairwise agreement in percent;
    ``reviewers`` are those who rated the items used.
    """
    by_image: dict[int, dict[str, bool]] = defaultdict(dict)
    for j in judgements:
        by_image[j.image_id][j.reviewer] = bool(j.plausible)
    all_reviewers = {r for verdicts in by_image.values() for r in verdicts}
    if len(all_reviewers) < 2:
        return None
    if len(all_reviewers) == 2:
        first, second = sorted(all_reviewers)
        both = [v for v in by_image.values() if len(v) == 2]
        if not both:
            return None
        a, b = [v[first] for v in both], [v[second] for v in both]
        same = sum(x == y for x, y in zip(a, b, strict=True))
        return {
            "method": "cohen",
            "kappa": cohen_kappa(a, b),
            "items": len(both),
            "raters": 2,
            "reviewers": [first, second],
            "percent_agreement": 100.0 * same / len(both),
        }
    sizes = Counter(len(v) for v in by_image.values() if len(v) >= 2)
    if not sizes:
        return None
    m = max(sizes, key=lambda size: (sizes[size], size))
    items = [v for v in by_image.values() if len(v) == m]
    table = [[sum(v.values()), m - sum(v.values())] for v in items]
    pairwise = sum((y * y + n * n - m) / (m * (m - 1)) for y, n in table) / len(table)
    return {
        "method": "fleiss",
        "kappa": fleiss_kappa(table),
        "items": len(items),
        "raters": m,
        "reviewers": sorted({r for v in items for r in v}),
        "percent_agreement": 100.0 * pairwise,
    }


# --- the report ----------------------------------------------------------------------------------


def _rate_entry(js: Sequence[Judgement]) -> dict[str, Any]:
    """Counts, rate and Wilson interval for one model over some judgements."""
    n = len(js)
    k = sum(bool(j.plausible) for j in js)
    lo, hi = wilson(k, n)
    return {
        "images": len({j.image_id for j in js}),
        "reviews": n,
        "plausible": k,
        "rate": k / n if n else None,
        "ci": [lo, hi],
    }


def _difference(base: dict[str, Any], proto: dict[str, Any]) -> dict[str, Any] | None:
    """Prototype minus baseline rate, with interval and exact p; None if a side has no reviews."""
    k1, n1, k2, n2 = base["plausible"], base["reviews"], proto["plausible"], proto["reviews"]
    if n1 == 0 or n2 == 0:
        return None
    lo, hi = newcombe_difference(k1, n1, k2, n2)
    return {
        "value": k2 / n2 - k1 / n1,
        "ci": [lo, hi],
        "p_value": fisher_p(k1, n1, k2, n2),
        "test": "fisher-exact",
    }


def _criteria_failure(js: Iterable[Judgement], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per criterion, failures among the judgements that judged it ("na" or absent: not judged)."""
    fail = dict.fromkeys(keys, 0)
    judged = dict.fromkeys(keys, 0)
    for j in js:
        for key in keys:
            verdict = j.criteria.get(key, "na")
            if verdict not in VERDICTS:
                raise ValueError(f"image {j.image_id}: criterion {key!r} is {verdict!r}")
            if verdict != "na":
                judged[key] += 1
                fail[key] += verdict == "fail"
    return {
        key: {
            "fail": fail[key],
            "judged": judged[key],
            "rate": fail[key] / judged[key] if judged[key] else None,
        }
        for key in keys
    }


def _macro_difference(
    classes: Sequence[dict[str, Any]], baseline_id: int | None, prototype_id: int | None
) -> dict[str, Any] | None:
    """Prototype minus baseline of the macro averages, both taken over the classes that both
    models were judged on: each model's own macro (``average.macro``) may cover other classes
    (one model unreviewed on a class), and a difference of averages over different class sets
    would compare unlike things. Names the classes used and those left out; None without a
    baseline and a prototype column."""
    if baseline_id is None or prototype_id is None:
        return None
    b, p = str(baseline_id), str(prototype_id)
    both = [c for c in classes if None not in (c["models"][b]["rate"], c["models"][p]["rate"])]
    names = [c["class"] for c in both]
    left_out = [c["class"] for c in classes if c["class"] not in names]
    if not both:
        return {"value": None, "baseline": None, "prototype": None, "classes": [],
                "left_out": left_out}  # fmt: skip
    mb = sum(c["models"][b]["rate"] for c in both) / len(both)
    mp = sum(c["models"][p]["rate"] for c in both) / len(both)
    return {"value": mp - mb, "baseline": mb, "prototype": mp, "classes": names,
            "left_out": left_out}  # fmt: skip


def _only(models: Sequence[dict[str, Any]], mode: str) -> int | None:
    ids = [m["id"] for m in models if m.get("mode") == mode]
    return ids[0] if len(ids) == 1 else None


def plausibility_report(
    judgements: Sequence[Judgement],
    models: Sequence[dict[str, Any]],
    criteria: Sequence[dict[str, Any]],
    *,
    baseline_id: int | None = None,
    prototype_id: int | None = None,
) -> dict[str, Any]:
    """The Tables 3-4 report as a JSON-serialisable dict (shape: see the module and the API).

    ``models`` are the columns, in order; judgements of other models are left out (of the
    agreement too). Without explicit ids, the baseline/prototype is the only model of that mode
    among ``models``, else None, and then there is no difference. Classes are those judged for
    these models, sorted by name. Criterion keys not in ``criteria`` are ignored.
    """
    ids = [m["id"] for m in models]
    if len(set(ids)) != len(ids):
        raise ValueError(f"model ids repeat: {ids}")
    for name, given in (("baseline_id", baseline_id), ("prototype_id", prototype_id)):
        if given is not None and given not in ids:
            raise ValueError(f"{name}={given} is not among the models {ids}")
    if baseline_id is None:
        baseline_id = _only(models, "baseline")
    if prototype_id is None:
        prototype_id = _only(models, "prototype")
    keys = [c["key"] for c in criteria]
    wanted = set(ids)
    used = [j for j in judgements if j.model_id in wanted]

    cells: dict[tuple[str, int], list[Judgement]] = defaultdict(list)
    for j in used:
        cells[(j.class_name, j.model_id)].append(j)
    by_model = {mid: [j for j in used if j.model_id == mid] for mid in ids}

    def difference(entries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        if baseline_id is None or prototype_id is None:
            return None
        return _difference(entries[str(baseline_id)], entries[str(prototype_id)])

    classes: list[dict[str, Any]] = []
    for cls in sorted({j.class_name for j in used}):
        entries = {str(mid): _rate_entry(cells[(cls, mid)]) for mid in ids}
        classes.append(
            {
                "class": cls,
                "models": entries,
                "difference": difference(entries),
                "criteria": {str(mid): _criteria_failure(cells[(cls, mid)], keys) for mid in ids},
            }
        )

    macro: dict[str, float | None] = {}
    for mid in ids:
        rates = [c["models"][str(mid)]["rate"] for c in classes]
        rates = [r for r in rates if r is not None]
        macro[str(mid)] = sum(rates) / len(rates) if rates else None
    pooled = {str(mid): _rate_entry(by_model[mid]) for mid in ids}

    return {
        "models": [dict(m) for m in models],
        "baseline_id": baseline_id,
        "prototype_id": prototype_id,
        "classes": classes,
        "average": {
            "macro": macro,
            "macro_difference": _macro_difference(classes, baseline_id, prototype_id),
            "pooled": pooled,
            "difference": difference(pooled),
        },
        "criteria": [dict(c) for c in criteria],
        "criteria_failure": {str(mid): _criteria_failure(by_model[mid], keys) for mid in ids},
        "agreement": agreement(used),
    }


# --- CSV -----------------------------------------------------------------------------------------


def pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f}"


def _p(p: float) -> str:
    """APA-like: two decimals, three below 0.01, and '<0.001' below that."""
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def diff_cells(diff: dict[str, Any] | None) -> list[str]:
    if diff is None:
        return ["", "", ""]
    lo, hi = diff["ci"]
    return [f"{100 * diff['value']:.2f}", f"[{100 * lo:.1f}; {100 * hi:.1f}]", _p(diff["p_value"])]


def macro_difference(report: dict[str, Any]) -> str:
    """Prototype minus baseline of the macro rates over the classes both were judged on, in
    points ("" without both)."""
    diff = report["average"].get("macro_difference")
    return "" if diff is None or diff["value"] is None else f"{100 * diff['value']:.2f}"


def macro_classes(report: dict[str, Any]) -> list[str] | None:
    """The CSV's (and dashboard's) note on the macro difference: the classes it averages over,
    and those left out because one of the two models was not judged on them; None without a
    difference."""
    diff = report["average"].get("macro_difference")
    if diff is None:
        return None
    note = ["macro difference over classes", "; ".join(diff["classes"]) or "none"]
    if diff["left_out"]:
        note.append(f"left out (not judged for both): {'; '.join(diff['left_out'])}")
    return note


def report_csv(report: dict[str, Any]) -> str:
    """The report laid out as the paper's Tables 3-4, for spreadsheets and the appendix.

    Rates in percent to 2 decimals with the number of reviews, the difference in percentage
    points, its 95% CI to 1 decimal, then macro-average and pooled rows; after a blank line, the
    per-criterion failure rates (n = verdicts that judged the criterion). The macro row's
    difference is the plain difference of the two models' macro rates over the classes both
    were judged on, with no CI or p; the row after the pooled one names those classes.
    """
    models = report["models"]
    mids = [str(m["id"]) for m in models]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["class", *(f"{m['label']} (%)" for m in models), "difference (pp)", "95% CI", "p"])
    for c in report["classes"]:
        cols = [f"{pct(c['models'][i]['rate'])} (n={c['models'][i]['reviews']})" for i in mids]
        w.writerow([c["class"], *cols, *diff_cells(c["difference"])])

    avg = report["average"]
    macro = avg["macro"]
    w.writerow(
        ["average (macro)", *(pct(macro[i]) for i in mids), macro_difference(report), "", ""]
    )
    pooled = avg["pooled"]
    cols = [f"{pct(pooled[i]['rate'])} (n={pooled[i]['reviews']})" for i in mids]
    w.writerow(["pooled", *cols, *diff_cells(avg["difference"])])
    note = macro_classes(report)
    if note is not None:
        w.writerow(note)

    w.writerow([])
    w.writerow(["criterion", *(f"{m['label']} fail %" for m in models)])
    failure = report["criteria_failure"]
    for crit in report["criteria"]:
        key = crit["key"]
        cols = [f"{pct(failure[i][key]['rate'])} (n={failure[i][key]['judged']})" for i in mids]
        w.writerow([crit.get("label", key), *cols])
    return out.getvalue()
