"""Input that must answer 4xx at once, not 500 or a job that fails later.

Non-finite JSON numbers on every JSON route, training asking for more images than a dataset
holds, two Unicode spellings of one class name, an image whose header declares billions of
pixels, and one set of data roots for registration and training. Real SQLite database, local
storage and image folders; the routes are walked from the app's own OpenAPI document, so a new
JSON route is covered without editing this file.
"""

from __future__ import annotations

import json
import struct
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, make_service
from factories import state, upload, zip_folder

from api.main import create_app
from ml.data.catalog import scan
from ml.data.images import DataError, load_image, load_split
from ml.data.toy import TOY_CLASSES, write_toy_dataset

SECRET = "webhook-secret"
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400"]
NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    with make_service(tmp_path, monkeypatch, PROTOMED_REVIEW_WEBHOOK_SECRET=SECRET) as s:
        yield s


# --- non-finite numbers --------------------------------------------------------------------------

SPEC = create_app().openapi()


def _properties(schema: dict[str, Any]) -> list[str]:
    """Top-level body fields of a request schema (refs, unions and nullable wrappers opened)."""
    if "$ref" in schema:
        return _properties(SPEC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    found = list(schema.get("properties", {}))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            found += [p for p in _properties(sub) if p not in found]
    return found


def _json_routes() -> list[tuple[str, str, list[str]]]:
    routes = []
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                fields = _properties(content["application/json"]["schema"]) or ["probe"]
                routes.append((method, path, fields))
    return routes


JSON_ROUTES = _json_routes()


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"the answer holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_walk_sees_the_json_routes() -> None:
    seen = {(m, p) for m, p, _ in JSON_ROUTES}
    for route in [
        ("post", "/jobs/train"),
        ("post", "/keys"),
        ("post", "/reviews/webhook"),
        ("put", "/models/{model_id}/guidance"),
    ]:
        assert route in seen, f"{route} missing from {sorted(seen)}"


@pytest.mark.parametrize(
    ("method", "path", "fields"), JSON_ROUTES, ids=[f"{m} {p}" for m, p, _ in JSON_ROUTES]
)
def test_non_finite_numbers_are_refused_naming_the_field(
    svc: Service, method: str, path: str, fields: list[str]
) -> None:
    """Every field of every JSON body, with each non-finite spelling Python's json accepts, at
    the top and nested: a 422 in valid JSON that names the field, never a 500."""
    url = path.replace("{domain}", "toy")
    url = "/".join("1" if s.startswith("{") else s for s in url.split("/"))
    headers = {**svc.admin, "X-Protomed-Secret": SECRET, "Content-Type": "application/json"}
    for field in fields:
        for number in NON_FINITE:
            for body, where in [
                (f'{{"{field}": {number}}}', field),
                (f'{{"{field}": {{"deep": [1, {number}]}}}}', "deep"),
            ]:
                r = svc.client.request(method.upper(), url, content=body, headers=headers)
                assert r.status_code == 422, f"{method} {url} {body}: {r.status_code} {r.text}"
                answer = _strict_json(r.text)
                assert where in json.dumps(answer), f"{method} {url} {body}: {r.text}"
                assert "finite" in r.text, r.text  # says what is allowed


def _number_query_params() -> list[tuple[str, str, str]]:
    found = []
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                schema = param.get("schema", {})
                types = [schema.get("type"), *(s.get("type") for s in schema.get("anyOf", []))]
                if param["in"] == "query" and "number" in types:
                    found.append((method, path, param["name"]))
    return found


@pytest.mark.parametrize(("method", "path", "name"), _number_query_params())
def test_non_finite_query_numbers_are_refused_naming_the_parameter(
    svc: Service, method: str, path: str, name: str
) -> None:
    url = "/".join("1" if s.startswith("{") else s for s in path.split("/"))
    for number in ["nan", "NaN", "inf", "-Infinity", "1e400"]:
        r = svc.client.request(method.upper(), url, params={name: number}, headers=svc.admin)
        assert r.status_code == 422, f"{method} {url}?{name}={number}: {r.status_code} {r.text}"
        assert name in json.dumps(_strict_json(r.text)), r.text


def test_validation_errors_echoing_nan_are_still_json() -> None:
    """The 422 handler itself: an error whose echoed input is NaN is written as JSON (FastAPI's
    default handler raised 'Out of range float values are not JSON compliant', a 500)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.testclient import TestClient

    app = create_app()

    @app.get("/probe-nan")
    def probe() -> None:
        raise RequestValidationError(
            [{"type": "x", "loc": ("body", "weight"), "msg": "bad", "input": float("nan")}]
        )

    r = TestClient(app, raise_server_exceptions=False).get("/probe-nan")
    assert r.status_code == 422, r.text
    assert _strict_json(r.text)["detail"][0]["loc"] == ["body", "weight"]


def test_a_nan_in_a_validated_float_field_names_the_field(svc: Service) -> None:
    """The shared request base refuses non-finite floats itself (a body built in Python, or a
    route that reads JSON another way, never reaches the database with them)."""
    from api.schemas import GuidanceDefaults

    with pytest.raises(ValueError, match="finite"):
        GuidanceDefaults.model_validate({"defaults": {"a": float("nan")}})


# --- training asks for more images than the dataset holds --------------------------------------


def _register(svc: Service, folder: str, **extra: Any) -> dict[str, Any]:
    r = svc.client.post(
        "/datasets",
        json={"name": folder.replace("/", "-"), "path": folder, **extra},
        headers=svc.admin,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _nothing_created(svc: Service) -> None:
    for listing in ("/models", "/jobs"):
        r = svc.client.get(listing, headers=svc.admin)
        assert r.status_code == 200 and r.json() == [], (listing, r.text)


CLASS_6 = f"class {TOY_CLASSES[0]!r} has 6 images"


@pytest.mark.parametrize(
    ("request_", "needles"),
    [
        ({}, [CLASS_6, "120", "n_per_class=100", "n_heldout=20"]),  # the defaults
        ({"n_per_class": 4, "n_heldout": 3}, [CLASS_6, "7 were asked", "n_per_class=4"]),
        ({"n_per_class": None, "n_heldout": 6}, [CLASS_6, "n_heldout=6"]),
        ({"n_per_class": None, "n_heldout": 4, "k": 3}, [CLASS_6, "k=3"]),
        ({"n_per_class": 2, "n_heldout": 0, "k": 3}, ["k=3", "n_per_class=2"]),
    ],
)
def test_training_more_images_than_the_dataset_holds_is_refused(
    svc: Service, request_: dict[str, Any], needles: list[str]
) -> None:
    write_toy_dataset(svc.data_root / "toy6", n_per_class=6, size=16, seed=0)
    ds = _register(svc, "toy6")
    r = svc.client.post("/jobs/train", json={"dataset_id": ds["id"], **request_}, headers=svc.admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for needle in needles:
        assert needle in detail, (needle, detail)
    _nothing_created(svc)


def test_training_that_fits_exactly_is_accepted(svc: Service) -> None:
    write_toy_dataset(svc.data_root / "toy6", n_per_class=6, size=16, seed=0)
    ds = _register(svc, "toy6")
    body = {"dataset_id": ds["id"], "n_per_class": 3, "n_heldout": 3, "k": 3, "mode": "baseline"}
    r = svc.client.post("/jobs/train", json=body, headers=svc.admin)
    assert r.status_code == 202, r.text
    # ...and the worker's own reader agrees it fits (the condition the check mirrors).
    split = load_split(ds["root"], n_per_class=3, n_heldout=3, image_size=16)
    assert split.train.per_class_counts() == dict.fromkeys(TOY_CLASSES, 3)


# --- one class, two Unicode spellings ----------------------------------------------------------


def _two_class_folder(root: Path, names: list[str]) -> Path:
    toy = write_toy_dataset(root, n_per_class=3, size=16, seed=0)
    for name, source in zip(names, TOY_CLASSES, strict=False):
        (toy / source).rename(toy / name)
    return toy


def test_nfc_and_nfd_spellings_of_one_class_are_refused(svc: Service) -> None:
    _two_class_folder(svc.data_root / "cafes", [NFC, NFD])
    before = state(svc)
    r = svc.client.post("/datasets", json={"name": "c", "path": "cafes"}, headers=svc.admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert ascii(NFC) in detail and ascii(NFD) in detail, detail
    assert "NFC" in detail, detail
    assert state(svc) == before


def test_an_nfd_class_folder_registers_as_nfc_and_is_read(svc: Service) -> None:
    toy = _two_class_folder(svc.data_root / "cafe", [NFD])
    ds = _register(svc, "cafe")
    assert NFC in ds["classes"] and NFD not in ds["classes"], ds["classes"]
    assert ds["counts"][NFC] == 3
    # The worker reads the NFD folder under the NFC name (and an NFD request means the same).
    for asked in (NFC, NFD):
        split = load_split(
            toy, n_per_class=2, n_heldout=1, image_size=16, classes=[asked, TOY_CLASSES[1]]
        )
        assert split.classes == sorted([NFC, TOY_CLASSES[1]])
        assert split.train.per_class_counts()[NFC] == 2


def test_an_uploaded_zip_with_nfd_names_registers_nfc(svc: Service, tmp_path: Path) -> None:
    toy = _two_class_folder(tmp_path / "zipped", [NFD])
    r = upload(svc, "z", zip_folder(toy, tmp_path / "z.zip").read_bytes())
    assert r.status_code == 201, r.text
    assert NFC in r.json()["classes"] and NFD not in r.json()["classes"]


def test_class_names_in_requests_are_normalised() -> None:
    from api.schemas import GuidanceDefaults
    from service.training import TrainRequest

    assert TrainRequest(dataset_id=1, classes=[NFD, "b"]).classes == [NFC, "b"]
    assert list(GuidanceDefaults(defaults={NFD: 1.0}).defaults) == [NFC]


def test_generate_matches_an_nfd_class_name(svc: Service) -> None:
    from factories import add_dataset, add_model

    from service.db.session import get_sessionmaker

    with get_sessionmaker()() as session:
        model = add_model(session, add_dataset(session, classes=[NFC, "b"]))
        session.commit()
        model_id = model.id
    r = svc.client.post(
        "/generate", params={"class": NFD, "n": 1, "model_id": model_id}, headers=svc.admin
    )
    assert r.status_code == 202, r.text
    assert r.json()["batch"]["class_name"] == NFC


# --- images whose header declares a huge size --------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pixel_bomb(path: Path, side: int = 13000) -> Path:
    """A valid greyscale PNG of side x side pixels, all zero, written row block by row block
    so neither the image nor its raw rows are ever held in memory (a few hundred KB on disk)."""
    deflate = zlib.compressobj(9)
    rows = bytes(side + 1) * 500  # filter byte 0 + a row of zeros, 500 rows at a time
    data = b""
    for start in range(0, side, 500):
        data += deflate.compress(rows if start + 500 <= side else bytes(side + 1) * (side - start))
    data += deflate.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    path.write_bytes(png)
    return path


def test_the_bomb_is_a_real_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # ml.data.images sets PIL's guard
    bomb = pixel_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    with Image.open(bomb) as im:  # the header only
        assert im.size == (13000, 13000) and im.format == "PNG"


def test_registration_skips_an_image_over_the_pixel_limit(svc: Service) -> None:
    toy = write_toy_dataset(svc.data_root / "toy", n_per_class=3, size=16, seed=0)
    bomb = pixel_bomb(toy / TOY_CLASSES[0] / "bomb.png")
    ds = _register(svc, "toy")
    assert ds["counts"][TOY_CLASSES[0]] == 3, ds["counts"]
    reasons = {s["path"]: s["reason"] for s in ds["skipped"]}
    reason = reasons[str(bomb.relative_to(toy))]
    # 13000x13000 = 169000000 pixels (named by us, or by PIL's own guard that ml.data.images sets
    # from the same limit once it is imported in this process)
    assert "169000000" in reason and "PROTOMED_MAX_IMAGE_PIXELS" in reason, reason
    assert str(4096 * 4096) in reason, reason


def test_the_service_and_the_core_share_one_default_pixel_limit() -> None:
    """The settings must load without ml (the API starts without it), so the default is written
    in both places; this keeps the two equal."""
    from ml.data.catalog import DEFAULT_MAX_IMAGE_PIXELS
    from service.config import Settings

    assert Settings.model_fields["max_image_pixels"].default == DEFAULT_MAX_IMAGE_PIXELS


def test_the_pixel_limit_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import get_settings

    with make_service(tmp_path, monkeypatch, PROTOMED_MAX_IMAGE_PIXELS=str(10 * 10)) as s:
        assert get_settings().max_image_pixels == 100
        write_toy_dataset(s.data_root / "toy", n_per_class=3, size=16, seed=0)
        r = s.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=s.admin)
        assert r.status_code == 422, r.text  # every 16x16 image is over 100 pixels
        assert "no labelled images" in r.json()["detail"]


def test_the_training_reader_refuses_to_decode_a_bomb(tmp_path: Path) -> None:
    """The file may change after registration: the loader checks the header again and never
    decodes the pixels (the split skips it, recorded, and takes the next image)."""
    toy = write_toy_dataset(tmp_path / "toy", n_per_class=4, size=16, seed=0)
    with pytest.raises(DataError, match="169000000"):
        load_image(pixel_bomb(tmp_path / "bomb.png"), 16)
    cat = scan(toy)
    victim = cat.items[TOY_CLASSES[0]][0]
    pixel_bomb(victim)  # swapped after the scan
    split = load_split(toy, n_per_class=3, n_heldout=0, image_size=16)
    reasons = dict(split.skipped)
    assert "pixel" in reasons.get(str(victim), ""), split.skipped
    assert split.train.per_class_counts()[TOY_CLASSES[0]] == 3


# --- one set of roots --------------------------------------------------------------------------


def test_registration_and_training_use_one_set_of_roots(svc: Service) -> None:
    """A link into work_dir/datasets: today's worker follows it, so registration must too;
    a link elsewhere is refused by both. Same function, same answer."""
    from service.config import get_settings
    from workers.training import read_roots

    settings = get_settings()
    unpacked = write_toy_dataset(settings.work_dir / "datasets" / "x", n_per_class=2, size=16)
    toy = write_toy_dataset(svc.data_root / "toy", n_per_class=2, size=16, seed=1)
    (toy / "linked").symlink_to(unpacked / TOY_CLASSES[0], target_is_directory=True)
    ds = _register(svc, "toy")
    assert ds["counts"]["linked"] == 2
    load_split(toy, n_per_class=1, roots=read_roots(settings), image_size=16)
    # ...because they are one list, absolute and resolved
    assert read_roots(settings) == settings.dataset_roots()
    assert all(r.is_absolute() and r == r.resolve() for r in settings.dataset_roots())


def test_an_upload_stores_an_absolute_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a relative work dir, the stored root must not depend on the process's folder."""
    monkeypatch.chdir(tmp_path)
    toy = write_toy_dataset(tmp_path / "src", n_per_class=2, size=16, seed=0)
    with make_service(tmp_path, monkeypatch, PROTOMED_WORK_DIR="work") as s:
        r = upload(s, "u", zip_folder(toy, tmp_path / "u.zip").read_bytes())
        assert r.status_code == 201, r.text
        root = Path(r.json()["root"])
        assert root.is_absolute() and root == root.resolve(), root
        assert root.is_relative_to((tmp_path / "work" / "datasets").resolve())
