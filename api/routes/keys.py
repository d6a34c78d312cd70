"""API keys: admins create (the token is shown once), list and revoke them."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy import select

from api.deps import AdminKey, IdPath, SessionDep
from api.schemas import KeyIn, KeyOut
from service.db.models import ApiKey
from service.security import create_key, revoke_api_key

router = APIRouter(prefix="/keys", tags=["keys"])


@router.post("", status_code=status.HTTP_201_CREATED)
def new_key(body: KeyIn, session: SessionDep, _admin: AdminKey) -> KeyOut:
    row, token = create_key(session, body.name, body.role)
    session.commit()
    return KeyOut.model_validate(row).model_copy(update={"key": token})


@router.get("")
def list_keys(session: SessionDep, _admin: AdminKey) -> list[KeyOut]:
    return [KeyOut.model_validate(k) for k in session.scalars(select(ApiKey).order_by(ApiKey.id))]


@router.post("/{key_id}/revoke")
def revoke_key(key_id: IdPath, session: SessionDep, admin: AdminKey) -> KeyOut:
    return KeyOut.model_validate(revoke_api_key(session, key_id, admin))
