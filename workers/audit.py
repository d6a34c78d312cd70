"""The audit job: a batch's stored PNGs against the training split of the model that made them
(rebuilt from the model's recorded selection, with its held-out images), by ``ml.audit``. The
report is the job's result; the nearest training image of every flagged image (and of the
closest few, so the page always shows the closest pairs) is stored for the dashboard."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from ml.schemas.audit import AuditReport, nearest  # torch-free
from service.archive import ensure_local
from service.audits import AuditStored
from service.config import Settings
from service.db.models import Batch, Job
from service.db.session import get_sessionmaker
from service.payloads import AuditPayload
from service.storage import Storage
from workers.lifecycle import JobContext
from workers.sampling import local_checkpoint
from workers.training import encoder_spec, read_roots

STAGES = {"load": 0.15, "audit": 0.8, "store": 0.05}  # rough shares of the job's time
CLOSEST_SHOWN = 8  # nearest training images kept besides the flagged ones
MAX_SHOWN = 64  # at most this many pairs stored per audit


def _load(job_id: int) -> dict[str, Any]:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"audit job {job_id} was deleted while it ran")
        params = AuditPayload.model_validate(job.params)
        batch = session.get(Batch, params.batch_id)
        if batch is None:
            raise ValueError(f"batch {params.batch_id} was deleted before its audit ran")
        model = batch.model
        if model is None:
            raise ValueError(f"batch {batch.id} holds real control images: no model to audit")
        if not model.checkpoint_path:
            raise ValueError(f"model {model.id} has no checkpoint")
        images = sorted(batch.images, key=lambda i: i.index)
        return {
            "batch_id": batch.id,
            "config": params.config,
            "model_id": model.id,
            "checkpoint": model.checkpoint_path,
            "root": model.dataset.root,
            "archive_key": model.dataset.archive_key,
            "images": [(i.id, i.class_name, i.storage_key) for i in images],
        }


def run_audit(job_id: int, ctx: JobContext, settings: Settings, storage: Storage) -> dict[str, Any]:
    import torch
    from PIL import Image

    from ml.audit import audit_images, model_split
    from ml.models.checkpoint import load_model
    from ml.prototypes.encoder import ClipEncoder, EmbeddingCache

    progress = ctx.stages(STAGES)
    progress.update("load", 0, 1)
    info = _load(job_id)
    cfg = info["config"]
    ckpt = local_checkpoint(info["checkpoint"], info["model_id"], storage, settings.work_dir)
    loaded = load_model(ckpt)
    root = ensure_local(
        info["root"],
        info["archive_key"],
        storage,
        settings.work_dir,
        max_bytes=settings.max_unpacked_bytes,
        max_files=settings.max_upload_files,
    )
    split = model_split(loaded, str(root), read_roots(settings))
    arrays = []
    for _id, _cls, key in info["images"]:
        arr = np.asarray(Image.open(io.BytesIO(storage.get_bytes(key))).convert("RGB"))
        arrays.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    encoder = None
    if "clip" in cfg.spaces:
        spec, untrained = encoder_spec(settings)
        encoder = ClipEncoder(spec, allow_untrained=untrained)
    progress.update("load", 1, 1)
    with EmbeddingCache(settings.work_dir / "embeddings.sqlite") as cache:
        report = audit_images(
            torch.stack(arrays),
            [c for _i, c, _k in info["images"]],
            split,
            encoder,
            cfg,
            flips=loaded.cfg.flip,
            cache=cache,
            names=[k for _i, _c, k in info["images"]],
            progress=lambda _stage, f: progress.update("audit", f, 1),
        )
    ids = [i for i, _c, _k in info["images"]]
    stored = store_audit(
        job_id,
        info["batch_id"],
        report,
        split.train.images,
        ids,
        storage,
        progress=lambda done, total: progress.update("store", done, total),
    )
    return stored.model_dump(mode="json")


def store_audit(
    job_id: int,
    batch_id: int,
    report: AuditReport,
    train_images: Any,
    image_ids: list[int],
    storage: Storage,
    progress: Callable[[int, int], None] | None = None,
) -> AuditStored:
    """The job's result: the report with the batch's image ids, and the nearest training image
    (uint8 tensors ``train_images``) of every flagged image and of the closest few others put
    into storage for the dashboard."""
    from ml.diffusion.sample import (
        png_bytes,  # no provenance record: these are real training images
    )

    closest = sorted(report.images, key=lambda a: nearest(a).ratio or 0.0)[:CLOSEST_SHOWN]
    shown = [*report.flagged(), *(a for a in closest if not a.flagged)][:MAX_SHOWN]
    keys = {}
    for n, a in enumerate(shown):
        if progress is not None:
            progress(n, len(shown))
        key = f"audits/{job_id}/nearest_{a.index:04d}.png"
        storage.put_bytes(key, png_bytes(train_images[nearest(a).train_index]), "image/png")
        keys[str(a.index)] = key
    return AuditStored(batch_id=batch_id, report=report, image_ids=image_ids, nearest_keys=keys)
