"""Generated images: one PNG by id (immutable, so cached for a year by its hash)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from api.deps import IdPath, Reader, SessionDep, StorageDep, get_or_404
from service.db.models import Image
from service.storage import ObjectNotFound

router = APIRouter(tags=["batches"])


@router.get(
    "/images/{image_id}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def get_image(
    image_id: IdPath, session: SessionDep, storage: StorageDep, _reader: Reader
) -> Response:
    image = get_or_404(session, Image, image_id)
    try:
        data = storage.get_bytes(image.storage_key)
    except ObjectNotFound as exc:
        raise HTTPException(404, f"image {image_id} is missing from storage") from exc
    return Response(
        data,
        media_type="image/png",
        headers={"ETag": f'"{image.sha256}"', "Cache-Control": "public, max-age=31536000"},
    )
