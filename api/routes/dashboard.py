"""A read-only HTML dashboard under ``/ui``: jobs with live progress, models, batches as image
grids, the plausibility report as the seed's Tables 3-4 with a bar chart, and the evaluation
report (Tables 5-6, per-class F1 chart, CLIP-space metrics).

Server-rendered (Jinja2, autoescaped) with inline CSS, SVG and a few lines of JS, so it needs no
build step, no framework and no network beyond this API. Kept out of the OpenAPI schema: the
JSON endpoints stay the API; these pages only read what they expose.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select

from api.core.security import close_session, find_key, open_session
from api.db.models import (
    ApiKey,
    Batch,
    CriteriaSet,
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Model,
    ReviewProject,
)
from api.deps import (
    MAX_ID,
    READER_ROLES,
    SESSION_COOKIE,
    Caller,
    IdPath,
    SessionDep,
    SettingsDep,
)
from api.reports import _diff_cells, _pct, macro_difference  # the CSV's formatting
from api.routes.evaluation import latest_evaluation
from api.routes.reviews import ProjectOut, _ls_public, plausibility, project_out

router = APIRouter(prefix="/ui", include_in_schema=False, default_response_class=HTMLResponse)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
JOBS_SHOWN = 50  # the page polls GET /jobs?limit= the same number, so both list the same jobs
BATCHES_SHOWN = 20
IMAGES_PER_CLASS = 64  # on a model page; a batch page shows all of its images
PALETTE = {  # by mode, then by the model's order within its mode
    "baseline": ("#94a3b8", "#64748b", "#cbd5e1"),
    "prototype": ("#0f766e", "#14b8a6", "#115e59"),
}
OTHER_COLOURS = ("#a16207", "#7c3aed")
UNFINISHED = (JobStatus.queued, JobStatus.running)


def route_path(request: Request, name: str, /, **params: Any) -> str:
    """Root-relative link to a named route: works behind a proxy whatever its scheme or host
    (``request.url_for`` would bake in the scheme and host the proxy forwarded)."""
    return request.scope.get("root_path", "") + str(request.app.url_path_for(name, **params))


@jinja2.pass_context
def _path(ctx: jinja2.runtime.Context, name: str, /, **params: Any) -> str:
    return route_path(ctx["request"], name, **params)


def percent(fraction: float | None) -> str:
    """Whole percent, rounded half up as JS's Math.round does, so live updates match."""
    return "—" if fraction is None else f"{math.floor(fraction * 100 + 0.5)}%"


def duration(seconds: float | None) -> str:
    """An ETA as people read it; the page's JS formats live updates the same way."""
    if seconds is None:
        return "—"
    total = max(0, math.floor(seconds + 0.5))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    return f"{total // 3600} h {total % 3600 // 60:02d} min"


def when(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number(value: Any, digits: int = 4) -> str:
    """A metric that may be absent or not a number (metrics are free-form JSON)."""
    if not is_number(value):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,  # every template, whatever its extension
        undefined=jinja2.StrictUndefined,  # a typo in a template fails a test, not silently
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["path"] = _path
    env.filters.update(percent=percent, duration=duration, when=when, number=number)
    return env


templates = Jinja2Templates(env=_environment())


def page(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def not_found(request: Request, what: str) -> HTMLResponse:
    """An HTML 404 (the app's handlers answer JSON, which a browser shows as raw text)."""
    return page(request, "message.html", 404, title="Not found", message=what)


# --- login ---------------------------------------------------------------------------------------
# Browsers cannot attach a bearer key to links and <img> loads, so the pages (and the reads they
# make: GET /jobs polling, /images) also accept a session cookie, opened here from an API key.
# The cookie holds a random token (its hash is stored, never the key), is HttpOnly (no script
# reads it) and SameSite=Strict (no other site's page sends it); writes never accept it.


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path only (no open redirect elsewhere)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


def ui_reader(key: Caller, request: Request) -> ApiKey:
    """Pages: an admin or viewer key (bearer or login cookie); without one, the login page."""
    if key is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = route_path(request, "ui_login") + "?" + urlencode({"next": target})
        raise HTTPException(303, "log in first", headers={"Location": login})
    if key.role not in READER_ROLES:
        raise HTTPException(
            403, f"key '{key.name}' is a {key.role} key: the dashboard shows modes (blinding)"
        )
    return key


UiReader = Annotated[ApiKey, Depends(ui_reader)]


@router.get("/login", name="ui_login")
def login_page(
    request: Request,
    settings: SettingsDep,
    next: Annotated[str | None, Query(max_length=2000)] = None,
) -> HTMLResponse:
    """The form where one pastes an API key."""
    return page(
        request, "login.html", title="Log in", error=None, next=safe_next(next),
        hours=settings.ui_session_hours,
    )  # fmt: skip


@router.post("/login", name="ui_login_submit", response_model=None)
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str, Form(max_length=200)],
    next: Annotated[str, Form(max_length=2000)] = "/ui",
) -> HTMLResponse | RedirectResponse:
    """Trade an admin or viewer key for a session cookie; reviewer keys are refused."""
    row = find_key(session, key.strip())
    error, code = None, 200
    if row is None:
        error, code = "Unknown or revoked API key.", 401
    elif row.role not in READER_ROLES:
        error, code = (
            f"Key '{row.name}' is a {row.role} key; the dashboard needs an admin or viewer key "
            "(it shows which model made each image, which reviewers must not see).",
            403,
        )
    if error is not None:
        return page(
            request, "login.html", code, title="Log in", error=error, next=safe_next(next),
            hours=settings.ui_session_hours,
        )  # fmt: skip
    token = open_session(session, row, settings.ui_session_hours)
    session.commit()
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(settings.ui_session_hours * 3600), path="/",
        httponly=True, samesite="strict",
        secure=request.url.scheme == "https" or settings.public_url.startswith("https://"),
    )  # fmt: skip
    return response


@router.post("/logout", name="ui_logout")
def logout(request: Request, session: SessionDep) -> RedirectResponse:
    """End the browser's session (the cookie's token stops working at once)."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        close_session(session, token)
        session.commit()
    response = RedirectResponse(route_path(request, "ui_login"), status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --- overview ------------------------------------------------------------------------------------


def image_counts(session: SessionDep, batch_ids: list[int]) -> dict[int, int]:
    """Stored images per batch in one query (a queued batch has none yet)."""
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Image.batch_id, func.count(Image.id))
        .where(Image.batch_id.in_(batch_ids))
        .group_by(Image.batch_id)
    )
    return {batch_id: count for batch_id, count in rows.tuples()}


@router.get("", name="ui_home")
def overview(
    request: Request, session: SessionDep, settings: SettingsDep, _reader: UiReader
) -> HTMLResponse:
    """Jobs (live), models, recent batches and review projects on one page."""
    jobs = session.scalars(select(Job).order_by(Job.id.desc()).limit(JOBS_SHOWN)).all()
    models = session.scalars(select(Model).order_by(Model.id.desc())).all()
    batches = session.scalars(select(Batch).order_by(Batch.id.desc()).limit(BATCHES_SHOWN)).all()
    public = _ls_public(settings)
    projects = [
        project_out(session, p, public)
        for p in session.scalars(select(ReviewProject).order_by(ReviewProject.id))
    ]
    return page(
        request, "overview.html", title="Overview", jobs=jobs, jobs_shown=JOBS_SHOWN,
        models=models, batches=batches, counts=image_counts(session, [b.id for b in batches]),
        projects=projects,
    )  # fmt: skip


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


@router.get("/models/{model_id}", name="ui_model")
def model_page(
    model_id: IdPath, request: Request, session: SessionDep, _reader: UiReader
) -> HTMLResponse:
    """A model's settings, training metrics and its batches as image grids per class."""
    model = session.get(Model, model_id)
    if model is None:
        return not_found(request, f"No model with id {model_id}.")
    return page(
        request, "model.html", title=f"Model #{model.id}", model=model, grids=class_grids(model)
    )


@router.get("/batches/{batch_id}", name="ui_batch")
def batch_page(
    batch_id: IdPath, request: Request, session: SessionDep, _reader: UiReader
) -> HTMLResponse:
    """One batch: the settings that reproduce it, a zip link and all its images."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return not_found(request, f"No batch with id {batch_id}.")
    images = sorted(batch.images, key=lambda i: i.index)
    return page(request, "batch.html", title=f"Batch #{batch.id}", batch=batch, images=images)


# --- grouped bar charts: plausibility per model, F1 per training set ----------------------------


@dataclass(frozen=True)
class Series:
    """One bar in every group, in one colour: a model, or a training set."""

    key: str  # the bars' data-<series_attr> value
    label: str
    colour: str


@dataclass(frozen=True)
class BarValue:
    """What one bar shows: a fraction (None: no data), an optional interval for the whisker,
    and the tooltip."""

    value: float | None
    interval: tuple[float, float] | None
    tooltip: str


@dataclass(frozen=True)
class Bar:
    """One series' bar in one group; y grows downwards as in SVG."""

    group: str
    series: str
    colour: str
    x: float
    y: float
    width: float
    height: float
    value: float | None
    whisker: tuple[float, float] | None  # y of the interval's upper and lower ends
    tooltip: str

    @property
    def centre(self) -> float:
        return self.x + self.width / 2

    @property
    def text(self) -> str:
        return "n/a" if self.value is None else f"{100 * self.value:.1f}%"

    @property
    def text_y(self) -> float:
        """Just above the whisker, else above the bar (at the axis for no data)."""
        return (self.whisker[0] if self.whisker else self.y) - 5


@dataclass(frozen=True)
class Chart:
    """Geometry of a grouped bar chart on a 0-100% axis, computed here so the template (the
    ``bar_chart`` macro) only draws."""

    width: float
    height: float
    left: float
    top: float
    plot_width: float
    plot_height: float
    bars: list[Bar]
    groups: list[tuple[str, float]]  # group (class) name, x of its centre
    ticks: list[tuple[float, str]]  # y, label
    legend: list[tuple[str, str, float]]  # label, colour, x
    title: str
    axis_title: str
    series_attr: str  # data-* names on the bars, e.g. data-model / data-rate
    value_attr: str


def grouped_bar_chart(
    groups: list[str],
    series: list[Series],
    values: dict[tuple[str, str], BarValue],
    *,
    title: str,
    axis_title: str,
    series_attr: str,
    value_attr: str,
) -> Chart | None:
    """One bar per (group, series) from ``values[(group, series.key)]``, groups side by side,
    whiskers where a value has an interval (clipped to the axis); None without groups or
    series."""
    if not groups or not series:
        return None
    bar_w, gap, pad = 40.0, 8.0, 56.0
    bars_w = len(series) * (bar_w + gap) - gap
    group_w = max(bars_w + pad, min(7.0 * max(len(g) for g in groups) + 12, 180.0))
    left, top, plot_h, bottom = 56.0, 56.0, 240.0, 44.0
    plot_w = group_w * len(groups)
    legend_w = sum(28 + 7.5 * len(s.label) for s in series)
    width = max(left + plot_w + 16, left + legend_w + 16)

    def y_of(fraction: float) -> float:
        return top + plot_h * (1 - min(max(fraction, 0.0), 1.0))

    bars, centres = [], []
    for g, name in enumerate(groups):
        start = left + g * group_w + (group_w - bars_w) / 2
        centres.append((name, left + g * group_w + group_w / 2))
        for i, s in enumerate(series):
            v = values[(name, s.key)]
            height = plot_h * (v.value or 0.0)
            whisker = None
            if v.value is not None and v.interval is not None:
                whisker = (y_of(v.interval[1]), y_of(v.interval[0]))
            bars.append(
                Bar(
                    group=name,
                    series=s.key,
                    colour=s.colour,
                    x=start + i * (bar_w + gap),
                    y=top + plot_h - height,
                    width=bar_w,
                    height=height,
                    value=v.value,
                    whisker=whisker,
                    tooltip=v.tooltip,
                )
            )
    ticks = [(y_of(t / 100), f"{t}%") for t in range(0, 101, 25)]
    legend, x = [], left
    for s in series:
        legend.append((s.label, s.colour, x))
        x += 28 + 7.5 * len(s.label)
    return Chart(
        width, top + plot_h + bottom, left, top, plot_w, plot_h, bars, centres, ticks, legend,
        title, axis_title, series_attr, value_attr,
    )  # fmt: skip


# --- the plausibility report ---------------------------------------------------------------------


def column_colours(models: list[dict[str, Any]]) -> dict[int, str]:
    """Baseline greys, prototype teals; several models of one mode get shades of its colour."""
    seen: dict[str, int] = {}
    colours = {}
    for m in models:
        mode = str(m.get("mode"))
        palette = PALETTE.get(mode, OTHER_COLOURS)
        colours[m["id"]] = palette[seen.get(mode, 0) % len(palette)]
        seen[mode] = seen.get(mode, 0) + 1
    return colours


def bar_chart(report: dict[str, Any]) -> Chart | None:
    """% plausible per class and model with Wilson 95% whiskers; None without reviews."""
    models, classes = report["models"], report["classes"]
    colours = column_colours(models)
    series = [Series(str(m["id"]), m["label"], colours[m["id"]]) for m in models]
    values = {}
    for cls in classes:
        for m in models:
            entry = cls["models"][str(m["id"])]
            rate, (lo, hi) = entry["rate"], entry["ci"]
            tip = (
                f"{cls['class']} · {m['label']}: {percent(rate)} plausible "
                f"({entry['plausible']}/{entry['reviews']}), 95% CI {100 * lo:.1f}–{100 * hi:.1f}%"
            )
            values[(cls["class"], str(m["id"]))] = BarValue(rate, (lo, hi), tip)
    return grouped_bar_chart(
        [c["class"] for c in classes], series, values,
        title="% plausible per class and model, with Wilson 95% intervals",
        axis_title="% plausible", series_attr="model", value_attr="rate",
    )  # fmt: skip


def rate_cell(entry: dict[str, Any]) -> str:
    """'% plausible (n)' as in the CSV: two decimals, n = reviews."""
    return f"{_pct(entry['rate'])} ({entry['reviews']})"


def row(label: str, kind: str, cells: list[str], diff: dict[str, Any] | None) -> dict[str, Any]:
    return {"label": label, "kind": kind, "cells": cells, "diff": _diff_cells(diff)}


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: classes, then macro and pooled averages (the CSV's formatting)."""
    mids = [str(m["id"]) for m in report["models"]]
    rows = [
        row(c["class"], "class", [rate_cell(c["models"][i]) for i in mids], c["difference"])
        for c in report["classes"]
    ]
    if not rows:
        return rows
    avg = report["average"]
    rows.append(row("Average (macro)", "avg", [_pct(avg["macro"][i]) for i in mids], None))
    rows[-1]["diff"][0] = macro_difference(report)  # the plain difference, no CI or p
    pooled = [rate_cell(avg["pooled"][i]) for i in mids]
    rows.append(row("Pooled", "avg", pooled, avg["difference"]))
    return rows


def failure_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Per criterion and model: '% failed (n judged)'."""
    failure = report["criteria_failure"]
    mids = [str(m["id"]) for m in report["models"]]

    def cell(mid: str, key: str) -> str:
        entry = failure[mid][key]
        return f"{_pct(entry['rate'])} ({entry['judged']})"

    criteria = report["criteria"]
    return [(c.get("label", c["key"]), [cell(i, c["key"]) for i in mids]) for c in criteria]


def report_projects(
    session: SessionDep, public: str | None, criteria_set_id: int | None
) -> list[ProjectOut]:
    query = select(ReviewProject).order_by(ReviewProject.id)
    if criteria_set_id is not None:
        query = query.where(ReviewProject.criteria_set_id == criteria_set_id)
    return [project_out(session, p, public) for p in session.scalars(query)]


def optional_id(value: str | None, name: str) -> int | None:
    """An id filter where an empty string means none: the filter form sends every field, and
    an ``int`` query parameter would reject its empty "all" choice with a 422."""
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_ID:
        raise HTTPException(422, f"{name} must be an id between 1 and {MAX_ID} (got {value!r})")
    return number


def bad_filter(request: Request, exc: HTTPException) -> HTMLResponse:
    return page(request, "message.html", exc.status_code, title="Bad filter", message=exc.detail)


@router.get("/reports/plausibility", name="ui_report")
def report_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _reader: UiReader,
    dataset_id: Annotated[str | None, Query(max_length=12)] = None,
    models: Annotated[str | None, Query(max_length=2000)] = None,
    reviewer: Annotated[str | None, Query(max_length=254)] = None,
    criteria_set_id: Annotated[str | None, Query(max_length=12)] = None,
) -> HTMLResponse:
    """The JSON report's content for people: Tables 3-4, the chart, criteria and agreement.
    Same filters as ``GET /reports/plausibility``; empty form fields count as no filter."""
    try:
        set_id = optional_id(criteria_set_id, "criteria_set_id")
        report = plausibility(
            session, optional_id(dataset_id, "dataset_id"), models or None, reviewer or None, set_id
        )
    except HTTPException as exc:  # malformed model ids: say so on a page, not in JSON
        return bad_filter(request, exc)
    filters = {k: v for k, v in report["filters"].items() if v is not None}
    api_url = route_path(request, "plausibility_endpoint")
    return page(
        request, "report.html", title="Plausibility report", report=report,
        rows=report_rows(report), failures=failure_rows(report), chart=bar_chart(report),
        filters=filters,
        json_url=f"{api_url}?{urlencode(filters)}" if filters else api_url,
        csv_url=f"{api_url}?{urlencode({**filters, 'format': 'csv'})}",
        projects=report_projects(session, _ls_public(settings), set_id),
        datasets=session.scalars(select(Dataset).order_by(Dataset.id)).all(),
        criteria_sets=session.scalars(
            select(CriteriaSet).order_by(CriteriaSet.domain, CriteriaSet.version)
        ).all(),
    )  # fmt: skip


# --- the evaluation report -----------------------------------------------------------------------

SET_ORDER = ("real", "baseline", "prototype")  # the seed's Tables 5-6 rows, others after them
SET_COLOURS = {"real": "#334e68", "baseline": PALETTE["baseline"][1],
               "prototype": PALETTE["prototype"][0]}  # fmt: skip
SCORES = ("precision", "recall", "f1")
DISTANCES = ("fd", "precision", "recall", "consistency")


def ordered(names: Iterable[str]) -> list[str]:
    names = list(names)
    return [n for n in SET_ORDER if n in names] + [n for n in names if n not in SET_ORDER]


def fixed(value: Any, digits: int = 4) -> str:
    """The CSV's formatting of a CLIP-space number; an absent statistic (a set too small for
    it, or no codebook for consistency) is a dash."""
    return f"{value:.{digits}f}" if is_number(value) else "—"


def downstream_rows(down: dict[str, Any]) -> list[dict[str, Any]]:
    """Tables 5-6: macro precision, recall and F1 as 'mean ± sd' in % (the CSV's two decimals)."""
    rows = []
    for name in ordered(down["sets"]):
        entry = down["sets"][name]
        mean, sd = entry["mean"], entry["std"]
        cells = [f"{100 * mean[k]:.2f} ± {100 * sd[k]:.2f}" for k in SCORES]
        rows.append({"name": name, "cells": cells, "n_train": entry["n_train"]})
    return rows


def class_f1(entry: dict[str, Any], cls: str) -> tuple[float, float | None]:
    """A class's mean F1 over seeds and its sample sd (ddof=1, as the macro scores') from the
    runs' per-class scores; no sd from a single seed or runs without per-class scores."""
    runs = entry.get("runs") or []
    scores = [r["per_class"][cls]["f1"] for r in runs if cls in (r.get("per_class") or {})]
    sd = statistics.stdev(scores) if len(scores) > 1 and len(scores) == len(runs) else None
    return entry["per_class_f1"][cls], sd


def f1_chart(down: dict[str, Any]) -> Chart | None:
    """Per-class F1 of the classifier trained on each set, whiskers ± 1 sd over seeds."""
    names = ordered(down["sets"])
    series = [
        Series(n, n, SET_COLOURS.get(n, OTHER_COLOURS[i % len(OTHER_COLOURS)]))
        for i, n in enumerate(names)
    ]
    values = {}
    for cls in down["classes"]:
        for name in names:
            mean, sd = class_f1(down["sets"][name], cls)
            spread = "" if sd is None else f" ± {100 * sd:.2f} (sd over seeds)"
            values[(cls, name)] = BarValue(
                mean, None if sd is None else (mean - sd, mean + sd),
                f"{cls} · trained on {name}: F1 {100 * mean:.2f}%{spread}",
            )  # fmt: skip
    return grouped_bar_chart(
        list(down["classes"]), series, values, title="F1 per class and training set",
        axis_title="F1", series_attr="set", value_attr="f1",
    )  # fmt: skip


def distance_cells(entry: dict[str, Any]) -> list[str]:
    return [fixed(entry.get(k)) for k in DISTANCES] + [str(entry["n_real"]), str(entry["n_fake"])]


def toy_rows(
    toy: dict[str, dict[str, float]] | None, classes: list[str]
) -> list[tuple[str, list[str]]]:
    """The rule-based checker's % plausible per class, then the mean over classes."""
    rows = []
    for name in ordered(toy or {}):
        per = (toy or {})[name]
        mean = sum(per.values()) / len(per) if per else None
        rows.append((name, [_pct(per.get(c)) for c in classes] + [_pct(mean)]))
    return rows


@router.get("/reports/evaluation", name="ui_evaluation")
def evaluation_page(
    request: Request,
    session: SessionDep,
    _reader: UiReader,
    dataset_id: Annotated[str | None, Query(max_length=12)] = None,
    job_id: Annotated[str | None, Query(max_length=12)] = None,
) -> HTMLResponse:
    """The latest finished evaluation (of a dataset, or a given job): Tables 5-6, per-class F1,
    CLIP-space metrics, the toy checker. Same filters as ``GET /reports/evaluation``."""
    try:
        ids = {"dataset_id": optional_id(dataset_id, "dataset_id"),
               "job_id": optional_id(job_id, "job_id")}  # fmt: skip
    except HTTPException as exc:
        return bad_filter(request, exc)
    filters = {k: v for k, v in ids.items() if v is not None}
    job = latest_evaluation(session, ids["dataset_id"], ids["job_id"])
    common = {
        "title": "Evaluation report", "filters": filters, "job": job,
        "datasets": session.scalars(select(Dataset).order_by(Dataset.id)).all(),
    }  # fmt: skip
    if job is None:
        pending = session.scalars(
            select(Job)
            .where(Job.kind == JobKind.evaluate, Job.status.in_(UNFINISHED))
            .order_by(Job.id.desc())
        ).all()
        return page(request, "evaluation.html", **common, pending=pending)
    result, params = job.result or {}, job.params or {}
    down, dist, classes = result["downstream"], result["distribution"], result["classes"]
    api_url = route_path(request, "evaluation_report")
    dataset_of_job = params.get("dataset_id")
    return page(
        request, "evaluation.html", **common, result=result, down=down,
        dataset=session.get(Dataset, dataset_of_job) if dataset_of_job else None,
        model_ids=params.get("models") or {}, given=params.get("batches") or {},
        rows=downstream_rows(down), chart=f1_chart(down),
        overall=[(name, distance_cells(rep["overall"])) for name, rep in dist.items()],
        per_class=[(cls, [(name, distance_cells(rep["per_class"][cls])) for name, rep in
                          dist.items()]) for cls in classes],
        toy=toy_rows(result.get("toy_plausibility"), classes),
        untrained="untrained" in str(result.get("encoder", "")),
        json_url=f"{api_url}?{urlencode({'job_id': job.id})}",
        csv_url=f"{api_url}?{urlencode({'job_id': job.id, 'format': 'csv'})}",
    )  # fmt: skip
