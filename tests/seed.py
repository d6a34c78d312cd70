"""Rows for tests and benchmarks that read the API without training anything: a dataset, a
ready model, a queued sample job with its batch and, optionally, one stored image."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo
from sqlalchemy.orm import Session

from service.db.models import Batch, Dataset, Image, Job, JobKind, Model, ModelMode, ModelStatus

CLASSES = ["basophil", "eosinophil", "lymphocyte"]


def seed_rows(session: Session, *, image_key: str | None = None, png: bytes = b"") -> dict:
    """Insert and commit the rows; returns their ids. ``image_key``: also an Image row for
    bytes the caller stored under that key."""
    ds = Dataset(
        name="cells", root="/nowhere", layout="folder", classes=CLASSES,
        counts=dict.fromkeys(CLASSES, 10),
    )  # fmt: skip
    model = Model(
        dataset=ds, mode=ModelMode.prototype, preset="tiny", config={}, classes=CLASSES,
        status=ModelStatus.ready, checkpoint_path="models/x/checkpoint.pt",
    )  # fmt: skip
    job = Job(kind=JobKind.sample, model=model, requested_by="seed")
    batch = Batch(
        model=model, class_name=CLASSES[0], n=1, guidance=2.0, steps=50, seed=0,
        scheduler="ddim", job=job,
    )  # fmt: skip
    session.add_all([ds, model, job, batch])
    if image_key is not None:
        session.add(
            Image(
                batch=batch,
                class_name=CLASSES[0],
                index=0,
                storage_key=image_key,
                sha256=hashlib.sha256(png).hexdigest(),
            )
        )
    session.flush()
    job.params = {"batch_id": batch.id}
    session.commit()
    return {"dataset": ds.id, "model": model.id, "job": job.id, "batch": batch.id}


def sampler_png(rng: Any, mode: str, model_id: int, size: int = 16) -> bytes:
    """A random RGB PNG carrying the text chunks a sampler could write (its model and mode):
    what the blinding must strip before a reviewer sees it."""
    info = PngInfo()
    info.add_text("protomed-mode", mode)
    info.add_text("protomed-model", str(model_id))
    buf = io.BytesIO()
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    PILImage.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def review_batches(session: Session, domain: str | None = "toy", images: int = 3) -> list[int]:
    """A dataset with a ready baseline and a ready prototype model, one batch of ``images``
    real PNGs each (class "a"), stored; returns the batch ids (baseline first)."""
    from service.storage import get_storage

    rng, ids = np.random.default_rng(len(domain or "")), []
    ds = Dataset(name=f"d-{domain}", root="/x", layout="folder", classes=["a", "b"],
                 counts={"a": 3, "b": 3}, domain=domain)  # fmt: skip
    for mode in ("baseline", "prototype"):
        m = Model(dataset=ds, mode=ModelMode(mode), preset="tiny", config={},
                  classes=["a", "b"], status=ModelStatus.ready)  # fmt: skip
        b = Batch(model=m, class_name="a", n=max(images, 1), guidance=2, steps=5,
                  scheduler="ddim")  # fmt: skip
        session.add(b)
        session.flush()
        for i in range(images):
            key, data = f"batches/{b.id}/a_{i:04d}.png", sampler_png(rng, mode, m.id)
            get_storage().put_bytes(key, data, "image/png")
            session.add(Image(batch=b, class_name="a", index=i, storage_key=key,
                              sha256=hashlib.sha256(data).hexdigest()))  # fmt: skip
        ids.append(b.id)
    session.commit()
    return ids
