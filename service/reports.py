"""Plausibility report: expert verdicts turned into the seed paper's Tables 3-4.

Per class, the share of generated images that reviewers judged plausible, for each model column
(baseline vs prototype-guided), with Wilson intervals, the prototype-minus-baseline difference
(Newcombe's hybrid score interval, Fisher's exact test, Holm-adjusted over the classes), a
pooled comparison stratified by class (Cochran-Mantel-Haenszel), per-criterion failure rates and
inter-reviewer agreement (Cohen's or Fleiss' kappa). The result is a typed
:class:`~service.report_schemas.PlausibilityReport`.

**The image is the unit.** The models generated images; reviewers are repeated measurements of
each image, not more images. Counting every verdict as a sample (as this module did before)
multiplies n by the number of reviewers: three reviewers giving identical verdicts on 20 images
per model turned p = 0.11 into p = 0.0017. So each image gets one verdict, its reviewers'
**majority** (a reviewer judging it twice counts once, with the later verdict), and rates,
intervals and tests count images. A **tie counts as implausible**: an image is called plausible
only when more of its reviewers accepted it than rejected it, the same strict reading as "one
failed criterion makes an image implausible"; with two reviewers that means both. The rule is
the same for both models, so it favours neither. Why majority rather than the mean verdict or a
mixed model: a binary per-image outcome keeps the exact small-sample methods (Wilson, Newcombe,
Fisher, CMH) that per-class counts of a few dozen images need, it reduces to the plain verdict
with one reviewer per image, and unanimous extra reviewers leave every number unchanged. What
it gives up: a split image counts as fully implausible; ``ties`` says how many there were.
Reviewer disagreement itself is reported as agreement (kappa), over verdicts.

**Several classes.** Each class's Fisher p is reported raw and Holm-adjusted over the k classes
compared (``p_holm``). The pooled row pools images over classes (rates, Newcombe interval and an
unstratified Fisher p, descriptive); the pooled *test* is ``average.stratified``: the
Cochran-Mantel-Haenszel test stratified by class with the Mantel-Haenszel common odds ratio, so
a model that merely had more images of an easy class does not look better.

**Only the random sample counts.** A review task is ``random`` (its image belongs to a simple
random sample of its batch; a batch sent whole is one) or ``uncertain`` (the domain's scorer was
least sure about it: ``service/selection.py``). A simple random sample's rate estimates its
batch's without bias; the uncertain picks are chosen by a function of the image, so they lean
towards borderline images and would pull a model's rate towards however its borderline images
were judged. So every number here (rates, intervals, tests, failure rates, agreement) is over
the random sample's verdicts alone, and the uncertain picks appear only as ``kept_apart`` counts
(per class and model, per model, in all). Agreement too: kappa depends on how hard the items
are, so borderline picks would make the reported reliability depend on the share an admin
chose. Their verdicts still train the scorer, which reads the reviews, not this report.

Per-criterion failure rates count verdicts (each reviewer's reading of each criterion) and carry
no test. Pure and torch-free, with no web code, so the API and the CLI can both use it; scipy is
imported only inside :mod:`service.statistics`' functions.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ml.errors import Invalid
from service.criteria import VERDICTS, origin_rating
from service.report_schemas import (
    INDISTINGUISHABLE,
    NOT_SHOWN,
    Agreement,
    Average,
    ClassDifference,
    ClassRow,
    ControlLeak,
    Criterion,
    CriterionFailure,
    Difference,
    MacroDifference,
    Methods,
    ModelColumn,
    OriginDiscrimination,
    OriginScores,
    PlausibilityReport,
    RateEntry,
    Stratified,
    VersusReal,
)
from service.statistics import (
    cohen_kappa,
    fisher_p,
    fleiss_kappa,
    holm,
    mantel_haenszel,
    newcombe_difference,
    wilson,
)
from service.study_statistics import (
    DEFAULT_MARGIN,
    Proportion,
    auc,
    discrimination,
    equivalence_to_chance,
    roc_points,
)

ALPHA = 0.05  # each one-sided test of the equivalence to chance


@dataclass(frozen=True)
class Judgement:
    """One reviewer's verdict on one generated image."""

    image_id: int
    class_name: str
    model_id: int
    mode: str  # "baseline" | "prototype"
    reviewer: str
    # already derived (service.criteria.verdict): any failed criterion => False; None: the
    # verdict is incomplete, counted in ``incomplete`` and nowhere else
    plausible: bool | None
    criteria: dict[str, str]  # criterion key -> "pass" | "fail" | "na"
    # Why the image was reviewed (ReviewSample): "random" (a simple random sample of its batch)
    # counts; "uncertain" (the scorer's pick) is kept apart from every number but a count.
    sample: str = "random"
    flagged: bool = False  # written by someone other than ``reviewer`` (service.reviews)
    reviewer_email: str | None = None  # names the reader in the per-reader scores
    # "Real or synthetic?" (projects that ask it): the answer and the confidence 1..3; None
    # where not asked or not answered
    answered_synthetic: bool | None = None
    origin_confidence: int | None = None


COUNTED = "random"


def _by_image(judgements: Iterable[Judgement]) -> dict[int, dict[str, bool]]:
    """Image -> reviewer -> verdict; a reviewer judging an image twice counts once, with the
    later verdict."""
    by_image: dict[int, dict[str, bool]] = defaultdict(dict)
    for j in complete(judgements):
        by_image[j.image_id][j.reviewer] = bool(j.plausible)
    return by_image


def complete(judgements: Iterable[Judgement]) -> list[Judgement]:
    """The judgements with a verdict (plausible or not): an incomplete one counts nowhere."""
    return [j for j in judgements if j.plausible is not None]


def image_verdicts(judgements: Iterable[Judgement]) -> dict[int, bool]:
    """Each image's one verdict, as the report counts it (module docstring): plausible when
    more of its reviewers accepted it than rejected it (a tie is implausible). The scorer
    (``service/scorers.py``) learns these."""
    return {i: 2 * sum(v.values()) > len(v) for i, v in _by_image(judgements).items()}


def agreement(judgements: Sequence[Judgement]) -> Agreement | None:
    """Inter-reviewer agreement on the plausible/implausible verdict.

    None with fewer than 2 reviewers or no image rated by >= 2 of them. Exactly 2 reviewers:
    Cohen's kappa on the images both rated. More: Fleiss' kappa on the images rated by the most
    common number m >= 2 of reviewers (ties: the larger m, more raters per item), since Fleiss
    needs the same number of ratings per item. ``percent_agreement`` is the observed pairwise
    agreement in percent; ``reviewers`` are those who rated the items used.
    """
    by_image = _by_image(judgements)
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
        return Agreement(
            method="cohen",
            kappa=cohen_kappa(a, b),
            items=len(both),
            raters=2,
            reviewers=[first, second],
            percent_agreement=100.0 * same / len(both),
        )
    sizes = Counter(len(v) for v in by_image.values() if len(v) >= 2)
    if not sizes:
        return None
    m = max(sizes, key=lambda size: (sizes[size], size))
    items = [v for v in by_image.values() if len(v) == m]
    table = [[sum(v.values()), m - sum(v.values())] for v in items]
    pairwise = sum((y * y + n * n - m) / (m * (m - 1)) for y, n in table) / len(table)
    return Agreement(
        method="fleiss",
        kappa=fleiss_kappa(table),
        items=len(items),
        raters=m,
        reviewers=sorted({r for v in items for r in v}),
        percent_agreement=100.0 * pairwise,
    )


# --- the report ----------------------------------------------------------------------------------


def _rate_entry(js: Sequence[Judgement], kept_apart: int = 0, incomplete: int = 0) -> RateEntry:
    """Images, their majority verdicts, rate and Wilson interval for one model: the image is the
    unit (module docstring); ``reviews`` counts the verdicts behind them; ``js`` are counted
    verdicts only, ``kept_apart`` the images and ``incomplete`` the verdicts left out beside
    them."""
    votes = [(sum(v.values()), len(v)) for v in _by_image(js).values()]
    n = len(votes)
    k = sum(2 * yes > m for yes, m in votes)
    return RateEntry(
        images=n,
        reviews=len(js),
        plausible=k,
        ties=sum(2 * yes == m for yes, m in votes),
        rate=k / n if n else None,
        ci=wilson(k, n),
        kept_apart=kept_apart,
        incomplete=incomplete,
    )


def image_rate(js: Sequence[Judgement]) -> RateEntry:
    """Plausibility over some images, the image being the unit (public: the guidance sweep's
    report counts each (class, scale) cell exactly as this report counts a model's class)."""
    return _rate_entry(complete(js))


def _kept_apart(apart: Iterable[Judgement], counted: set[int]) -> int:
    """Reviewed images of ``apart`` (uncertain picks) that no counted verdict covers."""
    return len({j.image_id for j in apart} - counted)


def _difference(base: RateEntry, proto: RateEntry) -> Difference | None:
    """Prototype minus baseline rate over images, with interval and exact p; None if a side has
    no images."""
    k1, n1, k2, n2 = base.plausible, base.images, proto.plausible, proto.images
    if n1 == 0 or n2 == 0:
        return None
    return Difference(
        value=k2 / n2 - k1 / n1,
        ci=newcombe_difference(k1, n1, k2, n2),
        p_value=fisher_p(k1, n1, k2, n2),
    )


def _stratified(
    classes: Mapping[str, tuple[RateEntry, RateEntry]],
) -> Stratified | None:
    """CMH over the classes both models were judged on, rows (prototype, baseline), so an odds
    ratio above 1 favours the prototype; None where the test is undefined."""
    strata = {
        name: ((p.plausible, p.images - p.plausible), (b.plausible, b.images - b.plausible))
        for name, (b, p) in classes.items()
        if b.images and p.images
    }
    result = mantel_haenszel(list(strata.values()))
    if result is None:
        return None
    return Stratified(
        statistic=result.statistic,
        p_value=result.p_value,
        odds_ratio=result.odds_ratio,
        odds_ratio_ci=result.odds_ratio_ci,
        strata=list(strata),
    )


def _criteria_failure(js: Iterable[Judgement], keys: Sequence[str]) -> dict[str, CriterionFailure]:
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
    rates = {key: fail[key] / judged[key] if judged[key] else None for key in keys}
    return {
        key: CriterionFailure(fail=fail[key], judged=judged[key], rate=rates[key]) for key in keys
    }


def _macro_difference(
    classes: Sequence[ClassRow], baseline_id: int | None, prototype_id: int | None
) -> MacroDifference | None:
    """Prototype minus baseline of the macro averages, both taken over the classes that both
    models were judged on: each model's own macro (``average.macro``) may cover other classes
    (one model unreviewed on a class), and a difference of averages over different class sets
    would compare unlike things. Names the classes used and those left out; None without a
    baseline and a prototype column."""
    if baseline_id is None or prototype_id is None:
        return None
    b, p = str(baseline_id), str(prototype_id)
    both = [
        (c.class_name, rb, rp)
        for c in classes
        if (rb := c.models[b].rate) is not None and (rp := c.models[p].rate) is not None
    ]
    names = [name for name, _, _ in both]
    left_out = [c.class_name for c in classes if c.class_name not in names]
    if not both:
        return MacroDifference(
            value=None, baseline=None, prototype=None, classes=[], left_out=left_out
        )
    mb = sum(rb for _, rb, _ in both) / len(both)
    mp = sum(rp for _, _, rp in both) / len(both)
    return MacroDifference(
        value=mp - mb, baseline=mb, prototype=mp, classes=names, left_out=left_out
    )


def _versus_real(real: RateEntry | None, models: Mapping[str, RateEntry]) -> dict[str, VersusReal]:
    """Each model's rate minus the real images' rate, with Newcombe's interval (side 1 the
    real images); only where both have images."""
    if real is None or not real.images:
        return {}
    return {
        mid: VersusReal(
            value=e.plausible / e.images - real.plausible / real.images,
            ci=newcombe_difference(real.plausible, real.images, e.plausible, e.images),
        )
        for mid, e in models.items()
        if e.images
    }


def _origin_scores(answers: Sequence[tuple[bool, Judgement]], margin: float) -> OriginScores:
    """One group's ``(is_synthetic, judgement)`` answers scored (:class:`OriginScores`)."""
    scores = discrimination([(truth, bool(j.answered_synthetic)) for truth, j in answers])
    right = scores.accuracy.k if scores.accuracy is not None else 0
    tost = equivalence_to_chance(right, scores.n, margin, ALPHA) if scores.n else None
    rated = [
        (truth, origin_rating(bool(j.answered_synthetic), j.origin_confidence))
        for truth, j in answers
        if j.origin_confidence is not None
    ]
    both = {truth for truth, _ in rated} == {True, False}
    return OriginScores(
        **dict(scores),
        equivalence=tost,
        claim=INDISTINGUISHABLE if tost is not None and tost.equivalent else NOT_SHOWN,
        rated=len(rated),
        auc=auc([r for t, r in rated if t], [r for t, r in rated if not t]) if both else None,
        roc=roc_points([t for t, _ in rated], [r for _, r in rated]) if both else [],
    )


def origin_discrimination(
    synthetic: Iterable[Judgement], real: Iterable[Judgement], margin: float = DEFAULT_MARGIN
) -> OriginDiscrimination | None:
    """How well readers told ``real`` (control) images from ``synthetic`` ones, pooled, per
    class and per reader (e-mail, else user id): only the judgements given to count (the caller
    passes those) that answered the question; a reader answering an image twice counts once,
    with the later answer. None without any answer. Readers differ, and pooling their reads
    treats an image read by several of them as several answers, so the per-reader scores are
    the ones whose intervals rest on independent answers."""
    latest: dict[tuple[int, str], tuple[bool, Judgement]] = {}
    for truth, js in ((True, synthetic), (False, real)):
        for j in js:
            if j.answered_synthetic is not None:
                latest[(j.image_id, j.reviewer)] = (truth, j)
    answers = list(latest.values())
    if not answers:
        return None

    def group(key: Callable[[Judgement], str]) -> dict[str, OriginScores]:
        groups: dict[str, list[tuple[bool, Judgement]]] = defaultdict(list)
        for a in answers:
            groups[key(a[1])].append(a)
        return {name: _origin_scores(groups[name], margin) for name in sorted(groups)}

    return OriginDiscrimination(
        margin=margin,
        alpha=ALPHA,
        pooled=_origin_scores(answers, margin),
        classes=group(lambda j: j.class_name),
        readers=group(lambda j: j.reviewer_email or j.reviewer),
    )


def _only(models: Sequence[ModelColumn], mode: str) -> int | None:
    ids = [m.id for m in models if m.mode == mode]
    return ids[0] if len(ids) == 1 else None


def plausibility_report(
    judgements: Sequence[Judgement],
    models: Sequence[ModelColumn | Mapping[str, Any]],
    criteria: Sequence[Criterion | Mapping[str, Any]],
    *,
    baseline_id: int | None = None,
    prototype_id: int | None = None,
    controls: Sequence[Judgement] = (),
    leaks: Sequence[ControlLeak] = (),
    margin: float = DEFAULT_MARGIN,
) -> PlausibilityReport:
    """The Tables 3-4 report (shape: :mod:`service.report_schemas`; statistics: the module).

    ``models`` are the columns, in order; judgements of other models are left out (of the
    agreement too). Without explicit ids, the baseline/prototype is the only model of that mode
    among ``models``, else None, and then there is no difference. Classes are those judged for
    these models, sorted by name (a class whose verdicts are all kept apart has a row with no
    rate). Criterion keys not in ``criteria`` are ignored. Only ``random`` judgements are
    counted; the others are counted as ``kept_apart`` images (module docstring).
    ``controls``: verdicts on real control images (their ``model_id`` is ignored), counted per
    class like a model's into ``real`` and each model's ``versus_real``, and with the models'
    counted verdicts into ``discrimination`` where they answered "real or synthetic?"
    (:func:`origin_discrimination`; ``margin``: its equivalence margin).
    """
    columns = [ModelColumn.model_validate(m) for m in models]
    crits = [Criterion.model_validate(c) for c in criteria]
    ids = [m.id for m in columns]
    if len(set(ids)) != len(ids):
        raise Invalid(f"model ids repeat: {ids}")
    for name, given in (("baseline_id", baseline_id), ("prototype_id", prototype_id)):
        if given is not None and given not in ids:
            raise Invalid(f"{name}={given} is not among the models {ids}")
    if baseline_id is None:
        baseline_id = _only(columns, "baseline")
    if prototype_id is None:
        prototype_id = _only(columns, "prototype")
    compared = baseline_id is not None and prototype_id is not None
    keys = [c.key for c in crits]
    wanted = set(ids)
    read = [j for j in judgements if j.model_id in wanted]
    judged = complete(read)
    not_given = Counter((j.class_name, j.model_id) for j in read if j.plausible is None)
    used = [j for j in judged if j.sample == COUNTED]
    apart = [j for j in judged if j.sample != COUNTED]
    counted_images = {j.image_id for j in used}

    cells: dict[tuple[str, int], list[Judgement]] = defaultdict(list)
    apart_cells: dict[tuple[str, int], list[Judgement]] = defaultdict(list)
    for j in used:
        cells[(j.class_name, j.model_id)].append(j)
    for j in apart:
        apart_cells[(j.class_name, j.model_id)].append(j)
    by_model = {mid: [j for j in used if j.model_id == mid] for mid in ids}

    def pair(entries: Mapping[str, RateEntry]) -> tuple[RateEntry, RateEntry]:
        return entries[str(baseline_id)], entries[str(prototype_id)]

    def cell_entry(cls: str, mid: int) -> RateEntry:
        left_out = _kept_apart(apart_cells[(cls, mid)], counted_images)
        return _rate_entry(cells[(cls, mid)], left_out, not_given[(cls, mid)])

    names = sorted({j.class_name for j in read} | {j.class_name for j in controls})
    real_used = [j for j in complete(controls) if j.sample == COUNTED]
    real_not_given = Counter(j.class_name for j in controls if j.plausible is None)
    real = {
        cls: _rate_entry(
            [j for j in real_used if j.class_name == cls], incomplete=real_not_given[cls]
        )
        for cls in {j.class_name for j in controls}
    }
    entries = {cls: {str(mid): cell_entry(cls, mid) for mid in ids} for cls in names}
    diffs = {cls: _difference(*pair(entries[cls])) if compared else None for cls in names}
    tested = [cls for cls in names if diffs[cls] is not None]
    adjusted = dict(zip(tested, holm([d.p_value for d in diffs.values() if d]), strict=True))
    classes = [
        ClassRow(
            class_name=cls,
            models=entries[cls],
            difference=None if d is None else ClassDifference(**dict(d), p_holm=adjusted[cls]),
            criteria={str(mid): _criteria_failure(cells[(cls, mid)], keys) for mid in ids},
            real=real.get(cls),
            versus_real=_versus_real(real.get(cls), entries[cls]),
        )
        for cls, d in diffs.items()
    ]

    macro: dict[str, float | None] = {}
    for mid in ids:
        rates = [r for c in classes if (r := c.models[str(mid)].rate) is not None]
        macro[str(mid)] = sum(rates) / len(rates) if rates else None
    pooled = {
        str(mid): _rate_entry(
            by_model[mid],
            _kept_apart((j for j in apart if j.model_id == mid), counted_images),
            sum(n for (_, m), n in not_given.items() if m == mid),
        )
        for mid in ids
    }

    return PlausibilityReport(
        methods=Methods(holm_classes=len(tested)),
        models=columns,
        baseline_id=baseline_id,
        prototype_id=prototype_id,
        classes=classes,
        average=Average(
            macro=macro,
            macro_difference=_macro_difference(classes, baseline_id, prototype_id),
            pooled=pooled,
            difference=_difference(*pair(pooled)) if compared else None,
            stratified=_stratified({c: pair(entries[c]) for c in names}) if compared else None,
        ),
        criteria=crits,
        criteria_failure={str(mid): _criteria_failure(by_model[mid], keys) for mid in ids},
        agreement=agreement(used),
        kept_apart=_kept_apart(apart, counted_images),
        incomplete=sum(not_given.values()),
        flagged=sum(j.flagged for j in read) + sum(j.flagged for j in controls),
        control_leaks=list(leaks),
        discrimination=origin_discrimination(used, real_used, margin),
    )


# --- CSV -----------------------------------------------------------------------------------------


def pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f}"


def _p(p: float) -> str:
    """APA-like: two decimals, three below 0.01, and '<0.001' below that."""
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def diff_cells(diff: Difference | None) -> list[str]:
    """Difference (pp), its 95% CI, p and, for a class, the Holm-adjusted p ('' where none)."""
    if diff is None:
        return ["", "", "", ""]
    lo, hi = diff.ci
    holm_p = _p(diff.p_holm) if isinstance(diff, ClassDifference) else ""
    ci = f"[{100 * lo:.1f}; {100 * hi:.1f}]"
    return [f"{100 * diff.value:.2f}", ci, _p(diff.p_value), holm_p]


def holm_header(report: PlausibilityReport) -> str:
    return f"p (Holm-adjusted over {report.methods.holm_classes} classes)"


def stratified_cells(report: PlausibilityReport) -> list[str]:
    """The stratified pooled test as a row's difference cells: only its p ('' without one)."""
    s = report.average.stratified
    return ["", "", "" if s is None else _p(s.p_value), ""]


def odds_ratio_text(report: PlausibilityReport) -> str | None:
    """The Mantel-Haenszel common odds ratio with its 95% interval, in words; None without."""
    s = report.average.stratified
    if s is None:
        return None
    if s.odds_ratio is None:
        return (
            "Mantel-Haenszel common odds ratio: not finite (no class has both a plausible "
            "baseline image and an implausible prototype image)"
        )
    text = f"Mantel-Haenszel common odds ratio, prototype vs baseline: {s.odds_ratio:.2f}"
    if s.odds_ratio_ci is not None:
        lo, hi = s.odds_ratio_ci
        text += f", 95% CI [{lo:.2f}; {hi:.2f}]"
    return text


def macro_difference(report: PlausibilityReport) -> str:
    """Prototype minus baseline of the macro rates over the classes both were judged on, in
    points ("" without both)."""
    diff = report.average.macro_difference
    return "" if diff is None or diff.value is None else f"{100 * diff.value:.2f}"


def macro_classes(report: PlausibilityReport) -> list[str] | None:
    """The CSV's (and dashboard's) note on the macro difference: the classes it averages over,
    and those left out because one of the two models was not judged on them; None without a
    difference."""
    diff = report.average.macro_difference
    if diff is None:
        return None
    note = ["macro difference over classes", "; ".join(diff.classes) or "none"]
    if diff.left_out:
        note.append(f"left out (not judged for both): {'; '.join(diff.left_out)}")
    return note


STRATIFIED_LABEL = "pooled, stratified by class (Cochran-Mantel-Haenszel)"


def rate_text(entry: RateEntry) -> str:
    apart = f"; {entry.kept_apart} kept apart" if entry.kept_apart else ""
    apart += f"; {entry.incomplete} incomplete" if entry.incomplete else ""
    return f"{pct(entry.rate)} (n={entry.images}; {entry.reviews} reviews{apart})"


def incomplete_text(report: PlausibilityReport) -> str | None:
    """The line saying how many verdicts were incomplete (None when none)."""
    if not report.incomplete:
        return None
    return (
        f"{report.incomplete} verdicts incomplete (no overall verdict, or a criterion left "
        "unjudged): neither plausible nor implausible, they are in no rate, test, failure rate "
        "or agreement; 'incomplete' in a rate's cell says where"
    )


def flagged_text(report: PlausibilityReport) -> str | None:
    """The line saying how many verdicts Label Studio says someone else wrote (None when none
    and all were read)."""
    how = report.filters.flagged if report.filters else "include"
    if not report.flagged and how == "include":
        return None
    what = "verdicts that Label Studio says someone other than the named reviewer (or nobody it "
    what += "knows) wrote"
    if how == "exclude":
        return f"{what} are left out (filter flagged=exclude)"
    read = "counted" if how == "include" else "the only ones read"
    return f"{report.flagged} flagged {what}: {read} (filter flagged=include|exclude|only)"


def edited_text(report: PlausibilityReport) -> str | None:
    """The line saying how many verdicts were set aside on edited tasks (None when none)."""
    if not report.on_edited_tasks:
        return None
    return (
        f"{report.on_edited_tasks} verdicts set aside: their Label Studio task's data was edited "
        "after protomed imported it (they may be about another picture or class); they count "
        "again once the task is restored"
    )


def kept_apart_text(report: PlausibilityReport) -> str | None:
    """The one line saying how many reviewed images no number counts; None when none."""
    if not report.kept_apart:
        return None
    return (
        f"{report.kept_apart} reviewed images kept apart: sent because the scorer was least sure "
        "about them, they are in no rate, test, failure rate or agreement (only a simple random "
        "sample of each batch is); 'kept apart' in a rate's cell says where"
    )


def real_table(report: PlausibilityReport) -> tuple[list[str], list[list[str]]] | None:
    """The controls' table (CSV and dashboard): per class with real images reviewed, their
    '% plausible (n=images; reviews)' and each model's difference from them in points with
    Newcombe's 95% interval ('' where a side has no images); None without controls."""
    rows = [c for c in report.classes if c.real is not None]
    if not rows:
        return None
    header = ["class", "real images (%)"]
    for m in report.models:
        header += [f"{m.label} minus real (pp)", "95% CI"]
    out = []
    for c in rows:
        assert c.real is not None
        cells = [c.class_name, rate_text(c.real)]
        for m in report.models:
            d = c.versus_real.get(str(m.id))
            lo, hi = d.ci if d else (0.0, 0.0)
            cells += ["", ""] if d is None else [f"{100 * d.value:.2f}", _ci(lo, hi)]
        out.append(cells)
    return header, out


def _ci(lo: float, hi: float) -> str:
    return f"[{100 * lo:.1f}; {100 * hi:.1f}]"


def leak_text(report: PlausibilityReport) -> str | None:
    """What is left that could tell controls apart: each project's PNG-size AUC; None
    without controls."""
    if not report.control_leaks:
        return None
    parts = [
        f"project {x.project_id}: "
        f"{'n/a' if x.png_size_auc is None else f'{x.png_size_auc:.3f}'} "
        f"({x.real} real, {x.synthetic} synthetic)"
        for x in report.control_leaks
    ]
    return (
        "how well the review copies' PNG byte size alone separates real from synthetic images "
        f"(AUC, 0.5: not at all): {'; '.join(parts)}"
    )


def _proportion_text(p: Proportion | None) -> str:
    return "n/a" if p is None else f"{pct(p.rate)} {_ci(*p.ci)} ({p.k}/{p.n})"


def discrimination_table(report: PlausibilityReport) -> tuple[list[str], list[list[str]]] | None:
    """The "real or synthetic?" table (CSV and dashboard): pooled, per class, per reader, each
    with its answers, accuracy, sensitivity and specificity (% with the exact 95% interval),
    the TOST p and claim, and the AUC; None without answers."""
    d = report.discrimination
    if d is None:
        return None
    header = [
        "real or synthetic?",
        "answers (synthetic/real)",
        "accuracy (%)",
        "sensitivity (%)",
        "specificity (%)",
        f"TOST p (50% +- {100 * d.margin:g} pp)",
        "claim",
        "AUC (confidence)",
    ]
    groups = [("pooled", d.pooled)]
    groups += [(f"class {name}", g) for name, g in d.classes.items()]
    groups += [(f"reader {name}", g) for name, g in d.readers.items()]
    rows = [
        [
            label,
            f"{g.n} ({g.synthetic}/{g.real})",
            _proportion_text(g.accuracy),
            _proportion_text(g.sensitivity),
            _proportion_text(g.specificity),
            "" if g.equivalence is None else _p(g.equivalence.p_value),
            g.claim,
            "" if g.auc is None else f"{g.auc:.3f} (n={g.rated})",
        ]
        for label, g in groups
    ]
    return header, rows


def discrimination_text(report: PlausibilityReport) -> str | None:
    """The pooled "real or synthetic?" result in one sentence; None without answers.
    'Indistinguishable' is said only when the equivalence test passed."""
    d = report.discrimination
    if d is None:
        return None
    g = d.pooled
    bounds = f"50% +- {100 * d.margin:g} points"
    if g.equivalence is not None and g.equivalence.equivalent:
        verdict = (
            f"{INDISTINGUISHABLE}: readers' accuracy lies within {bounds} (exact TOST p = "
            f"{_p(g.equivalence.p_value)})"
        )
    else:
        p = "" if g.equivalence is None else f" (exact TOST p = {_p(g.equivalence.p_value)})"
        verdict = f"{NOT_SHOWN}: accuracy is not shown to lie within {bounds}{p}"
    return f"real or synthetic, {g.n} answers, accuracy {_proportion_text(g.accuracy)}: {verdict}"


def report_csv(report: PlausibilityReport) -> str:
    """The report laid out as the paper's Tables 3-4, for spreadsheets and the appendix.

    Rates in percent to 2 decimals with n (images, the unit) and the reviews behind them, the
    difference in percentage points, its 95% CI to 1 decimal, Fisher's p and the Holm-adjusted
    p, then macro-average, pooled and stratified rows (a rate's cell also names the images kept
    apart, where any, and a row after the notes says how many in all); after a blank line, the
    per-criterion failure rates (n = verdicts that judged the criterion). The macro row's
    difference is the plain difference of the two models' macro rates over the classes both
    were judged on, with no CI or p; a note row names those classes. The pooled row's p is
    Fisher's over pooled images; the stratified row's is the CMH test's, with its common odds
    ratio in a note.
    """
    models = report.models
    mids = [str(m.id) for m in models]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "class",
            *(f"{m.label} (%)" for m in models),
            "difference (pp)",
            "95% CI",
            "p",
            holm_header(report),
        ]
    )
    for c in report.classes:
        cols = [rate_text(c.models[i]) for i in mids]
        w.writerow([c.class_name, *cols, *diff_cells(c.difference)])

    avg = report.average
    w.writerow(
        [
            "average (macro)",
            *(pct(avg.macro[i]) for i in mids),
            macro_difference(report),
            "",
            "",
            "",
        ]
    )
    w.writerow(["pooled", *(rate_text(avg.pooled[i]) for i in mids), *diff_cells(avg.difference)])
    if avg.stratified is not None:
        w.writerow([STRATIFIED_LABEL, *("" for _ in mids), *stratified_cells(report)])
    macro_note, odds_ratio = macro_classes(report), odds_ratio_text(report)
    if macro_note is not None:
        w.writerow(macro_note)
    if odds_ratio is not None:
        w.writerow([odds_ratio])
    w.writerow(["n", f"images; {report.methods.consensus}"])
    for label, note in (
        ("kept apart", kept_apart_text(report)),
        ("incomplete", incomplete_text(report)),
        ("flagged", flagged_text(report)),
        ("edited tasks", edited_text(report)),
    ):
        if note is not None:
            w.writerow([label, note])

    w.writerow([])
    w.writerow(["criterion", *(f"{m.label} fail %" for m in models)])
    failure = report.criteria_failure
    for crit in report.criteria:
        key = crit.key
        cols = [f"{pct(failure[i][key].rate)} (n={failure[i][key].judged})" for i in mids]
        w.writerow([crit.label or key, *cols])
    real = real_table(report)
    if real is not None:
        w.writerow([])
        w.writerow(real[0])
        w.writerows(real[1])
        leak = leak_text(report)
        if leak is not None:
            w.writerow(["PNG size AUC", leak])
    origin = discrimination_table(report)
    if origin is not None:
        w.writerow([])
        w.writerow(origin[0])
        w.writerows(origin[1])
        w.writerow(["claim", discrimination_text(report)])
    return out.getvalue()
