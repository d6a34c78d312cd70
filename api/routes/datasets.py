"""Datasets: register a server-side folder or upload a zip, then list and inspect them.

Folders must lie under ``Settings.data_roots`` so API clients cannot make the workers read
arbitrary server paths; uploads are unpacked with the checks of :mod:`service.archive`. Both are
scanned with :func:`ml.data.catalog.scan` (torch-free) so a dataset without labelled images is
refused at registration, not at training time; those rules are :mod:`service.datasets`.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from api.deps import AdminKey, IdPath, Reader, SessionDep, SettingsDep, StorageDep, get_or_404
from api.schemas import (
    LICENCE_HELP,
    NAME_PATTERN,
    DatasetIn,
    DatasetOut,
    DatasetRegistered,
    SkippedFile,
)
from ml.data.catalog import Catalog, Layout
from service import datasets
from service.archive import ArchiveTooLarge, copy_limited, safe_extract
from service.config import Settings, get_settings
from service.datasets import (
    check_domain,
    check_name_free,
    dataset_row,
    insert_dataset,
    scan_dataset,
)
from service.db.models import Dataset, DatasetSource
from service.storage import Storage

log = logging.getLogger(__name__)

FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and text fields on top of the zip itself
UPLOAD_PREFIX = "datasets/uploads"


def _too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"upload too large: at most {limit} bytes are accepted (PROTOMED_MAX_UPLOAD_BYTES)",
    )


class BodyLimitRoute(APIRoute):
    """Refuses a request body over ``max_upload_bytes`` (plus form overhead) as it arrives,
    before the multipart parser spools it to disk: by Content-Length, else by counting."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = get_settings().max_upload_bytes
        limit = allowed + FORM_OVERHEAD
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(allowed)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(allowed)
            return message

        await super().handle(scope, counted, send)


router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=BodyLimitRoute)


# --- validation helpers ------------------------------------------------------------------------


def _registered(row: Dataset, catalog: Catalog) -> DatasetRegistered:
    """The stored row as answered, with the files named like images that are none."""
    root = Path(row.root)
    skipped = [
        SkippedFile(
            path=str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p,
            reason=reason,
        )
        for p, reason in catalog.not_images
    ]
    return DatasetRegistered.model_validate(row).model_copy(update={"skipped": skipped})


def _insert(session: Session, row: Dataset, catalog: Catalog) -> DatasetRegistered:
    insert_dataset(session, row)
    return _registered(row, catalog)


def _receive_zip(file: UploadFile, dest: Path, max_bytes: int) -> None:
    """Copy the upload to ``dest``; 413 past ``max_bytes``."""
    try:
        with open(dest, "xb") as out:
            copy_limited(file.file, out, max_bytes, "upload too large")
    except ArchiveTooLarge as exc:
        raise _too_large(max_bytes) from exc


def _unpack(src: Path, dest: Path, settings: Settings) -> Path:
    """safe_extract with the settings' limits: 413 over a limit, 422 for a refused archive."""
    try:
        return safe_extract(
            src, dest, max_bytes=settings.max_unpacked_bytes, max_files=settings.max_upload_files
        )
    except ArchiveTooLarge as exc:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{exc} (PROTOMED_MAX_UNPACKED_BYTES / PROTOMED_MAX_UPLOAD_FILES)",
        ) from exc


def _discard(storage: Storage, key: str) -> None:
    try:
        storage.delete_prefix(key)
    except Exception as exc:  # cleanup must not hide the original error
        log.warning("could not delete %s from storage after a failed upload: %s", key, exc)


# --- routes ------------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED)
def register_folder(
    body: DatasetIn, session: SessionDep, settings: SettingsDep, _admin: AdminKey
) -> DatasetRegistered:
    """Register a folder under one of the data roots (422 if outside or without images, if a
    link inside leads outside the roots, or for an unknown review domain); ``skipped`` lists
    files named like images that are none."""
    row, catalog = datasets.register_folder(
        session, settings, body.name, body.path, body.layout, body.domain, body.licence
    )
    return _registered(row, catalog)


@router.post("/upload", status_code=status.HTTP_201_CREATED)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    _admin: AdminKey,
    name: Annotated[str, Form(min_length=1, max_length=200, pattern=NAME_PATTERN)],
    file: Annotated[UploadFile, File(description="The dataset as a .zip archive.")],
    layout: Annotated[Layout, Form()] = "auto",
    domain: Annotated[str | None, Form(max_length=64)] = None,
    licence: Annotated[str | None, Form(max_length=200, description=LICENCE_HELP)] = None,
) -> DatasetRegistered:
    """Upload a zip (413 over the size limits, 422 if refused or without images); it is kept
    in storage so workers on other machines can fetch it."""
    check_name_free(session, name)
    check_domain(session, domain)
    uid = uuid.uuid4().hex
    work = settings.uploads_dir()
    work.mkdir(parents=True, exist_ok=True)
    zip_path, unpacked = work / f".upload-{uid}.zip", work / uid
    key, stored = f"{UPLOAD_PREFIX}/{uid}.zip", False
    try:
        _receive_zip(file, zip_path, settings.max_upload_bytes)
        root = _unpack(zip_path, unpacked, settings)
        catalog = scan_dataset(root, layout, settings)
        storage.put_file(key, zip_path, "application/zip")
        stored = True
        row = dataset_row(
            name,
            root,
            catalog,
            domain,
            source=DatasetSource.upload,
            archive_key=key,
            licence=licence,
        )
        return _insert(session, row, catalog)
    except BaseException:
        shutil.rmtree(unpacked, ignore_errors=True)
        if stored:
            _discard(storage, key)
        raise
    finally:
        zip_path.unlink(missing_ok=True)


@router.get("")
def list_datasets(session: SessionDep, _reader: Reader) -> list[DatasetOut]:
    """Every registered dataset, oldest first."""
    rows = session.scalars(select(Dataset).order_by(Dataset.id))
    return [DatasetOut.model_validate(r) for r in rows]


@router.get("/{dataset_id}")
def get_dataset(dataset_id: IdPath, session: SessionDep, _reader: Reader) -> DatasetOut:
    """One dataset (404 if there is none with this id)."""
    return DatasetOut.model_validate(get_or_404(session, Dataset, dataset_id))
