"""One behaviour suite run against both storage backends.

moto's server mode stands in for S3/MinIO: a real HTTP server on loopback, so the S3 backend
goes through boto3's full network path (signing, timeouts, presigned URLs) without AWS.
"""

from __future__ import annotations

import socket
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from api.errors import ServiceUnavailable
from service.storage import (
    CHUNK,
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    get_storage,
    make_storage,
    validate_key,
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, and no real AWS config from the host leaking in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    request.getfixturevalue("aws_env")
    endpoint = request.getfixturevalue("moto_endpoint")
    s3 = S3Storage(f"protomed-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint, prefix="pm")
    s3.ensure_bucket()
    return s3


def test_is_storage(store: Storage) -> None:
    assert isinstance(store, Storage)
    store.ping()


def test_bytes_round_trip(store: Storage) -> None:
    data = bytes(range(256)) * 10
    store.put_bytes("batches/12/mel_0003.png", data, "image/png")
    assert store.get_bytes("batches/12/mel_0003.png") == data
    store.put_bytes("batches/12/mel_0003.png", b"second")  # overwrite
    assert store.get_bytes("batches/12/mel_0003.png") == b"second"


def test_file_round_trip_and_download(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    data = b"\x00\x01checkpoint" * (CHUNK // 5)  # a little over 2 chunks
    src.write_bytes(data)
    store.put_file("checkpoints/7/ema.safetensors", src)
    dest = tmp_path / "deep" / "new" / "dirs" / "ema.safetensors"
    assert store.download("checkpoints/7/ema.safetensors", dest) == dest
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["ema.safetensors"]  # no temp left behind
    if isinstance(store, LocalStorage):  # readable by API and workers under other users
        assert (store.root / "checkpoints/7/ema.safetensors").stat().st_mode & 0o777 == 0o644


def test_download_missing_leaves_dest_untouched(store: Storage, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "keep.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")
    with pytest.raises(ObjectNotFound):
        store.download("nope/missing.bin", dest)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in dest.parent.iterdir()] == ["keep.bin"]


def test_open_stream_chunks(store: Storage) -> None:
    data = b"abcdefgh" * (CHUNK // 4)  # exactly 2 chunks of CHUNK bytes
    store.put_bytes("archives/3.zip", data)
    chunks = list(store.open_stream("archives/3.zip"))
    assert b"".join(chunks) == data
    assert len(chunks) >= 2
    assert all(0 < len(c) <= CHUNK for c in chunks)


def test_exists_list_delete_prefix(store: Storage) -> None:
    for key in ["batches/1/a.png", "batches/1/sub/b.png", "batches/12/c.png", "other/d.png"]:
        store.put_bytes(key, key.encode())
    assert store.exists("batches/1/a.png")
    assert not store.exists("batches/1/zzz.png")
    assert not store.exists("batches/1")  # a "folder" is not an object
    assert store.list_keys("batches/1/") == ["batches/1/a.png", "batches/1/sub/b.png"]
    assert store.list_keys("batches/1") == [  # plain string prefix, as S3 does it
        "batches/1/a.png",
        "batches/1/sub/b.png",
        "batches/12/c.png",
    ]
    assert store.list_keys("nothing/here/") == []
    assert store.delete_prefix("batches/1/") == 2
    assert store.list_keys("batches/") == ["batches/12/c.png"]
    assert not store.exists("batches/1/a.png")
    assert store.get_bytes("other/d.png") == b"other/d.png"
    assert store.delete_prefix("batches/1/") == 0


def test_missing_key(store: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        store.get_bytes("batches/9/none.png")
    with pytest.raises(KeyError):  # ObjectNotFound is a KeyError too
        store.open_stream("batches/9/none.png")
    assert issubclass(ObjectNotFound, StorageError)


BAD_KEYS = ["", "../x", "/abs", "a/../b", "a/./b", "a//b", "a\\b", "a\x00b", "..", "a/"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(store: Storage, key: str, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, src),
        lambda: store.get_bytes(key),
        lambda: store.download(key, tmp_path / "d"),
        lambda: store.open_stream(key),
        lambda: store.exists(key),
        lambda: store.presigned_url(key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    if key not in ("a/",):  # a trailing slash is fine in a prefix
        with pytest.raises(ValueError):
            store.list_keys(key)
        with pytest.raises(ValueError):
            store.delete_prefix(key)


def test_validate_key_accepts_normal() -> None:
    assert validate_key("batches/12/mel_0003.png") == "batches/12/mel_0003.png"
    assert validate_key("x") == "x"


def test_presigned_url(store: Storage) -> None:
    store.put_bytes("batches/5/img.png", b"\x89PNG fake", "image/png")
    url = store.presigned_url("batches/5/img.png", expires_s=60)
    if isinstance(store, LocalStorage):
        assert url is None
        return
    assert url is not None and url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.read() == b"\x89PNG fake"
        assert resp.headers["Content-Type"] == "image/png"


def test_s3_prefix_namespaces_keys(aws_env: None, moto_endpoint: str) -> None:
    bucket = f"protomed-{uuid.uuid4().hex[:12]}"
    a = S3Storage(bucket, endpoint_url=moto_endpoint, prefix="/tenant-a/")
    b = S3Storage(bucket, endpoint_url=moto_endpoint)
    a.ensure_bucket()
    a.ensure_bucket()  # idempotent
    a.put_bytes("k/1", b"one")
    assert a.list_keys("k/") == ["k/1"]
    assert b.list_keys("tenant-a/") == ["tenant-a/k/1"]
    assert b.get_bytes("tenant-a/k/1") == b"one"
    assert a.describe() == f"s3://{bucket}/tenant-a ({moto_endpoint})"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_is_service_unavailable(aws_env: None) -> None:
    s3 = S3Storage("protomed", endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ServiceUnavailable) as info:
        s3.ping()
    assert info.value.component == "storage"
    with pytest.raises(ServiceUnavailable):
        s3.put_bytes("a/b", b"x")


def test_s3_missing_bucket_is_service_unavailable(aws_env: None, moto_endpoint: str) -> None:
    s3 = S3Storage(f"absent-{uuid.uuid4().hex[:12]}", endpoint_url=moto_endpoint)
    with pytest.raises(ServiceUnavailable):
        s3.ping()
    with pytest.raises(ServiceUnavailable):
        s3.put_bytes("a/b", b"x")
    with pytest.raises(ServiceUnavailable):
        s3.get_bytes("a/b")  # not ObjectNotFound: the bucket, not the key, is missing


def test_local_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    root.write_bytes(b"not a folder")
    store = LocalStorage(root)
    with pytest.raises(ServiceUnavailable) as info:
        store.ping()
    assert info.value.component == "storage"
    assert store.describe() == f"local:{root.resolve()}"


def test_local_ping_creates_root(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "new" / "storage")
    store.ping()
    assert (tmp_path / "new" / "storage").is_dir()
    assert store.list_keys("x") == []  # the ping probe leaves nothing behind
    assert list((tmp_path / "new" / "storage").iterdir()) == []


def test_make_and_get_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.config import Settings, get_settings

    monkeypatch.setenv("PROTOMED_STORAGE_DIR", str(tmp_path / "st"))
    monkeypatch.setenv("PROTOMED_STORAGE_BACKEND", "local")
    get_settings.cache_clear()
    get_storage.cache_clear()
    try:
        s = get_storage()
        assert isinstance(s, LocalStorage)
        assert s.root == (tmp_path / "st").resolve()
        assert get_storage() is s
    finally:
        get_settings.cache_clear()
        get_storage.cache_clear()
    s3 = make_storage(
        Settings(
            storage_backend="s3",
            s3_bucket="bkt",
            s3_endpoint_url="http://minio:9000",
            s3_prefix="p",
        )
    )
    assert isinstance(s3, S3Storage)
    assert s3.describe() == "s3://bkt/p (http://minio:9000)"


def test_import_is_light() -> None:
    """The API and workers import storage; it must not drag in torch, fastapi or boto3."""
    import subprocess

    code = (
        "import sys, service.storage; "
        "print(sorted(m for m in ('torch', 'fastapi', 'boto3') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"
