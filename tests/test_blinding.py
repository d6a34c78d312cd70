"""Blinding against a curious reviewer, without Label Studio (so it runs everywhere): a reviewer
(reviewer key, or no key at all: what Label Studio's editor has) gets review images and tries
every means the API offers to link each one to the model and mode that made it: its hash, its
bytes, its size, its metadata, its headers, the order of the tasks against image ids, and every
read endpoint. Each attempt must fail, while the pixels stay exactly those generated.

The admin side (a key of role admin) collects everything the API shows about batches, models,
images, jobs and reports, to prove none of it matches what the reviewer holds.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Any

import numpy as np
import pytest
from conftest import Service, reset_service_caches
from factories import review_batches
from PIL import Image as PILImage
from sqlalchemy import select

from service.db.models import Image, ReviewTask
from service.db.session import get_sessionmaker

IMAGES = 16  # per mode: a shuffle that keeps 16 of one mode together has odds 1 in 6e8
# What a reviewer may read: nothing in these names a mode, model, batch or image.
REVIEWER_READS = {"/criteria", "/criteria/{domain}", "/reviews/projects"}
OPEN = {"/health", "/ready", "/review-images/{token}"}
# Headers a review image may carry: none of them describes the stored object.
IMAGE_HEADERS = {
    "content-type",
    "content-length",
    "cache-control",
    "access-control-allow-origin",
    "x-content-type-options",
    "referrer-policy",
    "date",
    "server",
}


def key(service: Service, role: str) -> dict[str, str]:
    r = service.client.post(
        "/keys", json={"name": f"a {role}", "role": role}, headers=service.admin
    )
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def tasks() -> list[dict[str, Any]]:
    """Ground truth, from the database: each task in Label Studio's (import) order with its
    image id, mode and stored bytes' hash."""
    with get_sessionmaker()() as s:
        rows = s.scalars(select(ReviewTask).order_by(ReviewTask.project_id, ReviewTask.position))
        return [
            {
                "token": t.token,
                "project": t.project_id,
                "image": t.image_id,
                "mode": str(t.image.batch.model.mode),
                "sha256": t.image.sha256,
                "key": t.image.storage_key,
            }
            for t in rows
        ]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def get_paths(service: Service, ids: dict[str, int]) -> list[str]:
    """Every GET route of the API (OpenAPI) and the dashboard, with real ids filled in."""
    paths = [p for p, ops in service.client.app.openapi()["paths"].items() if "get" in ops]
    paths += [
        "/ui",
        "/ui/models/{model_id}",
        "/ui/batches/{batch_id}",
        "/ui/reports/plausibility",
        "/ui/reports/evaluation",
        "/ui/batches/{batch_id}/audit",
        "/ui/sweeps/{sweep_id}",
        "/ui/scorers/{scorer_id}",
        "/ui/studies/{study_id}",
    ]
    return [re.sub(r"\{(\w+)\}", lambda m: str(ids.get(m.group(1), "toy")), p) for p in paths]


@pytest.fixture
def study(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    """Both modes' batches sent for review in one request, as the README says to."""
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # never reached
    reset_service_caches()
    with get_sessionmaker()() as s:
        batches = review_batches(s, "toy", IMAGES)
    r = service.client.post("/reviews", json={"batch_ids": batches}, headers=service.admin)
    assert r.status_code == 202 and r.json()["added"] == 2 * IMAGES, r.text
    assert r.json().get("warning") is None  # both modes together: nothing to warn about
    return service


def test_a_reviewer_cannot_link_review_images_to_modes(study: Service) -> None:
    service, admin = study, study.admin
    truth = tasks()
    first = truth[0]
    with get_sessionmaker()() as s:
        img = s.get(Image, first["image"])
        assert img is not None
        ids = {
            "batch_id": img.batch_id,
            "model_id": img.batch.model_id,
            "image_id": img.id,
            "dataset_id": img.batch.model.dataset_id,
            "job_id": 1,
            "sweep_id": 1,
            "scorer_id": 1,
            "study_id": 1,
        }

    # What the admin side shows about batches, models, images, jobs and reports.
    shown = []
    for path in get_paths(service, ids):
        if path.startswith("/review-images"):
            continue
        r = service.client.get(path, headers=admin)
        assert r.status_code in (200, 404), (path, r.status_code, r.text[:200])
        shown.append(r.text if "image" not in r.headers.get("content-type", "") else "")
    stored: dict[int, bytes] = {}
    for t in truth:
        r = service.client.get(f"/images/{t['image']}", headers=admin)
        assert r.status_code == 200
        stored[t["image"]] = r.content
        batch = service.client.get(f"/batches/{ids['batch_id']}", headers=admin).json()
        shown.append(str(batch))
    everything = "\n".join(shown)
    assert first["sha256"] in everything  # the stored hashes are listed (to admins)

    reviewer = key(service, "reviewer")
    for who in ({}, reviewer):  # Label Studio's editor (no key), and a reviewer's own key
        # 1. Every read that shows a mode, model, batch, image or hash is refused.
        for path in get_paths(service, ids):
            r = service.client.get(path, headers=who, follow_redirects=False)
            if path.split("?")[0] in OPEN or path.startswith("/review-images"):
                continue
            if who and any(
                re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", p), path) for p in REVIEWER_READS
            ):
                assert r.status_code in (200, 404), (path, r.text[:200])
                assert not re.search("baseline|prototype|sha256", r.text), path
                continue
            expected = {401} if not who else {403}
            if path.startswith("/ui"):  # pages: the login form for nobody, 403 for reviewers
                expected = {303} if not who else {403}
            assert r.status_code in expected, (who, path, r.status_code, r.text[:200])
            assert first["sha256"] not in r.text and "baseline" not in r.text
        for t in truth:  # ... also for the stored objects themselves
            assert service.client.get(f"/images/{t['image']}", headers=who).status_code in (
                401,
                403,
            )

        # 2. The review images: same pixels, but nothing that matches the stored objects.
        for t in truth:
            r = service.client.get(f"/review-images/{t['token']}", headers=who)
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            data, original = r.content, stored[t["image"]]
            digest = hashlib.sha256(data).hexdigest()
            assert (pixels(data) == pixels(original)).all()  # what reviewers judge is unchanged
            assert data != original and digest != t["sha256"]  # bytes and hash
            assert digest not in everything and digest[:16] not in everything
            assert len(data) != len(original)  # size
            assert PILImage.open(io.BytesIO(data)).info == {}  # no text, time, dpi, profile...
            assert not re.search(rb"tEXt|zTXt|iTXt|tIME|eXIf", data)  # the sampler's are gone
            assert b"protomed" not in data and t["mode"].encode() not in data
            assert set(r.headers) <= IMAGE_HEADERS, set(r.headers) - IMAGE_HEADERS
            for value in r.headers.values():  # no header echoes the stored object
                assert t["sha256"] not in value and t["key"] not in value
                assert str(len(original)) != value
            assert r.headers["access-control-allow-origin"] == "*"  # Label Studio's editor
            again = service.client.get(f"/review-images/{t['token']}", headers=who)
            assert again.content == data  # stable per token: caches and reloads agree

    # 3. Order: Label Studio numbers tasks in position order; neither it nor the tokens follow
    # image ids or modes (the two modes are interleaved, not in blocks).
    order = [t["image"] for t in truth]
    assert order != sorted(order) and order != sorted(order, reverse=True)
    modes = [t["mode"] for t in truth]
    assert modes[:IMAGES] != [modes[0]] * IMAGES


def test_review_images_differ_per_project(study: Service) -> None:
    """A new criteria version is a new Label Studio project: the same image gets another token
    and other bytes, so answers compared across projects cannot be joined by hash either."""
    service = study
    crits = [{"key": "shape", "label": "Shape"}]
    r = service.client.post(
        "/criteria/toy", json={"title": "Toy v2", "criteria": crits}, headers=service.admin
    )
    assert r.status_code == 201
    with get_sessionmaker()() as s:
        batch_ids = sorted({t.image.batch_id for t in s.scalars(select(ReviewTask))})
    r = service.client.post("/reviews", json={"batch_ids": batch_ids}, headers=service.admin)
    assert r.status_code == 202 and r.json()["added"] == 2 * IMAGES
    by_image: dict[int, list[bytes]] = {}
    for t in tasks():
        data = service.client.get(f"/review-images/{t['token']}").content
        by_image.setdefault(t["image"], []).append(data)
    assert all(len(v) == 2 for v in by_image.values())
    assert all(a != b and (pixels(a) == pixels(b)).all() for a, b in by_image.values())


def test_single_mode_requests_are_warned_and_mixed_before_import(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Label Studio numbers tasks in import order: batches sent one request at a time would
    arrive as blocks of one mode. Such a request says so, and tasks not yet imported are
    shuffled again with each new request, so two requests before a sync arrive mixed."""
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    with get_sessionmaker()() as s:
        base, proto = review_batches(s, "toy", IMAGES)
    one = service.client.post("/reviews", json={"batch_ids": [base]}, headers=service.admin)
    assert one.status_code == 202 and "baseline" in one.json()["warning"]
    two = service.client.post("/reviews", json={"batch_ids": [proto]}, headers=service.admin)
    assert two.status_code == 202 and two.json()["warning"] is None
    modes = [t["mode"] for t in tasks()]
    assert len(modes) == 2 * IMAGES and modes[:IMAGES] != ["baseline"] * IMAGES


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "1"])
def test_reencoding_keeps_every_pixel(mode: str) -> None:
    """Whatever layout the stored PNG has, reviewers judge exactly its pixels (palette images
    are expanded to the colours they show); only the bytes change, and stay put per token."""
    from PIL.PngImagePlugin import PngInfo

    from service.blinding import blind_png

    rng = np.random.default_rng(1)
    rgba = PILImage.fromarray(rng.integers(0, 256, (24, 20, 4), dtype=np.uint8), "RGBA")
    if mode == "I;16":
        image = PILImage.fromarray(rng.integers(0, 65536, (24, 20), dtype=np.uint16))
    else:
        image = rgba.convert(mode)
    info = PngInfo()
    info.add_text("protomed-mode", "prototype")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, dpi=(72, 72))
    stored = buf.getvalue()
    out = blind_png(stored, "token-a")
    assert (
        out != stored
        and out != blind_png(stored, "token-b")
        and out == blind_png(stored, "token-a")
    )
    a, b = PILImage.open(io.BytesIO(stored)), PILImage.open(io.BytesIO(out))
    assert b.info == {} and len(out) != len(stored)
    want = a.convert("RGBA") if mode == "P" else a
    assert np.array_equal(np.asarray(want), np.asarray(b.convert(want.mode)))
