"""Object storage for images, checkpoints and archives, shared by the API and the Celery workers.

Two backends behind one :class:`Storage` protocol: :class:`LocalStorage` (a folder; development,
single host) and :class:`S3Storage` (S3 or MinIO; several hosts). Keys are relative POSIX paths
such as ``"batches/12/mel_0003.png"``, checked by :func:`validate_key` so no key can escape the
local root or alias another. The API must start fast and workers must not pay for the web stack,
so this module imports neither torch nor fastapi; boto3 is imported only by :class:`S3Storage`.

A missing key raises :class:`ObjectNotFound`; an unusable backend (unreachable, bucket missing,
permission denied, disk full) raises ``ServiceUnavailable("storage", ...)``
(``service.exceptions``), which the API answers with 503.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from service.config import Settings, get_settings
from service.exceptions import ServiceUnavailable

CHUNK = 1024 * 1024  # stream and copy granularity
_TMP = ".protomed-tmp-"  # in-flight local writes; never listed as keys


class StorageError(Exception):
    """Base of every storage failure that is not a plain unavailability."""


class ObjectNotFound(StorageError, KeyError):
    """No object under the key (a ``KeyError`` too, so mapping-style callers work)."""


def _unavailable(reason: str) -> ServiceUnavailable:
    return ServiceUnavailable("storage", reason)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX path, else raise ``ValueError``.

    Rejects empty keys, absolute paths, backslashes, NUL and empty/'.'/'..' segments, so a key
    maps to exactly one file under the local root and the same name in a bucket.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"storage key has NUL or backslash: {key!r}")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"storage key has an empty, '.' or '..' segment: {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    """A prefix is a key that may end with '/'; it must not be empty (no accidental wipe-all)."""
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@runtime_checkable
class Storage(Protocol):
    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...
    def put_file(
        self,
        key: str,
        path: Path,
        content_type: str = "application/octet-stream",
        *,
        link: bool = False,
    ) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, dest: Path, *, link: bool = False) -> Path: ...
    def open_stream(self, key: str) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def ping(self) -> None: ...
    def describe(self) -> str: ...
    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None: ...


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """Write through a temp file in ``dest``'s folder and rename, so readers never see half."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP, dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; API and workers may run as different users
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(src: Path, tmp: Path) -> None:
    """Hard-link ``src`` at ``tmp`` (the temp name :func:`_atomic_write` renames into place), so
    a 40 MB checkpoint is on disk once; a copy where no link can be made (another filesystem, no
    permission). Only for files that are replaced whole, never written in place (``link=True``
    says so): then every name keeps the bytes it had when it was linked."""
    try:
        tmp.unlink()
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)


def _require_file(path: Path) -> None:
    """A missing source is the caller's bug, not a missing object: say so plainly."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file to upload: {path}")


def _iter_file(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


_UNAVAILABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class LocalStorage:
    """Objects as files under ``root``; writes are atomic (temp file + ``os.replace``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        with contextlib.suppress(OSError):  # if this fails, ping() and every call report it
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _errors(self, key: str, reading: bool = False) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            if not self.root.is_dir():  # the store itself is gone (unmounted volume, a file)
                raise _unavailable(f"{self.describe()}: root is not a folder") from e
            if reading:
                raise ObjectNotFound(key) from e
            raise StorageError(f"{key}: {e}") from e  # e.g. a key's folder is an object
        except OSError as e:
            if e.errno in _UNAVAILABLE_ERRNOS:
                raise _unavailable(f"{self.describe()}: {e.strerror}") from e
            raise StorageError(f"{key}: {e}") from e

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        with self._errors(key):
            _atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def put_file(
        self,
        key: str,
        path: Path,
        content_type: str = "application/octet-stream",
        *,
        link: bool = False,
    ) -> None:
        """``link``: ``path`` is only ever replaced whole, so the object may share its inode."""
        dest = self._path(key)
        _require_file(path)
        copy = _link_or_copy if link else shutil.copyfile
        with self._errors(key):
            _atomic_write(dest, lambda tmp: copy(path, tmp))

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key, reading=True):
            return self._path(key).read_bytes()

    def download(self, key: str, dest: Path, *, link: bool = False) -> Path:
        """``link``: the caller only reads ``dest`` (objects are replaced whole, never written
        in place), so it may share the object's inode."""
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(key)
        copy = _link_or_copy if link else shutil.copyfile
        with self._errors(key):
            _atomic_write(Path(dest), lambda tmp: copy(src, tmp))
        return Path(dest)

    def open_stream(self, key: str) -> Iterator[bytes]:
        """Opens now, so a missing key raises here rather than mid-response."""
        with self._errors(key, reading=True):
            return _iter_file(self._path(key).open("rb"))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        """S3 semantics: a plain string prefix ("batches/1" also matches "batches/12/...")."""
        _validate_prefix(prefix)
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and _TMP not in k)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            with self._errors(key):
                self._path(key).unlink(missing_ok=True)
        for d in sorted({self._path(k).parent for k in keys}, key=lambda p: -len(p.parts)):
            try:
                while d != self.root and not any(d.iterdir()):
                    d.rmdir()  # prune folders the deletion emptied
                    d = d.parent
            except OSError:
                pass  # gone already, or a concurrent writer just used it
        return len(keys)

    def ping(self) -> None:
        """Checks the root is a writable folder (creating it), so readiness catches a bad mount."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(prefix=_TMP, dir=self.root) as f:
                f.write(b"ping")
        except OSError as e:
            raise _unavailable(f"{self.describe()}: {e.strerror or e}") from e

    def describe(self) -> str:
        return f"local:{self.root}"

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        validate_key(key)
        return None  # the API streams local objects itself


_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_UNAVAILABLE_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500",
}


def _code(e: Any) -> str:
    """The S3 error code of a botocore ``ClientError`` ("NoSuchKey", "404", ...)."""
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Storage:
    """Objects in an S3/MinIO bucket (optionally under ``prefix``).

    Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` env vars, shared config, instance role); none are kept in settings.
    Timeouts are short and retries few so a readiness check fails within seconds.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        prefix: str = "",
        client: Any = None,
    ) -> None:
        import boto3  # lazy: keeps `import service.storage` fast
        from botocore.config import Config

        self.bucket, self.endpoint_url, self.region = bucket, endpoint_url, region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(
            connect_timeout=3,
            read_timeout=20,
            retries={"total_max_attempts": 2, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},  # MinIO needs path
        )
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Map botocore/boto3 errors: missing key -> ObjectNotFound, backend -> unavailable."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            code = _code(e)
            if code in _NOT_FOUND and key is not None:
                raise ObjectNotFound(key) from e
            if code in _NOT_FOUND or code in _UNAVAILABLE_CODES:
                raise _unavailable(f"{self.describe()}: {code or e}") from e
            raise StorageError(f"{self.describe()}: {e}") from e
        except (BotoCoreError, Boto3Error) as e:  # connection refused/timeout, no credentials
            raise _unavailable(f"{self.describe()}: {e}") from e

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        k = self._key(key)
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data, ContentType=content_type)

    def put_file(
        self,
        key: str,
        path: Path,
        content_type: str = "application/octet-stream",
        *,
        link: bool = False,
    ) -> None:
        """Multipart, streamed from disk by boto3's transfer manager (``link`` has no meaning
        for a remote store)."""
        k = self._key(key)
        _require_file(path)
        with self._errors():
            self.client.upload_file(
                str(path), self.bucket, k, ExtraArgs={"ContentType": content_type}
            )

    def get_bytes(self, key: str) -> bytes:
        k = self._key(key)
        with self._errors(key):
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            return body

    def download(self, key: str, dest: Path, *, link: bool = False) -> Path:
        k = self._key(key)
        with self._errors(key):
            _atomic_write(
                Path(dest), lambda tmp: self.client.download_file(self.bucket, k, str(tmp))
            )
        return Path(dest)

    def open_stream(self, key: str) -> Iterator[bytes]:
        """Sends the GET now, so a missing key raises here rather than mid-response."""
        k = self._key(key)
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=k)["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return chunks()

    def exists(self, key: str) -> bool:
        k = self._key(key)
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=k)
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        full = self.prefix + _validate_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        with self._errors():
            return sorted(
                o["Key"][len(self.prefix) :] for p in pages for o in p.get("Contents", [])
            )

    def delete_prefix(self, prefix: str) -> int:
        keys = [self.prefix + k for k in self.list_keys(prefix)]
        deleted = 0
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": False}
            with self._errors():
                out = self.client.delete_objects(Bucket=self.bucket, Delete=batch)
            if out.get("Errors"):
                raise StorageError(f"{self.describe()}: delete failed: {out['Errors'][:3]}")
            deleted += len(out.get("Deleted", []))
        return deleted

    def ping(self) -> None:
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing; for tests and `serve`, never called implicitly."""
        from botocore.exceptions import ClientError

        extra = {}
        if self.region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        with self._errors():
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if _code(e) not in _NOT_FOUND | {"NoSuchBucket"}:
                    raise
            try:
                self.client.create_bucket(Bucket=self.bucket, **extra)
            except ClientError as e:
                if _code(e) != "BucketAlreadyOwnedByYou":  # else a concurrent creator won
                    raise

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} ({self.endpoint_url})" if self.endpoint_url else where

    def presigned_url(self, key: str, expires_s: int = 3600) -> str | None:
        """A GET URL clients fetch directly, sparing the API the bytes; existence not checked."""
        k = self._key(key)
        with self._errors():
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": k}, ExpiresIn=expires_s
            )
            return url


def make_storage(settings: Settings) -> Storage:
    """The backend the settings name; S3 settings are checked complete by ``Settings``."""
    if settings.storage_backend == "s3":
        assert settings.s3_bucket  # guaranteed by Settings._s3_complete
        return S3Storage(
            settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region, settings.s3_prefix
        )
    return LocalStorage(settings.storage_dir)


@lru_cache(maxsize=1)
def get_storage() -> Storage:
    """The process-wide storage (one boto3 client per process; clients are thread-safe).

    Tests that change settings call ``get_storage.cache_clear()``.
    """
    return make_storage(get_settings())
