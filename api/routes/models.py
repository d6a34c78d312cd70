"""Trained models: list (filter by dataset, status, mode), inspect, and their model cards."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from sqlalchemy import select

from api.deps import IdPath, IdQuery, Reader, SessionDep, get_or_404
from api.schemas import ModelOut
from service.db.models import Model, ModelMode, ModelStatus
from service.model_cards import ModelCard, build_card, card_markdown

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(
    session: SessionDep,
    _reader: Reader,
    dataset_id: IdQuery = None,
    status_: Annotated[ModelStatus | None, Query(alias="status")] = None,
    mode: ModelMode | None = None,
) -> list[ModelOut]:
    query = select(Model).order_by(Model.id.desc())
    if dataset_id is not None:
        query = query.where(Model.dataset_id == dataset_id)
    if status_ is not None:
        query = query.where(Model.status == status_)
    if mode is not None:
        query = query.where(Model.mode == mode)
    return [ModelOut.model_validate(m) for m in session.scalars(query)]


@router.get("/{model_id}")
def get_model(model_id: IdPath, session: SessionDep, _reader: Reader) -> ModelOut:
    return ModelOut.model_validate(get_or_404(session, Model, model_id))


@router.get(
    "/{model_id}/card",
    response_model=ModelCard,
    responses={200: {"content": {"application/json": {}, "text/markdown": {}}}},
)
def model_card(
    model_id: IdPath,
    session: SessionDep,
    _reader: Reader,
    format: Literal["json", "markdown"] = "json",
) -> ModelCard | PlainTextResponse:
    """The model card: training data and its licence, encoder, configuration, training time,
    evaluation, expert plausibility (with intervals), memorisation audits, intended use and
    limits. ``format=markdown`` for a repository or a paper's supplement."""
    card = build_card(session, get_or_404(session, Model, model_id))
    if format == "markdown":
        return PlainTextResponse(card_markdown(card), media_type="text/markdown")
    return card
