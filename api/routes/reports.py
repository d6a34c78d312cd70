"""Reports: the plausibility of generated images as experts judged them (the seed's Tables 3-4)
and the latest evaluation without experts (Tables 5-6, CLIP-space metrics); JSON or CSV."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from api.deps import Reader, SessionDep
from api.schemas import EvaluationReport
from service.db.models import MAX_ID
from service.evaluations import evaluation_csv, evaluation_of, finished_evaluation
from service.report_schemas import Flagged, PlausibilityReport
from service.reports import report_csv
from service.reviews import plausibility
from service.study_statistics import DEFAULT_MARGIN

router = APIRouter(prefix="/reports")


@router.get(
    "/plausibility",
    tags=["reviews"],
    response_model=PlausibilityReport,
    responses={
        200: {
            "description": "The report as JSON (schema below) or, with ``format=csv``, as CSV "
            "in the seed's Tables 3-4 layout.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
def plausibility_endpoint(
    session: SessionDep,
    _reader: Reader,
    dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    models: Annotated[str | None, Query(description="Comma-separated model ids.")] = None,
    reviewer: Annotated[
        str | None, Query(max_length=254, description="Label Studio user id or e-mail.")
    ] = None,
    criteria_set_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    flagged: Annotated[
        Flagged,
        Query(
            description="Verdicts Label Studio says someone other than their reviewer wrote: "
            "include (counted, the default), exclude (left out) or only (nothing else)."
        ),
    ] = "include",
    margin: Annotated[
        float,
        Query(
            gt=0,
            lt=0.5,
            description="Equivalence margin of the 'real or synthetic?' test against chance: "
            "'indistinguishable' needs readers' accuracy shown within 0.5 +- margin.",
        ),
    ] = DEFAULT_MARGIN,
    format: Literal["json", "csv"] = "json",
) -> PlausibilityReport | PlainTextResponse:
    """Per class and model, % of images judged plausible (the image is the unit: its
    reviewers' majority, a tie counting as implausible), prototype minus baseline with a 95%
    interval (Newcombe/Wilson), Fisher's exact p raw and Holm-adjusted over the classes; macro
    and pooled averages with a Cochran-Mantel-Haenszel test stratified by class; failure rate
    per criterion; agreement between reviewers; how many verdicts were incomplete (counted
    nowhere) and flagged; where reviewers answered "real or synthetic?", how well they told
    real from synthetic images (``discrimination``). ``format=csv``: the seed's Tables 3-4
    layout."""
    report = plausibility(
        session, dataset_id, models, reviewer, criteria_set_id, flagged, margin=margin
    )
    if format == "csv":
        return PlainTextResponse(report_csv(report), media_type="text/csv")
    return report


@router.get(
    "/evaluation",
    tags=["evaluation"],
    response_model=EvaluationReport,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}},
)
def evaluation_report(
    session: SessionDep,
    _reader: Reader,
    dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    job_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    format: Literal["json", "csv"] = "json",
) -> EvaluationReport | PlainTextResponse:
    """The latest finished evaluation (of a dataset, or a given job): the job's id, request and
    finish time, then its result (``test_set`` says which real images every score is measured
    on). ``format=csv``: every table, as the CLI prints them."""
    job = finished_evaluation(session, dataset_id, job_id)
    params, result = evaluation_of(job)
    if format == "csv":
        return PlainTextResponse(evaluation_csv(result), media_type="text/csv")
    return EvaluationReport(
        **dict(result), job_id=job.id, params=params, finished_at=job.finished_at
    )
