"""Expert studies: named readers, an overlap, one Label Studio project and one report
(``service/studies.py``)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, status
from fastapi.responses import PlainTextResponse

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep
from api.responses import ls_public
from service.studies import (
    create_study,
    get_study,
    list_studies,
    study_created,
    study_csv,
    study_out,
    study_report,
)
from service.study_schemas import StudyCreated, StudyOut, StudyReport, StudyRequest

router = APIRouter(prefix="/studies", tags=["studies"])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        404: {"description": "a batch does not exist"},
        409: {"description": "Label Studio is not configured"},
        422: {"description": "readers, overlap, batches or controls that cannot be used"},
    },
)
def post_study(
    body: StudyRequest, session: SessionDep, settings: SettingsDep, key: AdminKey
) -> StudyCreated:
    """A study: its batches' images (and ``controls``, real held-out images) blinded and
    shuffled into a Label Studio project of its own that serves each image to ``overlap``
    readers, each in a random order of their own; a sync job creates it. Only the named
    readers' reads count (Label Studio Community cannot restrict who annotates)."""
    study, sent, job = create_study(session, settings, body, key.name)
    session.commit()
    return study_created(study, sent, job, ls_public(settings))


@router.get("")
def get_studies(session: SessionDep, settings: SettingsDep, _reader: Reader) -> list[StudyOut]:
    return [study_out(s, ls_public(settings)) for s in list_studies(session)]


@router.get("/{study_id}", responses={404: {"description": "no such study"}})
def get_one(
    study_id: IdPath, session: SessionDep, settings: SettingsDep, _reader: Reader
) -> StudyOut:
    return study_out(get_study(session, study_id), ls_public(settings))


@router.get(
    "/{study_id}/report",
    response_model=StudyReport,
    responses={
        200: {
            "description": "The report as JSON (schema below) or, with ``format=csv``, as CSV.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        404: {"description": "no such study"},
    },
)
def get_report(
    study_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    _reader: Reader,
    format: Literal["json", "csv"] = "json",
) -> StudyReport | PlainTextResponse:
    """Per class, the plausible rate of the real controls and of each model (image as unit,
    Wilson 95%) and each model minus real (Newcombe 95%); Fleiss' kappa and Krippendorff's
    alpha per class and pooled; progress per reader; the reads not counted and why; the full
    plausibility report over the study's reads. Only the named readers' complete, unflagged
    reads count."""
    report = study_report(session, get_study(session, study_id), ls_public(settings))
    if format == "csv":
        return PlainTextResponse(study_csv(report), media_type="text/csv")
    return report
