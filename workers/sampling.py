"""The sampling job: load the model's checkpoint (cached per machine), generate the batch's
images, store each PNG (carrying its provenance, :mod:`ml.provenance`) and record it. A re-run
replaces a partial batch, so images are never duplicated."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from service.config import Settings
from service.db.models import Batch, Image
from service.db.session import get_sessionmaker
from service.payloads import SamplePayload
from service.storage import Storage
from workers.lifecycle import JobContext

STAGES = {"load": 0.05, "sample": 0.85, "store": 0.1}  # rough shares of the job's time


@dataclass(frozen=True)
class SamplingInputs:
    """The batch to fill and the model to sample it with, read once from the database."""

    batch_id: int
    model_id: int
    checkpoint: str  # storage key
    class_name: str
    n: int
    guidance: float
    steps: int
    seed: int
    scheduler: str


def _load(job_id: int) -> SamplingInputs:
    with get_sessionmaker()() as session:
        batch = session.get(Batch, _batch_id(session, job_id))
        if batch is None:
            raise RuntimeError(f"the batch of sample job {job_id} was deleted")
        model = batch.model
        if not model.checkpoint_path:
            raise ValueError(f"model {model.id} has no checkpoint")
        return SamplingInputs(
            batch_id=batch.id, model_id=model.id, checkpoint=model.checkpoint_path,
            class_name=batch.class_name, n=batch.n, guidance=batch.guidance, steps=batch.steps,
            seed=batch.seed or 0, scheduler=batch.scheduler,
        )  # fmt: skip


def _batch_id(session: Any, job_id: int) -> int:
    from pydantic import ValidationError

    from service.db.models import Job

    job = session.get(Job, job_id)
    try:
        return SamplePayload.model_validate(job.params if job else {}).batch_id
    except ValidationError:
        raise ValueError(f"sample job {job_id} names no batch") from None


def local_checkpoint(key: str, model_id: int, storage: Storage, work_dir: Path) -> Path:
    """The checkpoint on this machine's disk, downloaded once per model."""
    path = work_dir / "models" / str(model_id) / "checkpoint.pt"
    if not path.is_file():
        storage.download(key, path)
    return path


def run_sampling(
    job_id: int, ctx: JobContext, settings: Settings, storage: Storage
) -> dict[str, Any]:
    from ml.checkpoint import load_model
    from ml.config import SampleConfig, resolve_device
    from ml.provenance import file_sha256
    from ml.sample import generate, png_bytes, provenance

    progress = ctx.stages(STAGES)
    progress.update("load", 0, 1)
    info = _load(job_id)
    batch_id, n = info.batch_id, info.n
    prefix = f"batches/{batch_id}"
    with get_sessionmaker()() as session:  # a re-run starts the batch afresh
        session.execute(delete(Image).where(Image.batch_id == batch_id))
        session.commit()
    storage.delete_prefix(prefix + "/")
    ckpt = local_checkpoint(info.checkpoint, info.model_id, storage, settings.work_dir)
    loaded = load_model(ckpt, use_ema=True, device=resolve_device())
    scfg = SampleConfig(
        steps=info.steps, guidance=info.guidance, scheduler=info.scheduler, seed=info.seed,
        batch_size=min(n, 64),
    )  # fmt: skip
    images = generate(
        loaded, info.class_name, n, scfg, on_step=lambda d, t: progress.update("sample", d, t)
    )
    rows = []
    digest = file_sha256(ckpt)
    for i, img in enumerate(images):
        progress.update("store", i, n)
        record = provenance(
            loaded, scfg, info.class_name, i, n, checkpoint_sha256=digest,
            model_id=info.model_id, batch_id=batch_id,
        )  # fmt: skip
        data = png_bytes(img, record)
        key = f"{prefix}/{info.class_name}_{i:04d}.png"
        storage.put_bytes(key, data, content_type="image/png")
        rows.append(
            Image(
                batch_id=batch_id,
                class_name=info.class_name,
                index=i,
                storage_key=key,
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    with get_sessionmaker()() as session:
        session.add_all(rows)
        session.commit()
    progress.update("store", n, n)
    return {"batch_id": batch_id, "images": len(rows)}
