"""Rows for tests and benchmarks that read the API without training anything: a dataset, a
ready model, a queued sample job with its batch and, optionally, one stored image."""

from __future__ import annotations

import hashlib

from sqlalchemy.orm import Session

from api.db.models import Batch, Dataset, Image, Job, JobKind, Model, ModelMode, ModelStatus

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
