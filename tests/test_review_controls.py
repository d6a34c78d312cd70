"""Real images as controls in the blinded review, without Label Studio (the route stops at the
queued sync job): drawn only from the reviewed models' held-out images, refused otherwise,
and served exactly like the synthetic images: same size, same re-encoding, same task data,
shuffled among them. The report's real column is checked against hand-computed Wilson and
Newcombe values."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Service, reset_service_caches
from factories import add_batch, add_dataset, add_image, add_model, add_review, sampler_png
from PIL import Image as PILImage
from sqlalchemy import select

from ml.data.draw import training_files
from ml.data.toy import TOY_CLASSES, write_toy_dataset
from service.blinding import chunks
from service.db.models import Batch, BatchSource, Image, ReviewTask
from service.db.session import get_sessionmaker
from service.reviews import task_data

CLS = TOY_CLASSES[0]
SIZE = 16  # the synthetic images' side; the toy dataset's images are 64 px
SPLIT = {"layout": "folder", "n_per_class": 5, "n_heldout": 2, "image_size": 32, "seed": 0}


def toy(service: Service) -> Path:
    return write_toy_dataset(service.data_root / "toy", n_per_class=12, size=64, seed=3)


def seed_study(service: Service, images: int = 6) -> tuple[list[int], int, Path]:
    """A toy dataset on disk, a baseline and a prototype model trained on its recorded split,
    one batch of ``images`` synthetic PNGs each (class CLS); returns batch ids, dataset id and
    root."""
    root = toy(service)
    rng = np.random.default_rng(0)
    with get_sessionmaker()() as s:
        ds = add_dataset(s, root=str(root), classes=list(TOY_CLASSES), domain="toy")
        selection = {**SPLIT, "root": str(root), "classes": list(TOY_CLASSES)}
        ids = []
        for mode in ("baseline", "prototype"):
            m = add_model(s, ds, mode=mode, metrics={"selection": selection})
            b = add_batch(s, m, class_name=CLS, n=images, seed=None)
            for i in range(images):
                add_image(s, b, index=i, data=sampler_png(rng, mode, m.id, SIZE), store=True)
            ids.append(b.id)
        s.commit()
        return ids, ds.id, root


def post(service: Service, body: dict[str, Any]) -> Any:
    return service.client.post("/reviews", json=body, headers=service.admin)


@pytest.fixture
def ls(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service with a Label Studio address set (never reached: the request stops at the
    queued sync job)."""
    monkeypatch.setenv("PROTOMED_LABEL_STUDIO_URL", "http://127.0.0.1:9")
    reset_service_caches()
    return service


def test_training_files_match_the_split(tmp_path: Path) -> None:
    """The torch-free redraw names exactly the files and pixel hashes load_split trains on."""
    from ml.data.images import load_selection

    root = write_toy_dataset(tmp_path / "toy", n_per_class=12, size=64, seed=3)
    selection = {**SPLIT, "root": str(root), "classes": list(TOY_CLASSES)}
    split = load_selection(selection)
    files = training_files(selection)
    assert files.paths == {str(Path(p).resolve()) for p in split.train.paths}
    assert files.hashes == set(split.train.hashes) and files.image_size == 32
    assert not files.paths & {str(Path(p).resolve()) for p in split.heldout.paths}


def test_controls_join_the_review_blinded(ls: Service) -> None:
    batches, dataset_id, root = seed_study(ls)
    body = {"batch_ids": batches, "controls": {"dataset_id": dataset_id, "share": 0.5, "seed": 7}}
    r = post(ls, body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["added"] == 12 + 6 and out["job"]["kind"] == "review_sync"
    assert len(out["controls"]) == 1 and 0 <= out["png_size_auc"] <= 1
    selection = {**SPLIT, "root": str(root), "classes": list(TOY_CLASSES)}
    trained = training_files(selection)
    with get_sessionmaker()() as s:
        control = s.get(Batch, out["controls"][0])
        assert control is not None and control.source == BatchSource.control
        assert control.model_id is None and control.dataset_id == dataset_id
        record = control.control or {}
        assert record["seed"] == 7 and record["share"] == 0.5 and len(record["files"]) == 6
        assert record["leak"]["real"] == 6 and record["leak"]["synthetic"] == 12
        assert not {str((root / f).resolve()) for f in record["files"]} & trained.paths
        tasks = s.scalars(select(ReviewTask).order_by(ReviewTask.position)).all()
        real = [t.image.batch.source == BatchSource.control for t in tasks]
        assert sum(real) == 6 and real != sorted(real) and real != sorted(real, reverse=True)
        data = [task_data(t, "http://x") for t in tasks]
        assert {tuple(sorted(d)) for d in data} == {("expected_class", "image", "ref")}
        assert {d["expected_class"] for d in data} == {CLS}
        assert {len(t.token) for t in tasks} == {len(tasks[0].token)}
        tokens = [(t.token, t.image.batch.source) for t in tasks]
    seen: dict[Any, set[Any]] = {BatchSource.control: set(), BatchSource.generated: set()}
    for token, source in tokens:
        img = ls.client.get(f"/review-images/{token}")
        assert img.status_code == 200
        kinds = {k for k, _ in chunks(img.content)}
        assert kinds <= {b"IHDR", b"IDAT", b"IEND"}
        with PILImage.open(io.BytesIO(img.content)) as im:
            seen[source].add((im.size, im.mode, tuple(sorted(im.info))))
        seen[source].add(tuple(sorted(img.headers)))
    assert seen[BatchSource.control] == seen[BatchSource.generated]
    # the same request again adds nothing synthetic; fresh controls are drawn for nothing
    again = post(ls, {"batch_ids": batches})
    assert again.status_code == 202 and again.json()["added"] == 0


def test_control_requests_refused(ls: Service) -> None:
    batches, dataset_id, root = seed_study(ls)
    held_out = 12 - SPLIT["n_per_class"]  # per class: everything outside the training split
    cases = [
        ({"dataset_id": 4242, "per_class": 1}, "no dataset with id 4242"),
        ({"dataset_id": dataset_id, "per_class": held_out + 1}, "held-out images of class"),
        ({"dataset_id": dataset_id, "share": 1.5}, "share"),
        ({"dataset_id": dataset_id, "share": 0}, "share"),
        ({"dataset_id": dataset_id}, "per_class or share"),
        ({"dataset_id": dataset_id, "per_class": 1, "share": 0.5}, "per_class or share"),
    ]
    for controls, needle in cases:
        r = post(ls, {"batch_ids": batches, "controls": controls})
        assert r.status_code == 422 and needle in r.text, (controls, r.text)
    with get_sessionmaker()() as s:  # a model that records no split: held-out part unknown
        ds = add_dataset(s, root=str(root), classes=list(TOY_CLASSES), domain="toy")
        m = add_model(s, ds, mode="baseline")
        b = add_batch(s, m, class_name=CLS, n=1)
        add_image(s, b, data=sampler_png(np.random.default_rng(1), "baseline", m.id), store=True)
        s.commit()
        unknown_split = [b.id]
        # another dataset lacking the class
        other = add_dataset(s, root=str(root / TOY_CLASSES[1]), classes=["x"])
        s.commit()
        other_id = other.id
    r = post(
        ls, {"batch_ids": unknown_split, "controls": {"dataset_id": dataset_id, "per_class": 1}}
    )
    assert r.status_code == 422 and "records no data split" in r.text
    r = post(ls, {"batch_ids": batches, "controls": {"dataset_id": other_id, "per_class": 1}})
    assert r.status_code == 422, r.text
    assert f"no images of class {CLS}" in r.text or "cannot be read" in r.text
    with get_sessionmaker()() as s:
        assert s.scalars(select(ReviewTask)).first() is None
        assert s.scalars(select(Batch).where(Batch.source == BatchSource.control)).first() is None
        assert len(s.scalars(select(Image)).all()) == 13


Z = 1.959963984540054  # the 97.5% normal quantile


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval from its formula (not the service's function)."""
    centre = (k + Z * Z / 2) / (n + Z * Z)
    half = Z * math.sqrt(k * (n - k) / n + Z * Z / 4) / (n + Z * Z)
    return centre - half, centre + half


def newcombe_by_hand(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p2 - p1 (method 10), from its formula."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson_by_hand(k1, n1), wilson_by_hand(k2, n2)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt(
        (u2 - p2) ** 2 + (p1 - l1) ** 2
    )


def test_report_sets_models_against_real(ls: Service) -> None:
    """Real images: 4 of 6 plausible; baseline 2 of 6, prototype 5 of 6. The report's real
    rate and model-minus-real differences equal the hand-computed Wilson and Newcombe values,
    in JSON, CSV and on the dashboard."""
    batches, dataset_id, _ = seed_study(ls)
    body = {"batch_ids": batches, "controls": {"dataset_id": dataset_id, "per_class": 6}}
    r = post(ls, body)
    assert r.status_code == 202, r.text
    plausible = {BatchSource.control: 4, "baseline": 2, "prototype": 5}
    with get_sessionmaker()() as s:
        tasks = s.scalars(select(ReviewTask).order_by(ReviewTask.id)).all()
        given: Counter[Any] = Counter()
        for i, t in enumerate(tasks):
            batch = t.image.batch
            side = batch.source if batch.model is None else str(batch.model.mode)
            add_review(
                s, t, ls_annotation_id=i + 1, reviewer="r1", plausible=given[side] < plausible[side]
            )
            given[side] += 1
        s.commit()
        ids = {str(b.model.mode): b.model_id for b in s.scalars(select(Batch)) if b.model}
    report = ls.client.get("/reports/plausibility", headers=ls.admin).json()
    (row,) = report["classes"]
    real = row["real"]
    assert (real["images"], real["plausible"]) == (6, 4)
    assert real["ci"] == pytest.approx(wilson_by_hand(4, 6), abs=1e-9)
    for mode, k in (("baseline", 2), ("prototype", 5)):
        diff = row["versus_real"][str(ids[mode])]
        assert diff["value"] == pytest.approx(k / 6 - 4 / 6)
        assert diff["ci"] == pytest.approx(newcombe_by_hand(4, 6, k, 6), abs=1e-9)
    assert row["models"][str(ids["baseline"])]["images"] == 6  # controls are no model's
    (leak,) = report["control_leaks"]
    assert (leak["real"], leak["synthetic"]) == (6, 12) and 0 <= leak["png_size_auc"] <= 1
    csv_text = ls.client.get(
        "/reports/plausibility", params={"format": "csv"}, headers=ls.admin
    ).text
    assert "real images (%)" in csv_text and "66.67 (n=6; 6 reviews)" in csv_text
    lo, hi = newcombe_by_hand(4, 6, 5, 6)
    assert f"16.67,[{100 * lo:.1f}; {100 * hi:.1f}]" in csv_text and "PNG size AUC" in csv_text
    page = ls.client.get("/ui/reports/plausibility", headers=ls.admin)
    assert page.status_code == 200 and 'id="controls"' in page.text
    assert 'id="control-leak"' in page.text
