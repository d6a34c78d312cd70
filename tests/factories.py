"""Shared test factories: the rows tests insert (datasets, models, batches, images) with keyword
defaults, so each test states only what matters to it, and the seeds built from them (a ready
model with a queued sample job; baseline and prototype batches with stored PNGs).

Builders add to the session and flush (ids are set); the caller commits."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo
from sqlalchemy.orm import Session

from service.db.models import (
    Batch,
    Dataset,
    Image,
    Job,
    JobKind,
    Model,
    ModelMode,
    ModelStatus,
    Review,
    ReviewProject,
    ReviewTask,
)

if TYPE_CHECKING:
    from conftest import Service

CLASSES = ["basophil", "eosinophil", "lymphocyte"]


@contextmanager
def service_context(env: dict[str, str]) -> Iterator[None]:
    """This process sees the service configured by ``env`` (its database, its storage) for the
    block: to seed rows for servers the test started as separate processes."""
    from conftest import reset_service_caches

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    reset_service_caches()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_service_caches()


def create(builder: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """``builder(session, ...)`` in a session of the service's database, committed; the new
    row's id (for tests that hold ids, not rows)."""
    from service.db.session import get_sessionmaker

    with get_sessionmaker()() as session:
        row = builder(session, *args, **kwargs)
        session.commit()
        return row.id


def add_dataset(
    session: Session,
    *,
    name: str | None = None,
    classes: Sequence[str] = CLASSES,
    counts: dict[str, int] | None = None,
    root: str = "/nowhere",
    layout: str = "folder",
    **extra: Any,
) -> Dataset:
    """A registered dataset (no files behind it); ``name`` defaults to a unique one. Its
    default counts hold the default training split (100 + 20 held out per class), which
    POST /jobs/train checks."""
    ds = Dataset(
        name=name or f"ds-{uuid.uuid4().hex[:8]}",
        root=root,
        layout=layout,
        classes=list(classes),
        counts=dict.fromkeys(classes, 120) if counts is None else counts,
        **extra,
    )
    session.add(ds)
    session.flush()
    return ds


def add_model(
    session: Session,
    dataset: Dataset | None = None,
    *,
    mode: str | ModelMode = ModelMode.prototype,
    status: str | ModelStatus = ModelStatus.ready,
    preset: str = "tiny",
    config: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    **extra: Any,
) -> Model:
    """A model of ``dataset`` (or of ``dataset_id=`` in ``extra``), ready by default, with the
    dataset's classes."""
    if classes is None:
        classes = dataset.classes if dataset is not None else CLASSES
    m = Model(
        mode=ModelMode(mode),
        status=ModelStatus(status),
        preset=preset,
        config=config or {},
        classes=list(classes),
        **({"dataset": dataset} if dataset is not None else {}),
        **extra,
    )
    session.add(m)
    session.flush()
    return m


def add_batch(
    session: Session,
    model: Model | None = None,
    *,
    class_name: str | None = None,
    n: int = 1,
    guidance: float = 2.0,
    steps: int = 50,
    seed: int | None = 0,
    scheduler: str = "ddim",
    **extra: Any,
) -> Batch:
    """A batch of ``model`` (or of ``model_id=`` in ``extra``), by default of its first class."""
    if class_name is None:
        class_name = model.classes[0] if model is not None else CLASSES[0]
    b = Batch(
        class_name=class_name,
        n=n,
        guidance=guidance,
        steps=steps,
        seed=seed,
        scheduler=scheduler,
        **({"model": model} if model is not None else {}),
        **extra,
    )
    session.add(b)
    session.flush()
    return b


def add_image(
    session: Session,
    batch: Batch,
    *,
    index: int = 0,
    data: bytes = b"",
    store: bool = False,
    class_name: str | None = None,
    key: str | None = None,
) -> Image:
    """An image row of ``batch`` for ``data``; ``store``: the bytes are also put into the
    service's storage under the key (default: where the sampler writes it)."""
    class_name = class_name or batch.class_name
    key = key or f"batches/{batch.id}/{class_name}_{index:04d}.png"
    if store:
        from service.storage import get_storage

        get_storage().put_bytes(key, data, "image/png")
    img = Image(
        batch=batch,
        class_name=class_name,
        index=index,
        storage_key=key,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    session.add(img)
    session.flush()
    return img


def add_review_task(
    session: Session, project: ReviewProject, image: Image, **extra: Any
) -> ReviewTask:
    """``image`` as a task of the review ``project`` (its own opaque token, in image order)."""
    task = ReviewTask(
        project=project,
        image=image,
        token=uuid.uuid4().hex,
        position=extra.pop("position", image.id),
        **extra,
    )
    session.add(task)
    session.flush()
    return task


def add_review(
    session: Session,
    task: ReviewTask,
    *,
    ls_annotation_id: int,
    reviewer: str,
    plausible: bool = True,
    criteria: dict[str, str] | None = None,
    **extra: Any,
) -> Review:
    """A stored verdict on ``task``, as a Label Studio annotation brings it in; its overall
    choice follows ``plausible`` unless given."""
    extra.setdefault("overall", "plausible" if plausible else "implausible")
    review = Review(
        task=task,
        ls_annotation_id=ls_annotation_id,
        reviewer=reviewer,
        plausible=plausible,
        criteria=criteria or {},
        **extra,
    )
    session.add(review)
    session.flush()
    return review


def png_bytes(pixels: np.ndarray, info: PngInfo | None = None) -> bytes:
    """``pixels`` (H x W x 3 uint8) as PNG bytes."""
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def sampler_png(rng: Any, mode: str, model_id: int, size: int = 16) -> bytes:
    """A random RGB PNG carrying the text chunks a sampler could write (its model and mode):
    what the blinding must strip before a reviewer sees it."""
    info = PngInfo()
    info.add_text("protomed-mode", mode)
    info.add_text("protomed-model", str(model_id))
    return png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), info)


def zip_folder(folder: Path, dest: Path, top: str | None = "toy") -> Path:
    """Zip ``folder`` (a toy dataset, say) with its files under ``top/`` (or at the top)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder).as_posix()
            zf.write(f, f"{top}/{rel}" if top else rel)
    return dest


def upload(service: Service, name: str, data: bytes, headers=None, **form: str) -> Any:
    """``POST /datasets/upload`` of the zip ``data`` (as the admin unless ``headers``)."""
    return service.client.post(
        "/datasets/upload",
        data={"name": name, **form},
        files={"file": ("data.zip", data, "application/zip")},
        headers=service.admin if headers is None else headers,
    )


def state(service: Service) -> tuple[int, list[str], list[str]]:
    """(datasets in the API, everything under work/datasets, every object in storage): what a
    refused request must leave as it was."""
    from service.storage import get_storage

    listed = service.client.get("/datasets", headers=service.admin)
    assert listed.status_code == 200
    work = service.tmp / "work" / "datasets"
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*")) if work.exists() else []
    return len(listed.json()), files, get_storage().list_keys("datasets/")


def seed_rows(session: Session, *, image_key: str | None = None, png: bytes = b"") -> dict:
    """A dataset, a ready model, a queued sample job with its batch; committed; returns their
    ids. ``image_key``: also an Image row for bytes the caller stored under that key. (Used by
    tests and bench/api_latency.py, which read the API without training anything.)"""
    ds = add_dataset(session, name="cells")
    model = add_model(session, ds, checkpoint_path="models/x/checkpoint.pt")
    job = Job(kind=JobKind.sample, model=model, requested_by="seed")
    session.add(job)
    batch = add_batch(session, model, job=job)
    if image_key is not None:
        add_image(session, batch, key=image_key, data=png)
    job.params = {"batch_id": batch.id}
    session.commit()
    return {"dataset": ds.id, "model": model.id, "job": job.id, "batch": batch.id}


def review_batches(session: Session, domain: str | None = "toy", images: int = 3) -> list[int]:
    """A dataset with a ready baseline and a ready prototype model, one batch of ``images``
    real PNGs each (class "a"), stored; returns the batch ids (baseline first)."""
    rng, ids = np.random.default_rng(len(domain or "")), []
    ds = add_dataset(
        session,
        name=f"d-{domain}",
        root="/x",
        classes=["a", "b"],
        counts={"a": 3, "b": 3},
        domain=domain,
    )
    for mode in ("baseline", "prototype"):
        m = add_model(session, ds, mode=mode)
        b = add_batch(session, m, class_name="a", n=max(images, 1), guidance=2, steps=5, seed=None)
        for i in range(images):
            add_image(session, b, index=i, data=sampler_png(rng, mode, m.id), store=True)
        ids.append(b.id)
    session.commit()
    return ids
