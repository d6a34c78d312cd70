"""Registering datasets: the data-root policy (a server folder must lie under
``Settings.data_roots``, so callers cannot make the workers read arbitrary server paths), the
scan that refuses a dataset without labelled images at registration rather than at training
time, and the row. The API's folder registration and upload both use these, and any other
caller gets the same rules and messages."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ml.data.catalog import IMAGE_SUFFIXES, Catalog, scan
from ml.errors import Conflict, Invalid
from service.config import Settings
from service.criteria import known_domains
from service.db.models import Dataset


def _inside(path: Path, root: Path) -> bool:
    return path.is_relative_to(root)


def resolve_folder(path: str, data_roots: list[Path]) -> Path:
    """The real folder ``path`` names under one of ``data_roots`` (symlinks resolved).

    Absolute paths must resolve inside a root; relative ones are tried against each root in
    order and the first that exists wins. :class:`Invalid` naming the problem and what is allowed.
    """
    try:
        return _resolve_folder(path, data_roots)
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise Invalid(f"path {path[:80]!r} cannot be used: {exc.strerror}") from exc


def _resolve_folder(path: str, data_roots: list[Path]) -> Path:
    if "\x00" in path:
        raise Invalid("path must not contain a NUL character")
    if ".." in path.replace("\\", "/").split("/"):
        raise Invalid(f"path {path!r} has a '..' segment; name a folder under a data root")
    if not data_roots:
        raise Invalid(
            "registering server folders is disabled: no data roots are configured; set "
            'PROTOMED_DATA_ROOTS to a JSON list of allowed folders, e.g. ["/data"], or upload '
            "a zip to POST /datasets/upload"
        )
    roots = [r.expanduser().resolve() for r in data_roots]
    allowed = ", ".join(str(r) for r in roots)
    if Path(path).is_absolute():
        folder = Path(path).resolve()
        if not any(_inside(folder, r) for r in roots):
            raise Invalid(f"path {path} is outside the allowed data roots: {allowed}")
    else:
        found = [(r / path).resolve() for r in roots if (r / path).exists()]
        if not found:
            raise Invalid(f"no folder {path!r} under any data root ({allowed})")
        folder = found[0]
        if not any(_inside(folder, r) for r in roots):
            raise Invalid(
                f"path {path!r} resolves to {folder}, outside the allowed data roots: {allowed}"
            )
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise Invalid(f"path {path} {what}; name a folder under a data root ({allowed})")
    return folder


def scan_dataset(root: Path, layout: str, settings: Settings) -> Catalog:
    """Scan ``root``; :class:`Invalid` if it cannot be read, holds no labelled images (images over
    ``max_image_pixels`` are left out and reported), has two Unicode spellings of one class
    name, or links to files outside :meth:`Settings.dataset_roots` (the list the workers check
    again whenever they read it)."""
    try:
        catalog = scan(root, layout, settings.dataset_roots(), settings.max_image_pixels)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        raise Invalid(f"cannot read the dataset: {exc}") from exc
    if not catalog.classes or not any(catalog.counts().values()):
        raise Invalid(
            f"no labelled images found (layout {catalog.layout}): expected one sub-folder per "
            f"class holding images ({', '.join(IMAGE_SUFFIXES)}), or a HAM10000 or Matek layout"
        )
    return catalog


def check_domain(session: Session, domain: str | None) -> None:
    """:class:`Invalid` unless ``domain`` is None or has criteria (reviews of the dataset
    need them)."""
    if domain is None:
        return
    known = known_domains(session)
    if domain not in known:
        raise Invalid(
            f"unknown review domain {domain!r}; known: {', '.join(known)} "
            "(or create one with POST /criteria/{domain})"
        )


def check_name_free(session: Session, name: str) -> None:
    """:class:`Conflict` if a dataset already has this name (names are how users tell them
    apart)."""
    if session.scalar(select(func.count()).where(Dataset.name == name)):
        raise Conflict(f"a dataset named {name!r} already exists")


def insert_dataset(session: Session, row: Dataset) -> None:
    """Store the row (committed); :class:`Conflict` if a concurrent registration took its name
    since :func:`check_name_free`."""
    session.add(row)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a dataset named {row.name!r} already exists") from exc


def dataset_row(
    name: str, root: Path, catalog: Catalog, domain: str | None, **extra: object
) -> Dataset:
    return Dataset(
        name=name,
        root=str(root),
        layout=catalog.layout,
        classes=catalog.classes,
        counts=catalog.counts(),
        domain=domain,
        **extra,
    )


def register_folder(
    session: Session,
    settings: Settings,
    name: str,
    path: str,
    layout: str,
    domain: str | None,
    licence: str | None,
) -> tuple[Dataset, Catalog]:
    """Register a server folder under one of the data roots: checked, scanned and stored. The
    catalog comes back too, for the files it skipped."""
    folder = resolve_folder(path, settings.data_roots)
    check_name_free(session, name)
    check_domain(session, domain)
    catalog = scan_dataset(folder, layout, settings)
    row = dataset_row(name, folder, catalog, domain, licence=licence)
    insert_dataset(session, row)
    return row, catalog
