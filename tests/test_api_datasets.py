"""Dataset registration and upload through the API, plus the archive checks behind uploads.

Real SQLite database, real local storage and real image folders: the toy domain written here and
``cells64`` from the shared data. Every refused request must leave the database, storage and
work folder exactly as they were.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, make_service
from factories import state, upload, zip_folder

from ml.data.catalog import scan
from ml.data.toy import TOY_CLASSES, write_toy_dataset
from service import archive
from service.archive import ArchiveError, ArchiveTooLarge, copy_limited, ensure_local, safe_extract
from service.storage import LocalStorage, ObjectNotFound, get_storage

UPLOADS = "datasets/uploads"


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def toy(service: Service) -> Path:
    return write_toy_dataset(service.data_root / "toy", n_per_class=4, size=32, seed=0)


def on_disk(root: Path) -> dict[str, int]:
    """Images per class folder, counted directly."""
    return {
        d.name: sum(f.suffix == ".png" for f in d.iterdir())
        for d in sorted(root.iterdir())
        if d.is_dir()
    }


def zip_bytes(entries: dict[str, bytes], base: Path | None = None) -> bytes:
    """A zip of ``entries`` (name -> content), after the files of ``base`` under ``toy/``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        if base is not None:
            for f in sorted(base.rglob("*")):
                zf.write(f, f"toy/{f.relative_to(base).as_posix()}")
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_zip(base: Path | None = None) -> bytes:
    buf = io.BytesIO(zip_bytes({}, base))
    with zipfile.ZipFile(buf, "a") as zf:
        info = zipfile.ZipInfo("toy/lymphocyte/link.png")
        info.create_system = 3  # unix: the mode is in the high 16 bits
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def dupe_zip() -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        zf.writestr("toy/a/x.png", b"one")
        zf.writestr("toy/a/x.png", b"two")
    return buf.getvalue()


def corrupt_zip() -> bytes:
    """A stored entry whose bytes no longer match its CRC."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("toy/a/x.png", b"A" * 1000)
        zf.writestr("toy/b/y.png", b"C" * 1000)
    return buf.getvalue().replace(b"A" * 10, b"B" * 10, 1)


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal apart from created_at (SQLite hands it back without its UTC offset) and the files
    a registration skipped (reported once, in its answer)."""
    drop = {"created_at": None, "skipped": None}
    return {**a, **drop} == {**b, **drop}


def reviewer_headers(service: Service) -> dict[str, str]:
    r = service.client.post("/keys", json={"name": "r", "role": "reviewer"}, headers=service.admin)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


# --- registering folders -----------------------------------------------------------------------


def test_register_toy_list_and_get(service: Service, toy: Path) -> None:
    r = service.client.post(
        "/datasets", json={"name": "toy", "path": "toy", "domain": "toy"}, headers=service.admin
    )
    assert r.status_code == 201, r.text
    out = r.json()
    cat = scan(toy)
    assert out["classes"] == cat.classes == sorted(TOY_CLASSES)
    assert out["counts"] == cat.counts() == on_disk(toy) == dict.fromkeys(TOY_CLASSES, 4)
    assert out["layout"] == "folder" and out["source"] == "folder" and out["domain"] == "toy"
    assert out["root"] == str(toy.resolve())

    # the same folder by absolute path, under another name
    r2 = service.client.post(
        "/datasets", json={"name": "toy-abs", "path": str(toy)}, headers=service.admin
    )
    assert r2.status_code == 201, r2.text
    assert r2.json()["counts"] == out["counts"]

    listed = service.client.get("/datasets", headers=service.admin).json()
    assert [d["name"] for d in listed] == ["toy", "toy-abs"]
    assert same(listed[0], out)
    got = service.client.get(f"/datasets/{out['id']}", headers=service.admin)
    assert got.status_code == 200 and same(got.json(), out)
    missing = service.client.get("/datasets/999", headers=service.admin)
    assert missing.status_code == 404 and "no dataset with id 999" in missing.json()["detail"]


@pytest.mark.realdata
def test_register_cells64(service: Service, real_data: Path) -> None:
    """A relative path is tried against each data root in order; cells64 is in the second."""
    r = service.client.post(
        "/datasets",
        json={"name": "cells", "path": "cells64", "domain": "blood"},
        headers=service.admin,
    )
    assert r.status_code == 201, r.text
    out = r.json()
    cat = scan(real_data / "cells64")
    assert out["classes"] == cat.classes and out["counts"] == cat.counts()
    assert out["counts"] == on_disk(real_data / "cells64")
    assert len(out["classes"]) == 8 and all(n > 0 for n in out["counts"].values())
    assert out["root"] == str((real_data / "cells64").resolve())


@pytest.mark.parametrize(
    ("body", "code", "needles"),
    [
        ({"name": "x", "path": "nope"}, 422, ["no folder 'nope'", "{root}"]),
        ({"name": "x", "path": "toy/../../etc"}, 422, ["'..' segment"]),
        ({"name": "x", "path": "/etc"}, 422, ["/etc is outside the allowed data roots", "{root}"]),
        ({"name": "x", "path": "empty"}, 422, ["no labelled images", ".png"]),
        ({"name": "x", "path": "toy/manifest.csv"}, 422, ["is not a folder"]),
        ({"name": "x", "path": "escape"}, 422, ["outside the allowed data roots"]),
        ({"name": "x", "path": "toy\x00"}, 422, ["NUL"]),
        ({"name": "x", "path": "toy", "layout": "ham10000"}, 422, ["HAM10000_metadata.csv"]),
        ({"name": "x", "path": "toy", "layout": "matek"}, 422, ["no labelled images"]),
        ({"name": "x", "path": "toy", "layout": "weird"}, 422, ["'auto', 'folder'", "'matek'"]),
        ({"name": "x", "path": "toy", "colour": "red"}, 422, ["colour", "Extra inputs"]),
        ({"name": "../x", "path": "toy"}, 422, ["name", "pattern"]),
        ({"path": "toy"}, 422, ["name", "Field required"]),
        ({"name": "toy", "path": "toy"}, 409, ["'toy' already exists"]),
    ],
)
def test_register_refused(
    service: Service, toy: Path, body: dict[str, str], code: int, needles: list[str]
) -> None:
    (service.data_root / "empty").mkdir()
    outside = service.tmp / "outside"
    write_toy_dataset(outside, n_per_class=1, size=16, seed=1)
    (service.data_root / "escape").symlink_to(outside, target_is_directory=True)
    first = service.client.post(
        "/datasets", json={"name": "toy", "path": "toy"}, headers=service.admin
    )
    assert first.status_code == 201
    before = state(service)

    r = service.client.post("/datasets", json=body, headers=service.admin)
    assert r.status_code == code, r.text
    detail = str(r.json()["detail"])
    for needle in needles:
        assert needle.format(root=service.data_root.resolve()) in detail, detail
    assert state(service) == before


def test_register_malformed_json(service: Service, toy: Path) -> None:
    before = state(service)
    r = service.client.post(
        "/datasets",
        content=b'{"name": "toy", "path": ',
        headers={**service.admin, "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "JSON decode error" in str(r.json()["detail"])
    assert state(service) == before


def test_register_needs_admin(service: Service, toy: Path) -> None:
    body = {"name": "toy", "path": "toy"}
    before = state(service)
    none = service.client.post("/datasets", json=body)
    assert none.status_code == 401 and "API key is required" in none.json()["detail"]
    wrong = service.client.post("/datasets", json=body, headers={"Authorization": "Bearer pm_no"})
    assert wrong.status_code == 401 and "unknown or revoked" in wrong.json()["detail"]
    reviewer = service.client.post("/datasets", json=body, headers=reviewer_headers(service))
    assert reviewer.status_code == 403 and "needs an admin key" in reviewer.json()["detail"]
    assert state(service) == before


def test_register_disabled_without_data_roots(tmp_path: Path, monkeypatch) -> None:
    with make_service(tmp_path, monkeypatch, PROTOMED_DATA_ROOTS="[]") as service:
        write_toy_dataset(service.data_root / "toy", n_per_class=2, size=16)
        for path in ("toy", str(service.data_root / "toy")):
            r = service.client.post(
                "/datasets", json={"name": "toy", "path": path}, headers=service.admin
            )
            assert r.status_code == 422
            assert "disabled" in r.json()["detail"] and "PROTOMED_DATA_ROOTS" in r.json()["detail"]
        assert state(service)[0] == 0


# --- uploads -----------------------------------------------------------------------------------


def test_upload_toy_zip(service: Service, toy: Path) -> None:
    data = zip_folder(toy, service.tmp / "toy.zip").read_bytes()
    r = upload(service, "toy-up", data, domain="toy")
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["source"] == "upload" and out["layout"] == "folder" and out["domain"] == "toy"
    assert out["classes"] == sorted(TOY_CLASSES)
    assert out["counts"] == scan(toy).counts() == on_disk(Path(out["root"]))

    keys = get_storage().list_keys(UPLOADS)
    assert len(keys) == 1 and get_storage().exists(keys[0])
    assert get_storage().get_bytes(keys[0]) == data
    uid = Path(keys[0]).stem
    # the single top-level folder of the zip is the root, in work/datasets/<uid>/
    assert out["root"] == str(service.tmp / "work" / "datasets" / uid / "toy")
    assert state(service)[1][0] == uid  # no temporary zip left beside it
    assert not [f for f in state(service)[1] if f.startswith(".")]
    assert same(service.client.get(f"/datasets/{out['id']}", headers=service.admin).json(), out)


def test_upload_flat_zip_root_is_the_folder(service: Service, toy: Path) -> None:
    data = zip_folder(toy, service.tmp / "flat.zip", top=None).read_bytes()
    r = upload(service, "flat", data, layout="folder")
    assert r.status_code == 201, r.text
    root = Path(r.json()["root"])
    assert root.parent == service.tmp / "work" / "datasets"
    assert r.json()["counts"] == dict.fromkeys(TOY_CLASSES, 4)


def _bad_uploads(toy: Path) -> list[tuple[str, bytes, int, list[str]]]:
    png = (toy / "basophil" / "basophil_0000.png").read_bytes()
    return [
        ("not-a-zip", b"PNG? no, just bytes" * 10, 422, ["not a zip archive"]),
        ("dotdot", zip_bytes({"../evil.png": png}, toy), 422, ["'../evil.png'", "'..'"]),
        ("nested-dotdot", zip_bytes({"toy/a/../../../e.png": png}, toy), 422, ["'..'"]),
        ("absolute", zip_bytes({"/tmp/evil.png": png}, toy), 422, ["absolute path"]),
        ("drive", zip_bytes({"C:/evil.png": png}, toy), 422, ["drive letter"]),
        ("backslash", zip_bytes({"toy\\evil.png": png}, toy), 422, ["backslash"]),
        ("symlink", symlink_zip(toy), 422, ["symbolic link"]),
        ("no-images", zip_bytes({"toy/readme.txt": b"hello"}), 422, ["no labelled images"]),
        ("empty", zip_bytes({}), 422, ["no files"]),
        ("macos-only", zip_bytes({"__MACOSX/._a.png": b"x", ".DS_Store": b"x"}), 422, ["no files"]),
        ("dupe", dupe_zip(), 422, ["duplicate"]),
        ("corrupt", corrupt_zip(), 422, ["corrupt zip archive", "CRC"]),
        ("truncated", zip_bytes({}, toy)[:-40], 422, ["not a zip archive"]),
    ]


def test_upload_refused(service: Service, toy: Path) -> None:
    """Each refused zip: its code, a message naming the problem, and nothing left anywhere."""
    before = state(service)
    for name, data, code, needles in _bad_uploads(toy):
        r = upload(service, name, data)
        assert r.status_code == code, (name, r.text)
        for needle in needles:
            assert needle in r.json()["detail"], (name, r.json())
        assert state(service) == before, name


def test_upload_form_errors_and_auth(service: Service, toy: Path) -> None:
    data = zip_folder(toy, service.tmp / "toy.zip").read_bytes()
    assert upload(service, "toy", data).status_code == 201
    before = state(service)

    dup = upload(service, "toy", data)
    assert dup.status_code == 409 and "'toy' already exists" in dup.json()["detail"]
    bad_layout = upload(service, "other", data, layout="weird")
    assert bad_layout.status_code == 422 and "'ham10000'" in str(bad_layout.json()["detail"])
    bad_name = upload(service, "../other", data)
    assert bad_name.status_code == 422 and "pattern" in str(bad_name.json()["detail"])
    no_file = service.client.post("/datasets/upload", data={"name": "x"}, headers=service.admin)
    assert no_file.status_code == 422 and "file" in str(no_file.json()["detail"])
    assert upload(service, "x", data, headers={}).status_code == 401
    assert upload(service, "x", data, headers={"Authorization": "Bearer pm_no"}).status_code == 401
    reviewer = upload(service, "x", data, headers=reviewer_headers(service))
    assert reviewer.status_code == 403
    assert state(service) == before


def test_upload_storage_down_or_insert_race_leaves_nothing(
    service: Service, toy: Path, monkeypatch
) -> None:
    from fastapi import HTTPException

    from api.errors import ServiceUnavailable
    from api.routes import datasets

    data = zip_folder(toy, service.tmp / "toy.zip").read_bytes()
    before = state(service)

    def down(*_a: Any, **_k: Any) -> None:
        raise ServiceUnavailable("storage", "connection refused")

    with monkeypatch.context() as m:
        m.setattr(get_storage(), "put_file", down)
        r = upload(service, "toy", data)
    assert r.status_code == 503 and "storage unavailable" in r.json()["detail"]
    assert state(service) == before

    def race(*_a: Any, **_k: Any) -> None:  # another request took the name after our check
        raise HTTPException(409, "a dataset named 'toy' already exists")

    monkeypatch.setattr(datasets, "_insert", race)
    r = upload(service, "toy", data)
    assert r.status_code == 409
    assert state(service) == before  # the stored zip was deleted again


def test_upload_limits(tmp_path: Path, monkeypatch) -> None:
    limits = {
        "PROTOMED_MAX_UPLOAD_BYTES": "100000",
        "PROTOMED_MAX_UNPACKED_BYTES": "200000",
        "PROTOMED_MAX_UPLOAD_FILES": "30",
    }
    with make_service(tmp_path, monkeypatch, **limits) as service:
        toy = write_toy_dataset(service.data_root / "toy", n_per_class=4, size=32, seed=0)
        ok = zip_folder(toy, tmp_path / "toy.zip").read_bytes()
        assert len(ok) < 100000
        before = state(service)

        # over the upload limit, caught while copying (within the form overhead allowance)
        big = zip_bytes({"toy/noise.png": os.urandom(120000)}, toy)
        r = upload(service, "big", big)
        assert r.status_code == 413 and "at most 100000 bytes" in r.json()["detail"]
        # far over: refused by Content-Length before the body is parsed
        huge = os.urandom(3 * 1024 * 1024)
        r = upload(service, "huge", huge)
        assert r.status_code == 413 and "at most 100000 bytes" in r.json()["detail"]
        # ...and when streamed in chunks without a Content-Length
        req = service.client.build_request(
            "POST", "/datasets/upload", data={"name": "chunked"}, files={"file": ("h.zip", huge)}
        )
        body = req.read()
        r = service.client.post(
            "/datasets/upload",
            content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
            headers={**service.admin, "Content-Type": req.headers["Content-Type"]},
        )
        assert r.status_code == 413 and "at most 100000 bytes" in r.json()["detail"]

        # zip bomb: a few kB that would unpack to 5 MB
        bomb = zip_bytes({"toy/basophil/bomb.png": bytes(5_000_000)}, toy)
        assert len(bomb) < 100000
        r = upload(service, "bomb", bomb)
        assert r.status_code == 413
        assert "5" in r.json()["detail"] and "at most 200000 bytes" in r.json()["detail"]
        # too many files
        many = zip_bytes({f"toy/basophil/x{i}.png": b"x" for i in range(31)})
        r = upload(service, "many", many)
        assert r.status_code == 413 and "at most 30 are allowed" in r.json()["detail"]
        assert state(service) == before

        assert upload(service, "toy", ok).status_code == 201


# --- safe_extract and ensure_local -------------------------------------------------------------


@pytest.fixture
def small_toy(tmp_path: Path) -> Path:
    return write_toy_dataset(tmp_path / "src" / "toy", n_per_class=2, size=16, seed=0)


def _write(tmp: Path, data: bytes) -> Path:
    path = tmp / "in.zip"
    path.write_bytes(data)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_safe_extract_single_top_folder_and_ignored(tmp_path: Path, small_toy: Path) -> None:
    src = _write(
        tmp_path, zip_bytes({"__MACOSX/toy/._x.png": b"x", "toy/.DS_Store": b"x"}, small_toy)
    )
    root = safe_extract(src, tmp_path / "out" / "d", max_bytes=10**7, max_files=100)
    assert root == tmp_path / "out" / "d" / "toy"
    assert scan(root).counts() == scan(small_toy).counts()
    assert not (tmp_path / "out" / "d" / "__MACOSX").exists() and not (root / ".DS_Store").exists()
    assert _leftovers(tmp_path / "out") == ["d"]

    flat = zip_folder(small_toy, tmp_path / "flat.zip", top=None)
    root = safe_extract(flat, tmp_path / "out" / "e", max_bytes=10**7, max_files=100)
    assert root == tmp_path / "out" / "e"
    assert scan(root).counts() == scan(small_toy).counts()
    with pytest.raises(FileExistsError):
        safe_extract(flat, tmp_path / "out" / "e", max_bytes=10**7, max_files=100)


@pytest.mark.parametrize(
    ("entries", "exc", "needle"),
    [
        ({"toy/a/x.png": b"x", "../evil.png": b"x"}, ArchiveError, r"'\.\.' segment"),
        ({"toy/../../evil.png": b"x"}, ArchiveError, r"'\.\.' segment"),
        ({"/abs.png": b"x"}, ArchiveError, "absolute path"),
        ({"C:/win.png": b"x"}, ArchiveError, "drive letter"),
        ({"toy\\win.png": b"x"}, ArchiveError, "backslash"),
        ({f"toy/a/{i}.png": b"x" for i in range(11)}, ArchiveTooLarge, "11 files; at most 10"),
        ({"toy/a/big.png": bytes(2000)}, ArchiveTooLarge, "at most 1000 bytes are allowed"),
        ({"toy/a": b"x", "toy/a/b.png": b"y"}, ArchiveError, "conflicting"),
        ({}, ArchiveError, "no files"),
    ],
)
def test_safe_extract_refuses(
    tmp_path: Path, entries: dict[str, bytes], exc: type[Exception], needle: str
) -> None:
    src = _write(tmp_path, zip_bytes(entries))
    with pytest.raises(exc, match=needle):
        safe_extract(src, tmp_path / "out" / "d", max_bytes=1000, max_files=10)
    assert _leftovers(tmp_path / "out") == []


def test_safe_extract_symlink_and_not_zip(tmp_path: Path, small_toy: Path) -> None:
    with pytest.raises(ArchiveError, match="symbolic link"):
        safe_extract(
            _write(tmp_path, symlink_zip(small_toy)),
            tmp_path / "o" / "d",
            max_bytes=10**7,
            max_files=100,
        )
    with pytest.raises(ArchiveError, match="not a zip"):
        safe_extract(
            _write(tmp_path, b"plain text"), tmp_path / "o" / "d", max_bytes=10**7, max_files=100
        )
    assert _leftovers(tmp_path / "o") == []


def test_safe_extract_does_not_trust_declared_sizes(tmp_path: Path, monkeypatch) -> None:
    """Bytes actually written are counted too: a zip whose declared sizes pass still stops."""
    src = _write(tmp_path, zip_bytes({f"toy/a/{i}.png": bytes(600) for i in range(3)}))
    real = archive._members
    monkeypatch.setattr(archive, "_members", lambda zf, _max, n: real(zf, 10**9, n))  # "lies"
    with pytest.raises(ArchiveTooLarge, match="more than the 1000 bytes allowed"):
        safe_extract(src, tmp_path / "o" / "d", max_bytes=1000, max_files=10)
    assert _leftovers(tmp_path / "o") == []

    # A central directory that under-declares a size: read as declared, fails its CRC.
    buf = bytearray(zip_bytes({"toy/a/x.png": os.urandom(500)}))
    cd = buf.rindex(b"PK\x01\x02")
    buf[cd + 24 : cd + 28] = (10).to_bytes(4, "little")  # uncompressed size field
    with pytest.raises(ArchiveError, match="corrupt"):
        safe_extract(
            _write(tmp_path, bytes(buf)), tmp_path / "o" / "d", max_bytes=100, max_files=10
        )
    assert _leftovers(tmp_path / "o") == []


def test_copy_limited() -> None:
    out = io.BytesIO()
    assert copy_limited(io.BytesIO(b"x" * 10), out, 10, "limit") == 10
    with pytest.raises(ArchiveTooLarge, match="too much"):
        copy_limited(io.BytesIO(b"x" * 10), io.BytesIO(), 9, "too much")


class _NoStorage:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"storage.{name} used although the folder exists")


def test_ensure_local(tmp_path: Path, small_toy: Path) -> None:
    work = tmp_path / "work"
    limits = {"max_bytes": 10**7, "max_files": 100}
    assert ensure_local(str(small_toy), None, _NoStorage(), work, **limits) == small_toy  # type: ignore[arg-type]

    storage = LocalStorage(tmp_path / "store")
    key = f"{UPLOADS}/abc123.zip"
    storage.put_file(key, zip_folder(small_toy, tmp_path / "t.zip"), "application/zip")
    gone = str(tmp_path / "elsewhere" / "abc123" / "toy")  # the root on the API's machine
    root = ensure_local(gone, key, storage, work, **limits)
    assert root == work / "datasets" / "abc123" / "toy"
    assert scan(root).counts() == scan(small_toy).counts()
    assert _leftovers(work / "datasets") == ["abc123"]  # the downloaded zip is removed
    # unpacked once: a second call does not need storage
    assert ensure_local(gone, key, _NoStorage(), work, **limits) == root  # type: ignore[arg-type]

    with pytest.raises(FileNotFoundError, match="no uploaded archive"):
        ensure_local(gone, None, storage, work, **limits)
    with pytest.raises(ObjectNotFound):
        ensure_local(gone, f"{UPLOADS}/missing.zip", storage, work, **limits)
    storage.put_bytes(f"{UPLOADS}/evil.zip", zip_bytes({"../evil.png": b"x"}))
    with pytest.raises(ArchiveError, match=r"'\.\.' segment"):
        ensure_local(gone, f"{UPLOADS}/evil.zip", storage, work, **limits)
    with pytest.raises(ArchiveTooLarge):
        ensure_local(gone, key, storage, tmp_path / "w2", max_bytes=100, max_files=100)
    assert _leftovers(work / "datasets") == ["abc123"]
    assert _leftovers(tmp_path / "w2" / "datasets") == []


def test_ensure_local_after_api_upload(service: Service, toy: Path) -> None:
    """A worker on another machine: the unpacked folder is missing, the archive is in storage."""
    data = zip_folder(toy, service.tmp / "toy.zip").read_bytes()
    out = upload(service, "toy", data).json()
    root = Path(out["root"])
    shutil.rmtree(root.parent)
    again = ensure_local(
        out["root"],
        get_storage().list_keys(UPLOADS)[0],
        get_storage(),
        service.tmp / "work",
        max_bytes=10**8,
        max_files=1000,
    )
    assert again == root and on_disk(again) == out["counts"]
