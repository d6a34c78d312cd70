"""Unpacking uploaded dataset zips safely, and fetching them onto a worker's disk.

An uploaded zip is untrusted: :func:`safe_extract` refuses path tricks (absolute names, drive
letters, backslashes, ``..``), symlinks, too many entries and zip bombs (declared sizes are
checked first, then the bytes actually written, since a zip may lie), and leaves nothing behind
when it refuses. Torch-free: the API imports it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from ml.errors import Invalid
from service.storage import CHUNK

if TYPE_CHECKING:
    from service.storage import Storage

log = logging.getLogger(__name__)

IGNORED_DIRS = ("__MACOSX",)  # resource forks added by macOS's Archive Utility
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(Invalid):
    """The archive is refused; the message says why and what is allowed."""


class ArchiveTooLarge(ArchiveError):
    """The archive has more entries or unpacks to more bytes than allowed (the API answers 413,
    which the upload route says itself)."""


def _check_name(name: str) -> None:
    """Refuse entry names that could land outside the destination."""
    if "\x00" in name:
        raise ArchiveError(f"entry {name!r} has a NUL character in its name")
    if "\\" in name:
        raise ArchiveError(f"entry {name!r} contains a backslash; use '/' as path separator")
    if name.startswith("/"):
        raise ArchiveError(f"entry {name!r} is an absolute path; entries must be relative")
    if _DRIVE.match(name):
        raise ArchiveError(f"entry {name!r} starts with a drive letter; entries must be relative")
    if ".." in name.split("/"):
        raise ArchiveError(f"entry {name!r} contains a '..' segment; entries must stay inside")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _ignored(parts: tuple[str, ...]) -> bool:
    """``__MACOSX/`` and dotfiles (or anything in a dot-folder) are skipped."""
    return parts[0] in IGNORED_DIRS or any(p.startswith(".") for p in parts)


def _members(zf: zipfile.ZipFile, max_bytes: int, max_files: int) -> list[zipfile.ZipInfo]:
    """Validate every entry and the declared totals; return the entries to extract."""
    infos = zf.infolist()
    n_files = sum(not i.is_dir() for i in infos)
    if n_files > max_files:
        raise ArchiveTooLarge(f"archive has {n_files} files; at most {max_files} are allowed")
    keep = []
    for info in infos:
        _check_name(info.filename)
        if _is_symlink(info):
            raise ArchiveError(f"entry {info.filename!r} is a symbolic link; links are refused")
        parts = tuple(p for p in PurePosixPath(info.filename).parts if p != ".")
        if parts and not _ignored(parts):
            keep.append(info)
    declared = sum(i.file_size for i in keep)
    if declared > max_bytes:
        raise ArchiveTooLarge(
            f"archive would unpack to {declared} bytes; at most {max_bytes} bytes are allowed"
        )
    if not any(not i.is_dir() for i in keep):
        raise ArchiveError("archive holds no files (besides __MACOSX/ and dotfiles)")
    return keep


def copy_limited(src: IO[bytes], dst: IO[bytes], budget: int, message: str) -> int:
    """Copy ``src`` to ``dst`` in chunks and return the bytes copied; past ``budget`` bytes,
    stop and raise :class:`ArchiveTooLarge` with ``message``."""
    written = 0
    while chunk := src.read(CHUNK):
        written += len(chunk)
        if written > budget:
            raise ArchiveTooLarge(message)
        dst.write(chunk)
    return written


def _extract(
    zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], out: Path, max_bytes: int
) -> None:
    """Stream ``members`` into ``out``, counting the bytes really written against the limit."""
    too_much = f"archive unpacks to more than the {max_bytes} bytes allowed"
    left = max_bytes
    for info in members:
        target = out.joinpath(*PurePosixPath(info.filename).parts)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "xb") as dst:  # "x": duplicate names fail
            left -= copy_limited(src, dst, left, too_much)


def _refusal(exc: BaseException) -> ArchiveError | None:
    """The :class:`ArchiveError` that an extraction failure means, or None (not the zip's fault)."""
    if isinstance(exc, ArchiveError):
        return exc
    if isinstance(exc, zipfile.BadZipFile | zlib.error | EOFError):
        return ArchiveError(f"corrupt zip archive: {exc}")
    if isinstance(exc, NotImplementedError | RuntimeError):  # unknown compression, encryption
        return ArchiveError(f"unsupported zip archive: {exc}")
    if isinstance(exc, FileExistsError | IsADirectoryError | NotADirectoryError):
        name = Path(str(exc.filename or "?")).name
        return ArchiveError(f"archive has duplicate or conflicting entries (at {name!r})")
    return None


def find_root(folder: Path) -> Path:
    """The folder itself, or its only visible entry when that is a folder."""
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(visible) == 1 and visible[0].is_dir() and visible[0].name not in IGNORED_DIRS:
        return visible[0]
    return folder


def safe_extract(src: Path, dest: Path, *, max_bytes: int, max_files: int) -> Path:
    """Unpack the zip ``src`` into the new folder ``dest``; return the dataset root in it.

    The root is ``dest``, or its single top-level folder if the zip has one. Everything is
    unpacked into a temporary folder beside ``dest`` and renamed at the end, so a refused or
    failed archive leaves nothing behind. Raises :class:`ArchiveError` (or
    :class:`ArchiveTooLarge`) for refused archives, :class:`FileExistsError` if ``dest`` exists.
    """
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    if not zipfile.is_zipfile(src):
        raise ArchiveError("not a zip archive; upload the dataset as a .zip file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with zipfile.ZipFile(src) as zf:
            members = _members(zf, max_bytes, max_files)
            _extract(zf, members, tmp, max_bytes)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        refusal = _refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.exists():  # created meanwhile (another process unpacking the same archive)
            raise FileExistsError(f"{dest} already exists") from None
        raise
    return find_root(dest)


def ensure_local(
    dataset_root: str,
    archive_key: str | None,
    storage: Storage,
    work_dir: Path,
    *,
    max_bytes: int,
    max_files: int,
) -> Path:
    """A dataset's root on this machine: ``dataset_root`` if it exists here, else the
    uploaded archive fetched from storage into ``work_dir/datasets/<archive stem>/`` and
    unpacked with the same checks (once; later calls reuse it)."""
    root = Path(dataset_root)
    if root.is_dir():
        return root
    if archive_key is None:
        raise FileNotFoundError(
            f"dataset folder {root} does not exist on this machine and the dataset has no "
            "uploaded archive in storage to fetch it from"
        )
    dest = work_dir.expanduser().resolve() / "datasets" / PurePosixPath(archive_key).stem
    if dest.is_dir():
        return find_root(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".zip", dir=dest.parent)
    os.close(fd)
    try:
        storage.download(archive_key, Path(name))
        log.info("unpacking %s into %s", archive_key, dest)
        return safe_extract(Path(name), dest, max_bytes=max_bytes, max_files=max_files)
    except FileExistsError:
        if dest.is_dir():  # another worker unpacked it meanwhile
            return find_root(dest)
        raise
    finally:
        Path(name).unlink(missing_ok=True)
