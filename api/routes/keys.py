"""API keys: admins create (the token is shown once), list and revoke them."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from api.deps import AdminKey, IdPath, SessionDep, get_or_404
from api.schemas import KeyIn, KeyOut
from service.db.models import ApiKey, utc_now
from service.security import create_key

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
    row = get_or_404(session, ApiKey, key_id, "API key")
    if row.id == admin.id:
        raise HTTPException(status.HTTP_409_CONFLICT, "a key cannot revoke itself")
    if row.revoked_at is None:
        row.revoked_at = utc_now()
        session.commit()
    return KeyOut.model_validate(row)
