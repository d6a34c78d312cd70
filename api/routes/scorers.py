"""Plausibility scorers: train one for a review domain now (``POST /scorers``; they are also
retrained by themselves as verdicts arrive) and read their reports. Reviewers may not read
them (their figures come from verdicts on named image sets)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from sqlalchemy import select

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep, get_or_404
from api.responses import job_out
from api.schemas import JobOut, ScorerIn, ScorerOut
from service.db.models import Scorer
from service.scorers import latest_scorer, request_scorer

router = APIRouter(tags=["scorers"])


def scorer_out(session: SessionDep, scorer: Scorer) -> ScorerOut:
    newest = latest_scorer(session, scorer.domain)
    out = ScorerOut.model_validate(scorer)
    return out.model_copy(update={"latest": newest is not None and newest.id == scorer.id})


@router.post("/scorers", status_code=status.HTTP_202_ACCEPTED)
def train_scorer(
    body: ScorerIn, request: Request, session: SessionDep, settings: SettingsDep, key: AdminKey
) -> JobOut:
    """Queue a ``score`` job: the next scorer version of the domain, on all its reviewed
    images. 404 for an unknown domain, 409 with too few reviewed images or a job waiting."""
    return job_out(request_scorer(session, settings, body.domain, key.name), request)


@router.get("/scorers")
def list_scorers(
    session: SessionDep,
    _reader: Reader,
    domain: Annotated[str | None, Query(max_length=64)] = None,
) -> list[ScorerOut]:
    """Every scorer version (of one domain), newest first."""
    query = select(Scorer).order_by(Scorer.id.desc())
    if domain is not None:
        query = query.where(Scorer.domain == domain)
    return [scorer_out(session, s) for s in session.scalars(query)]


@router.get("/scorers/{scorer_id}")
def get_scorer(scorer_id: IdPath, session: SessionDep, _reader: Reader) -> ScorerOut:
    """One scorer version with its cross-validated AUC (interval), Brier score and
    calibration bins."""
    return scorer_out(session, get_or_404(session, Scorer, scorer_id, hint="; see GET /scorers"))
