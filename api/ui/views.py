"""View models of the dashboard's pages: a model's image grids, and the plausibility and
evaluation reports as table rows and charts, formatted as the reports' CSVs are."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas import AuditImageLinks
from api.ui.charts import BarValue, Chart, ScaleChart, Series, grouped_bar_chart, scale_chart
from api.ui.templating import percent
from ml.schemas.audit import AuditReport, nearest  # torch-free
from ml.schemas.evaluation import DownstreamResult, SetScores, ordered  # torch-free
from service.db.models import Batch, Image, Model
from service.report_schemas import ModelColumn, PlausibilityReport, RateEntry
from service.reports import diff_cells, macro_difference, pct, stratified_cells
from service.study_schemas import StudyReport
from service.sweep_report import SweepReport

IMAGES_PER_CLASS = 64  # on a model page; a batch page shows all of its images
PALETTE = {  # by mode, then by the model's order within its mode
    "baseline": ("#94a3b8", "#64748b", "#cbd5e1"),
    "prototype": ("#0f766e", "#14b8a6", "#115e59"),
}
OTHER_COLOURS = ("#a16207", "#7c3aed")


def image_counts(session: Session, batch_ids: list[int]) -> dict[int, int]:
    """Stored images per batch in one query (a queued batch has none yet)."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Image.batch_id, func.count(Image.id))
        .where(Image.batch_id.in_(batch_ids))
        .group_by(Image.batch_id)
    )
    return {batch_id: count for batch_id, count in rows.tuples()}


# --- models and batches --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassGrid:
    """One class's batches of a model, with the images shown (capped) and the total."""

    name: str
    batches: list[tuple[Batch, list[Image]]]
    total: int
    shown: int


def class_grids(model: Model, cap: int = IMAGES_PER_CLASS) -> list[ClassGrid]:
    """The model's batches grouped by class (its class order first), newest batch first, with
    at most ``cap`` images per class so a large model's page stays light."""
    names = list(model.classes) + sorted({b.class_name for b in model.batches} - set(model.classes))
    grids = []
    for name in names:
        batches = sorted((b for b in model.batches if b.class_name == name), key=lambda b: -b.id)
        if not batches:
            continue
        left, shown_batches, total = cap, [], 0
        for batch in batches:
            images = sorted(batch.images, key=lambda i: i.index)
            total += len(images)
            shown_batches.append((batch, images[: max(0, left)]))
            left -= len(images)
        grids.append(ClassGrid(name, shown_batches, total, min(total, cap)))
    return grids


# --- the plausibility report ---------------------------------------------------------------------


def column_colours(models: list[ModelColumn]) -> dict[int, str]:
    """Baseline greys, prototype teals; several models of one mode get shades of its colour."""
    seen: dict[str, int] = {}
    colours = {}
    for m in models:
        palette = PALETTE.get(m.mode, OTHER_COLOURS)
        colours[m.id] = palette[seen.get(m.mode, 0) % len(palette)]
        seen[m.mode] = seen.get(m.mode, 0) + 1
    return colours


def bar_chart(report: PlausibilityReport) -> Chart | None:
    """% of images plausible per class and model with Wilson 95% whiskers; None without
    reviews."""
    models, classes = report.models, report.classes
    colours = column_colours(models)
    series = [Series(str(m.id), m.label, colours[m.id]) for m in models]
    values = {}
    for cls in classes:
        for m in models:
            entry = cls.models[str(m.id)]
            lo, hi = entry.ci
            tip = (
                f"{cls.class_name} · {m.label}: {percent(entry.rate)} of images plausible "
                f"({entry.plausible}/{entry.images}; {entry.reviews} reviews), "
                f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%"
            )
            values[(cls.class_name, str(m.id))] = BarValue(entry.rate, (lo, hi), tip)
    return grouped_bar_chart(
        [c.class_name for c in classes],
        series,
        values,
        title="% of images plausible per class and model, with Wilson 95% intervals",
        axis_title="% plausible",
        series_attr="model",
        value_attr="rate",
    )


def rate_cell(entry: RateEntry) -> str:
    """'% plausible (n)' as in the CSV: two decimals, n = images (the unit); and the images
    kept out of the rate (the scorer's uncertain picks), where any."""
    apart = f"; {entry.kept_apart} kept apart" if entry.kept_apart else ""
    return f"{pct(entry.rate)} ({entry.images}{apart})"


def row(label: str, kind: str, cells: list[str], diff: list[str]) -> dict[str, Any]:
    return {"label": label, "kind": kind, "cells": cells, "diff": diff}


def report_rows(report: PlausibilityReport) -> list[dict[str, Any]]:
    """The table's rows: classes, then macro, pooled and stratified averages (the CSV's
    formatting)."""
    mids = [str(m.id) for m in report.models]
    rows = [
        row(c.class_name, "class", [rate_cell(c.models[i]) for i in mids], diff_cells(c.difference))
        for c in report.classes
    ]
    if not rows:
        return rows
    avg = report.average
    macro = ["", "", "", ""]
    macro[0] = macro_difference(report)  # the plain difference, no CI or p
    rows.append(row("Average (macro)", "avg", [pct(avg.macro[i]) for i in mids], macro))
    pooled = [rate_cell(avg.pooled[i]) for i in mids]
    rows.append(row("Pooled", "avg", pooled, diff_cells(avg.difference)))
    if avg.stratified is not None:
        label = "Pooled, stratified by class (CMH)"
        rows.append(row(label, "avg", ["" for _ in mids], stratified_cells(report)))
    return rows


def failure_rows(report: PlausibilityReport) -> list[tuple[str, list[str]]]:
    """Per criterion and model: '% failed (n judged)'."""
    failure = report.criteria_failure
    mids = [str(m.id) for m in report.models]

    def cell(mid: str, key: str) -> str:
        entry = failure[mid][key]
        return f"{pct(entry.rate)} ({entry.judged})"

    return [(c.label or c.key, [cell(i, c.key) for i in mids]) for c in report.criteria]


# --- the evaluation report -----------------------------------------------------------------------
# Its tables come from ml.schemas.evaluation.evaluation_tables, as the CLI's text and the CSV do;
# only the
# chart is the dashboard's own.

SET_COLOURS = {
    "real": "#334e68",
    "baseline": PALETTE["baseline"][1],
    "prototype": PALETTE["prototype"][0],
}


def class_f1(entry: SetScores, cls: str) -> tuple[float, float | None]:
    """A class's mean F1 over seeds and its sample sd (ddof=1, as the macro scores') from the
    runs' per-class scores; no sd from a single seed or runs without per-class scores."""
    runs = entry.runs
    scores = [r.per_class[cls].f1 for r in runs if cls in r.per_class]
    sd = statistics.stdev(scores) if len(scores) > 1 and len(scores) == len(runs) else None
    return entry.per_class_f1[cls], sd


def f1_chart(down: DownstreamResult) -> Chart | None:
    """Per-class F1 of the classifier trained on each set, whiskers ± 1 sd over seeds."""
    names = ordered(down.sets)
    series = [
        Series(n, n, SET_COLOURS.get(n, OTHER_COLOURS[i % len(OTHER_COLOURS)]))
        for i, n in enumerate(names)
    ]
    values = {}
    for cls in down.classes:
        for name in names:
            mean, sd = class_f1(down.sets[name], cls)
            spread = "" if sd is None else f" ± {100 * sd:.2f} (sd over seeds)"
            values[(cls, name)] = BarValue(
                mean,
                None if sd is None else (mean - sd, mean + sd),
                f"{cls} · trained on {name}: F1 {100 * mean:.2f}%{spread}",
            )
    return grouped_bar_chart(
        list(down.classes),
        series,
        values,
        title="F1 per class and training set",
        axis_title="F1",
        series_attr="set",
        value_attr="f1",
    )


# --- memorisation audit --------------------------------------------------------------------------


@dataclass
class AuditPair:
    """A generated image beside its nearest training image, with why it is shown."""

    index: int
    class_name: str
    flagged_by: list[str]
    image_url: str
    nearest_url: str | None
    nearest_path: str
    flip: str
    distances: str  # "pixel 0.0000 · clip 0.0123"


def audit_class_rows(report: AuditReport) -> list[tuple[str, list[str]]]:
    """Per class: images, flagged, rate, DCR ratio per space, calibration n, expected and
    measured false-flag rate on the held-out check images."""
    spaces = list(report.config.spaces)
    rows = []
    for c in report.per_class:
        cal = c.calibration
        check = f"{cal.check_flagged}/{cal.n_check}"
        if cal.check_upper95 is not None:
            check += f" ({percent(cal.check_rate)}, ≤ {percent(cal.check_upper95)})"
        cells = [str(c.n_images), str(c.n_flagged), percent(c.flag_rate)]
        cells += ["—" if c.dcr_ratio.get(s) is None else f"{c.dcr_ratio[s]:.3f}" for s in spaces]
        cells += [str(cal.n_calibration), percent(cal.expected_false_flag_rate), check]
        rows.append((c.class_name, cells))
    return rows


def audit_pairs(report: AuditReport, links: Iterable[AuditImageLinks]) -> list[AuditPair]:
    """Flagged images first, then the closest others whose nearest training image was kept."""
    by_index = {link.index: link for link in links}
    pairs = []
    for a in report.images:
        link = by_index[a.index]
        if link.nearest_url is None and not a.flagged:
            continue
        nn = nearest(a)
        dist = " · ".join(
            f"{s} {n.distance:.4f}" for s in ("pixel", "clip") if (n := getattr(a, s)) is not None
        )
        pairs.append(
            AuditPair(
                index=a.index,
                class_name=a.class_name,
                flagged_by=list(a.flagged_by),
                image_url=link.image_url,
                nearest_url=link.nearest_url,
                nearest_path="/".join(nn.train_path.split("/")[-2:]),
                flip=nn.flip,
                distances=dist,
            )
        )
    return sorted(pairs, key=lambda p: (not p.flagged_by, p.index))


_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_html(text: str) -> str:
    """Markdown to HTML with raw HTML disabled (escaped), so stored text cannot inject markup."""
    return str(_MARKDOWN.render(text))


# --- guidance sweeps -----------------------------------------------------------------------------


def sweep_charts(report: SweepReport) -> dict[str, ScaleChart | None]:
    """Per class, plausibility and diversity against guidance; diversity on one axis for the
    whole sweep."""
    found = [e.diversity for c in report.classes for e in c.scales if e.diversity is not None]
    top = max(found) * 1.1 if found else None
    charts = {}
    for c in report.classes:
        rates = []
        for e in c.scales:
            p = e.plausibility
            lo, hi = p.ci
            tip = (
                f"{c.class_name} at guidance {e.scale:g}: {percent(p.rate)} plausible "
                f"({p.plausible}/{p.images} images; {p.reviews} reviews), "
                f"95% CI {100 * lo:.1f}–{100 * hi:.1f}%"
            )
            rates.append((e.scale, p.rate, (lo, hi), c.recommended == e.scale, tip))
        charts[c.class_name] = scale_chart(
            rates,
            [(e.scale, e.diversity) for e in c.scales],
            top,
            title=f"{c.class_name}: % plausible (Wilson 95%) and diversity against guidance",
        )
    return charts


# --- expert studies ------------------------------------------------------------------------------

REAL_COLOUR = "#b45309"


def study_chart(report: StudyReport) -> Chart | None:
    """% of images plausible per class for the real controls and each model, with Wilson 95%
    whiskers; None before any counted read."""
    colours = column_colours(report.models)
    series = (
        [Series("real", "real images", REAL_COLOUR)] if any(c.real for c in report.classes) else []
    )
    series += [Series(str(m.id), m.label, colours[m.id]) for m in report.models]
    values = {}
    for cls in report.classes:
        entries = {"real": cls.real, **cls.models}
        for s in series:
            entry = entries.get(s.key)
            if entry is None:
                values[(cls.class_name, s.key)] = BarValue(
                    None, None, f"{cls.class_name} · {s.label}: no reads"
                )
                continue
            lo, hi = entry.ci
            tip = (
                f"{cls.class_name} · {s.label}: {percent(entry.rate)} of images plausible "
                f"({entry.plausible}/{entry.images}), 95% CI {100 * lo:.1f}–{100 * hi:.1f}%"
            )
            values[(cls.class_name, s.key)] = BarValue(entry.rate, (lo, hi), tip)
    return grouped_bar_chart(
        [c.class_name for c in report.classes],
        series,
        values,
        title="% of images plausible per class: real images and each model, Wilson 95% intervals",
        axis_title="% plausible",
        series_attr="series",
        value_attr="rate",
    )
