"""Datasets: register a server-side folder or upload a zip, then list and inspect them.

Folders must lie under ``Settings.data_roots`` so API clients cannot make the workers read
arbitrary server paths; uploads are unpacked with the checks of :mod:`service.archive`. Both are
scanned with :func:`ml.data.catalog.scan` (torch-free) so a dataset without labelled images is
refused
at registration, not at training time.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from fastapi.routing import APIRoute
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
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
from ml.data.catalog import IMAGE_SUFFIXES, Catalog, Layout, scan
from service.archive import ArchiveTooLarge, copy_limited, safe_extract
from service.config import Settings, get_settings
from service.criteria import known_domains
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


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def _inside(path: Path, root: Path) -> bool:
    return path.is_relative_to(root)


def resolve_folder(path: str, data_roots: list[Path]) -> Path:
    """The real folder ``path`` names under one of ``data_roots`` (symlinks resolved).

    Absolute paths must resolve inside a root; relative ones are tried against each root in
    order and the first that exists wins. Raises 422 naming the problem and what is allowed.
    """
    try:
        return _resolve_folder(path, data_roots)
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise _unprocessable(f"path {path[:80]!r} cannot be used: {exc.strerror}") from exc


def _resolve_folder(path: str, data_roots: list[Path]) -> Path:
    if "\x00" in path:
        raise _unprocessable("path must not contain a NUL character")
    if ".." in path.replace("\\", "/").split("/"):
        raise _unprocessable(f"path {path!r} has a '..' segment; name a folder under a data root")
    if not data_roots:
        raise _unprocessable(
            "registering server folders is disabled: no data roots are configured; set "
            'PROTOMED_DATA_ROOTS to a JSON list of allowed folders, e.g. ["/data"], or upload '
            "a zip to POST /datasets/upload"
        )
    roots = [r.expanduser().resolve() for r in data_roots]
    allowed = ", ".join(str(r) for r in roots)
    if Path(path).is_absolute():
        folder = Path(path).resolve()
        if not any(_inside(folder, r) for r in roots):
            raise _unprocessable(f"path {path} is outside the allowed data roots: {allowed}")
    else:
        found = [(r / path).resolve() for r in roots if (r / path).exists()]
        if not found:
            raise _unprocessable(f"no folder {path!r} under any data root ({allowed})")
        folder = found[0]
        if not any(_inside(folder, r) for r in roots):
            raise _unprocessable(
                f"path {path!r} resolves to {folder}, outside the allowed data roots: {allowed}"
            )
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise _unprocessable(f"path {path} {what}; name a folder under a data root ({allowed})")
    return folder


def scan_dataset(root: Path, layout: str, settings: Settings) -> Catalog:
    """Scan ``root``; 422 if it cannot be read, holds no labelled images (images over
    ``max_image_pixels`` are left out and reported), has two Unicode spellings of one class
    name, or links to files outside :meth:`Settings.dataset_roots` (the list the workers check
    again whenever they read it)."""
    try:
        catalog = scan(root, layout, settings.dataset_roots(), settings.max_image_pixels)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        raise _unprocessable(f"cannot read the dataset: {exc}") from exc
    if not catalog.classes or not any(catalog.counts().values()):
        raise _unprocessable(
            f"no labelled images found (layout {catalog.layout}): expected one sub-folder per "
            f"class holding images ({', '.join(IMAGE_SUFFIXES)}), or a HAM10000 or Matek layout"
        )
    return catalog


def check_domain(session: Session, domain: str | None) -> None:
    """422 unless ``domain`` is None or has criteria (reviews of the dataset need them)."""
    if domain is None:
        return
    known = known_domains(session)
    if domain not in known:
        raise _unprocessable(
            f"unknown review domain {domain!r}; known: {', '.join(known)} "
            "(or create one with POST /criteria/{domain})"
        )


def _check_name_free(session: Session, name: str) -> None:
    if session.scalar(select(func.count()).where(Dataset.name == name)):
        raise HTTPException(status.HTTP_409_CONFLICT, f"a dataset named {name!r} already exists")


def _insert(session: Session, row: Dataset, catalog: Catalog) -> DatasetRegistered:
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent registration took the name
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"a dataset named {row.name!r} already exists"
        ) from exc
    root = Path(row.root)
    skipped = [
        SkippedFile(path=str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p,
                    reason=reason)
        for p, reason in catalog.not_images
    ]  # fmt: skip
    return DatasetRegistered.model_validate(row).model_copy(update={"skipped": skipped})


def _row(name: str, root: Path, catalog: Catalog, domain: str | None, **extra: object) -> Dataset:
    return Dataset(
        name=name,
        root=str(root),
        layout=catalog.layout,
        classes=catalog.classes,
        counts=catalog.counts(),
        domain=domain,
        **extra,
    )


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
    folder = resolve_folder(body.path, settings.data_roots)
    _check_name_free(session, body.name)
    check_domain(session, body.domain)
    catalog = scan_dataset(folder, body.layout, settings)
    row = _row(body.name, folder, catalog, body.domain, licence=body.licence)
    return _insert(session, row, catalog)


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
    _check_name_free(session, name)
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
        row = _row(name, root, catalog, domain, source=DatasetSource.upload, archive_key=key,
                   licence=licence)  # fmt: skip
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
