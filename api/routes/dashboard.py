"""A read-only HTML dashboard under ``/ui``: jobs with live progress, models, batches as image
grids, the plausibility report as the seed's Tables 3-4 with a bar chart, and the evaluation
report (Tables 5-6, per-class F1 chart, CLIP-space metrics).

Server-rendered (Jinja2, autoescaped) with inline CSS, SVG and a few lines of JS, so it needs no
build step, no framework and no network beyond this API. Kept out of the OpenAPI schema: the
JSON endpoints stay the API; these pages only read what they expose.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from api.deps import (
    READER_ROLES,
    SESSION_COOKIE,
    Caller,
    IdPath,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from api.responses import audit_out, ls_public, project_out
from api.schemas import ProjectOut
from api.ui.charts import calibration_chart
from api.ui.templating import not_found, page, route_path
from api.ui.views import (
    audit_class_rows,
    audit_pairs,
    bar_chart,
    class_grids,
    f1_chart,
    failure_rows,
    image_counts,
    markdown_html,
    report_rows,
    study_chart,
    sweep_charts,
)
from ml.schemas.evaluation import evaluation_tables, feature_space, test_set_label  # torch-free
from service.audits import AuditUnavailable, audit_jobs, latest_audit
from service.db.models import (
    MAX_ID,
    ApiKey,
    Batch,
    CriteriaSet,
    Dataset,
    Job,
    JobKind,
    JobStatus,
    Model,
    ReviewProject,
    Scorer,
    Sweep,
)
from service.evaluations import evaluation_of, latest_evaluation
from service.model_cards import build_card, card_markdown
from service.report_schemas import Flagged
from service.reports import (
    discrimination_table,
    discrimination_text,
    edited_text,
    flagged_text,
    incomplete_text,
    kept_apart_text,
    leak_text,
    odds_ratio_text,
    real_table,
)
from service.reviews import FilterError, plausibility
from service.scorers import latest_scorer, metrics_of
from service.security import close_session, find_key, open_session
from service.studies import NoStudy, get_study, study_report
from service.study_statistics import DEFAULT_MARGIN
from service.sweeps import report as sweep_report
from service.sweeps import sweep_batches, sweeps_of

router = APIRouter(prefix="/ui", include_in_schema=False, default_response_class=HTMLResponse)

JOBS_SHOWN = 50  # the page polls GET /jobs?limit= the same number, so both list the same jobs
BATCHES_SHOWN = 20
UNFINISHED = (JobStatus.queued, JobStatus.running)


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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(request: Request, settings: SettingsDep) -> None:
    """Login and logout forms: refuse posts made by another site's page (login CSRF).

    SameSite=Strict keeps the cookie off cross-site requests, but a cross-site form could still
    post an attacker's key to /ui/login and plant the attacker's session in a victim's browser
    (who would then read, and act on, the attacker's data). Browsers name the requesting site in
    ``Sec-Fetch-Site`` and ``Origin``; a post is refused when either says it came from elsewhere
    (``Origin: null`` included). Clients that send neither (curl, scripts) hold the key anyway.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise HTTPException(403, f"cross-site form post refused (Sec-Fetch-Site: {fetch_site})")
    origin = request.headers.get("origin")
    if origin is None:
        return
    allowed = {_origin(str(request.base_url)), _origin(settings.public_url)}
    if origin.lower() not in allowed:
        raise HTTPException(
            403, f"form post from origin {origin!r} refused; allowed: {', '.join(sorted(allowed))}"
        )


SameOrigin = Depends(same_origin)


@router.get("/login", name="ui_login")
def login_page(
    request: Request,
    settings: SettingsDep,
    next: Annotated[str | None, Query(max_length=2000)] = None,
) -> HTMLResponse:
    """The form where one pastes an API key."""
    return page(
        request,
        "login.html",
        title="Log in",
        error=None,
        next=safe_next(next),
        hours=settings.ui_session_hours,
    )


@router.post("/login", name="ui_login_submit", response_model=None, dependencies=[SameOrigin])
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
    if error is not None or row is None:  # row is None only with an error set
        return page(
            request,
            "login.html",
            code,
            title="Log in",
            error=error,
            next=safe_next(next),
            hours=settings.ui_session_hours,
        )
    token = open_session(session, row, settings.ui_session_hours)
    session.commit()
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.ui_session_hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or settings.public_url.startswith("https://"),
    )
    return response


@router.post("/logout", name="ui_logout", dependencies=[SameOrigin])
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


@router.get("", name="ui_home")
def overview(
    request: Request, session: SessionDep, settings: SettingsDep, _reader: UiReader
) -> HTMLResponse:
    """Jobs (live), models, recent batches and review projects on one page."""
    jobs = session.scalars(select(Job).order_by(Job.id.desc()).limit(JOBS_SHOWN)).all()
    models = session.scalars(select(Model).order_by(Model.id.desc())).all()
    batches = session.scalars(select(Batch).order_by(Batch.id.desc()).limit(BATCHES_SHOWN)).all()
    public = ls_public(settings)
    projects = [
        project_out(session, p, public)
        for p in session.scalars(select(ReviewProject).order_by(ReviewProject.id))
    ]
    scorers = session.scalars(select(Scorer).order_by(Scorer.domain, Scorer.version.desc())).all()
    return page(
        request,
        "overview.html",
        title="Overview",
        jobs=jobs,
        jobs_shown=JOBS_SHOWN,
        models=models,
        batches=batches,
        counts=image_counts(session, [b.id for b in batches]),
        projects=projects,
        scorers=[(s, metrics_of(s).cv) for s in scorers],
    )


# --- models and batches --------------------------------------------------------------------------


@router.get("/models/{model_id}", name="ui_model")
def model_page(
    model_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _reader: UiReader,
) -> HTMLResponse:
    """A model's settings, training metrics and its batches as image grids per class."""
    model = session.get(Model, model_id)
    if model is None:
        return not_found(request, f"No model with id {model_id}.")
    return page(
        request,
        "model.html",
        title=f"Model #{model.id}",
        model=model,
        grids=class_grids(model),
        sweeps=sweeps_of(session, model.id),
        fallback=settings.default_guidance,
    )


@router.get("/models/{model_id}/card", name="ui_model_card")
def model_card_page(
    model_id: IdPath, request: Request, session: SessionDep, _reader: UiReader
) -> HTMLResponse:
    """The model card (the same Markdown GET /models/{id}/card?format=markdown gives)."""
    model = session.get(Model, model_id)
    if model is None:
        return not_found(request, f"No model with id {model_id}.")
    body = markdown_html(card_markdown(build_card(session, model)))
    return page(request, "card.html", title=f"Model card #{model.id}", model=model, body=body)


@router.get("/batches/{batch_id}", name="ui_batch")
def batch_page(
    batch_id: IdPath, request: Request, session: SessionDep, _reader: UiReader
) -> HTMLResponse:
    """One batch: the settings that reproduce it, a zip link and all its images."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return not_found(request, f"No batch with id {batch_id}.")
    images = sorted(batch.images, key=lambda i: i.index)
    scores = [i.score for i in images if i.score is not None]
    mean_score = sum(scores) / len(scores) if scores else None
    return page(
        request,
        "batch.html",
        title=f"Batch #{batch.id}",
        batch=batch,
        images=images,
        mean_score=mean_score,
    )


# --- the plausibility report ---------------------------------------------------------------------


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


def equivalence_margin(value: str | None) -> float:
    """The form's equivalence margin (empty: the default), as ``GET /reports/plausibility``
    takes it: a number strictly between 0 and 0.5."""
    if not value:
        return DEFAULT_MARGIN
    try:
        margin = float(value)
    except ValueError:
        margin = -1.0
    if not 0.0 < margin < 0.5:
        raise HTTPException(422, f"margin must lie strictly between 0 and 0.5 (got {value!r})")
    return margin


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
    flagged: Flagged = "include",
    margin: Annotated[str | None, Query(max_length=12)] = None,
) -> HTMLResponse:
    """The JSON report's content for people: Tables 3-4, the chart, criteria and agreement,
    how many verdicts were incomplete or flagged, whether readers told real from synthetic
    images, and the Label Studio tasks the last pull did not count. Same filters as
    ``GET /reports/plausibility``; empty form fields count as no filter."""
    try:
        set_id = optional_id(criteria_set_id, "criteria_set_id")
        report = plausibility(
            session,
            optional_id(dataset_id, "dataset_id"),
            models or None,
            reviewer or None,
            set_id,
            flagged,
            margin=equivalence_margin(margin),
        )
    except HTTPException as exc:  # malformed ids: say so on a page, not in JSON
        return bad_filter(request, exc)
    except FilterError as exc:
        return bad_filter(request, HTTPException(422, str(exc)))
    filters = report.filters.model_dump(exclude_none=True) if report.filters else {}
    if filters.get("flagged") == "include":  # the default: no need to repeat it in links
        del filters["flagged"]
    if margin:
        filters["margin"] = margin
    api_url = route_path(request, "plausibility_endpoint")
    return page(
        request,
        "report.html",
        title="Plausibility report",
        report=report,
        rows=report_rows(report),
        failures=failure_rows(report),
        chart=bar_chart(report),
        filters=filters,
        odds_ratio=odds_ratio_text(report),
        kept_apart=kept_apart_text(report),
        real=real_table(report),
        leak=leak_text(report),
        origin=discrimination_table(report),
        origin_claim=discrimination_text(report),
        incomplete=incomplete_text(report),
        flagged=flagged_text(report),
        edited=edited_text(report),
        json_url=f"{api_url}?{urlencode(filters)}" if filters else api_url,
        csv_url=f"{api_url}?{urlencode({**filters, 'format': 'csv'})}",
        projects=report_projects(session, ls_public(settings), set_id),
        datasets=session.scalars(select(Dataset).order_by(Dataset.id)).all(),
        criteria_sets=session.scalars(
            select(CriteriaSet).order_by(CriteriaSet.domain, CriteriaSet.version)
        ).all(),
    )


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
        ids = {
            "dataset_id": optional_id(dataset_id, "dataset_id"),
            "job_id": optional_id(job_id, "job_id"),
        }
    except HTTPException as exc:
        return bad_filter(request, exc)
    filters = {k: v for k, v in ids.items() if v is not None}
    job = latest_evaluation(session, ids["dataset_id"], ids["job_id"])
    common: dict[str, Any] = {
        "title": "Evaluation report",
        "filters": filters,
        "job": job,
        "datasets": session.scalars(select(Dataset).order_by(Dataset.id)).all(),
    }
    if job is None:
        pending = session.scalars(
            select(Job)
            .where(Job.kind == JobKind.evaluate, Job.status.in_(UNFINISHED))
            .order_by(Job.id.desc())
        ).all()
        return page(request, "evaluation.html", **common, pending=pending)
    params, result = evaluation_of(job)
    tables = {t.key: t for t in evaluation_tables(result)}
    api_url = route_path(request, "evaluation_report")
    test = result.test_set
    test_dataset_id = test.dataset_id if test and test.source == "external" else None
    return page(
        request,
        "evaluation.html",
        **common,
        result=result,
        down=result.downstream,
        cfg=result.config,
        dataset=session.get(Dataset, params.dataset_id),
        test_dataset=session.get(Dataset, test_dataset_id) if test_dataset_id else None,
        test_label=test_set_label(result),
        model_ids=params.models.model_dump(),
        given=params.batches.model_dump(),
        tables=tables,
        chart=f1_chart(result.downstream),
        untrained="untrained" in result.encoder,
        space=feature_space(result.encoder),
        json_url=f"{api_url}?{urlencode({'job_id': job.id})}",
        csv_url=f"{api_url}?{urlencode({'job_id': job.id, 'format': 'csv'})}",
    )


# --- memorisation audit of a batch ----------------------------------------------------------------


@router.get("/batches/{batch_id}/audit", name="ui_batch_audit")
def batch_audit_page(
    batch_id: IdPath, request: Request, session: SessionDep, _reader: UiReader
) -> HTMLResponse:
    """A batch's newest audit: the per-class summary and each flagged image beside its
    nearest training image (then the closest others); how to start one when there is none."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return not_found(request, f"No batch with id {batch_id}.")
    common: dict[str, Any] = {"title": f"Audit of batch #{batch.id}", "batch": batch}
    try:
        job, stored = latest_audit(session, batch_id)
    except AuditUnavailable as exc:
        jobs = audit_jobs(session, batch_id)
        return page(
            request,
            "audit.html",
            **common,
            report=None,
            message=str(exc),
            last=jobs[0] if jobs else None,
        )
    out = audit_out(job, stored, request)
    report = out.report
    return page(
        request,
        "audit.html",
        **common,
        job=job,
        report=report,
        spaces=list(report.config.spaces),
        rows=audit_class_rows(report),
        pairs=audit_pairs(report, out.links),
        untrained="untrained" in report.encoder,
        json_url=route_path(request, "get_batch_audit", batch_id=batch_id),
    )


# --- plausibility scorers -------------------------------------------------------------------------


@router.get("/scorers/{scorer_id}", name="ui_scorer")
def scorer_page(
    scorer_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _reader: UiReader,
) -> HTMLResponse:
    """A scorer version: AUC with its interval, on how many images, the calibration curve."""
    scorer = session.get(Scorer, scorer_id)
    if scorer is None:
        return not_found(request, f"No scorer with id {scorer_id}.")
    m = metrics_of(scorer)
    newest = latest_scorer(session, scorer.domain)
    bins = [(b.mean_predicted, b.observed, b.observed_ci, b.count) for b in m.cv.calibration]
    return page(
        request,
        "scorer.html",
        title=f"Scorer #{scorer.id}",
        scorer=scorer,
        m=m,
        latest=newest is not None and newest.id == scorer.id,
        chart=calibration_chart(bins, m.cv.base_rate),
        untrained="untrained" in scorer.encoder,
        retrain_after=settings.scorer_retrain_after,
    )


# --- guidance sweeps ------------------------------------------------------------------------------


@router.get("/sweeps/{sweep_id}", name="ui_sweep")
def sweep_page(
    sweep_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    _reader: UiReader,
) -> HTMLResponse:
    """A guidance sweep: per class, plausibility against guidance with intervals, diversity,
    the recommended scale and why; the model's defaults now."""
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        return not_found(request, f"No sweep with id {sweep_id}.")
    report = sweep_report(session, sweep, storage, settings)
    api_url = route_path(request, "sweep_report", sweep_id=sweep.id)
    batches = sweep_batches(sweep)
    return page(
        request,
        "sweep.html",
        title=f"Guidance sweep #{sweep.id}",
        sweep=sweep,
        report=report,
        charts=sweep_charts(report),
        batches=batches,
        generating=[b for b in batches if b.job is not None and b.job.status in UNFINISHED],
        json_url=api_url,
        csv_url=f"{api_url}?format=csv",
        fallback=settings.default_guidance,
    )


# --- expert studies -------------------------------------------------------------------------------


@router.get("/studies/{study_id}", name="ui_study")
def study_page(
    study_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    _reader: UiReader,
) -> HTMLResponse:
    """An expert study: per class the real images' and each model's plausible rate with
    intervals, agreement per class and pooled, progress per reader and the reads not counted."""
    try:
        study = get_study(session, study_id)
    except NoStudy:
        return not_found(request, f"No study with id {study_id}.")
    report = study_report(session, study, ls_public(settings))
    api_url = route_path(request, "get_report", study_id=study.id)
    return page(
        request,
        "study.html",
        title=f"Study #{study.id}",
        report=report,
        chart=study_chart(report),
        json_url=api_url,
        csv_url=f"{api_url}?format=csv",
    )
