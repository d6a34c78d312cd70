"""The sampling job: load the model's checkpoint (cached per machine), generate the batch's
images, store each PNG (carrying its provenance, :mod:`ml.diffusion.provenance`) and record it. A
re-run
replaces a partial batch, so images are never duplicated.

Where the batch's review domain has a plausibility scorer, every image gets its score
(``Image.score``) and the batch records the scorer version. A filtered batch
(``Batch.filter``, :class:`~service.payloads.BatchFilter`) draws ``n * oversample`` images and
keeps those the scorer rates most plausible; each kept image's provenance names its place in
that draw (index among ``drawn``), so it still regenerates exactly, while ``Image.index`` is its
place in the batch."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from service.config import Settings
from service.db.models import Batch, Image, Scorer
from service.db.session import get_sessionmaker
from service.payloads import BatchFilter, SamplePayload
from service.scorers import latest_scorer
from service.storage import Storage
from workers.lifecycle import JobContext

log = logging.getLogger(__name__)
STAGES = {"load": 0.05, "sample": 0.8, "score": 0.05, "store": 0.1}  # rough shares of the time


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
    filter: BatchFilter | None  # keep the most plausible of n * oversample drawn
    scorer_id: int | None  # the domain's newest scorer (None: no scorer, images unscored)
    domain: str | None


def _load(job_id: int) -> SamplingInputs:
    with get_sessionmaker()() as session:
        batch = session.get(Batch, _batch_id(session, job_id))
        if batch is None:
            raise RuntimeError(f"the batch of sample job {job_id} was deleted")
        model = batch.model
        if model is None:
            raise ValueError(f"batch {batch.id} holds real control images: nothing to sample")
        if not model.checkpoint_path:
            raise ValueError(f"model {model.id} has no checkpoint")
        domain = model.dataset.domain
        scorer = latest_scorer(session, domain) if domain else None
        wanted = BatchFilter.model_validate(batch.filter) if batch.filter else None
        if wanted is not None and scorer is None:
            raise ValueError(
                f"batch {batch.id} asks for plausible images but domain {domain!r} has no scorer"
            )
        return SamplingInputs(
            batch_id=batch.id,
            model_id=model.id,
            checkpoint=model.checkpoint_path,
            class_name=batch.class_name,
            n=batch.n,
            guidance=batch.guidance,
            steps=batch.steps,
            seed=batch.seed or 0,
            scheduler=batch.scheduler,
            filter=wanted,
            scorer_id=scorer.id if scorer else None,
            domain=domain,
        )


def _batch_id(session: Any, job_id: int) -> int:
    from pydantic import ValidationError

    from service.db.models import Job

    job = session.get(Job, job_id)
    try:
        return SamplePayload.model_validate(job.params if job else {}).batch_id
    except ValidationError:
        raise ValueError(f"sample job {job_id} names no batch") from None


def local_checkpoint(key: str, model_id: int, storage: Storage, work_dir: Path) -> Path:
    """The checkpoint on this machine's disk, downloaded once per model (only read: local
    storage links it instead of copying)."""
    path = work_dir / "models" / str(model_id) / "checkpoint.pt"
    if not path.is_file():
        storage.download(key, path, link=True)
    return path


def run_sampling(
    job_id: int, ctx: JobContext, settings: Settings, storage: Storage
) -> dict[str, Any]:
    from ml.config import SampleConfig, resolve_device
    from ml.diffusion.provenance import file_sha256
    from ml.diffusion.sample import generate, png_bytes, provenance
    from ml.models.checkpoint import load_model

    progress = ctx.stages(STAGES)
    progress.update("load", 0, 1)
    info = _load(job_id)
    batch_id, n = info.batch_id, info.n
    drawn = n * info.filter.oversample if info.filter else n
    prefix = f"batches/{batch_id}"
    with ctx.owned_session() as session:  # a re-run starts the batch afresh (owners only)
        session.execute(delete(Image).where(Image.batch_id == batch_id))
    storage.delete_prefix(prefix + "/")
    ckpt = local_checkpoint(info.checkpoint, info.model_id, storage, settings.work_dir)
    loaded = load_model(ckpt, use_ema=True, device=resolve_device())
    scfg = SampleConfig(
        steps=info.steps,
        guidance=info.guidance,
        scheduler=info.scheduler,
        seed=info.seed,
        batch_size=min(drawn, 64),
    )
    images = generate(
        loaded, info.class_name, drawn, scfg, on_step=lambda d, t: progress.update("sample", d, t)
    )
    digest = file_sha256(ckpt)
    pngs = []
    for i, img in enumerate(images):  # each record names the image's place in the draw
        record = provenance(
            loaded,
            scfg,
            info.class_name,
            i,
            drawn,
            checkpoint_sha256=digest,
            model_id=info.model_id,
            batch_id=batch_id,
        )
        pngs.append(png_bytes(img, record))
    hashes = [hashlib.sha256(data).hexdigest() for data in pngs]
    scores, scored = _scores(info, pngs, hashes, settings, storage, progress)
    kept = list(range(n))
    if info.filter is not None:
        from ml.scorer import keep

        assert scores is not None  # a filtered batch fails without them (_scores)
        kept = keep(scores, n, info.filter.threshold)
    rows = []
    for pos, i in enumerate(kept):
        progress.update("store", pos, len(kept))
        key = f"{prefix}/{info.class_name}_{pos:04d}.png"
        storage.put_bytes(key, pngs[i], content_type="image/png")
        rows.append(
            Image(
                batch_id=batch_id,
                class_name=info.class_name,
                index=pos,
                storage_key=key,
                sha256=hashes[i],
                score=None if scores is None else float(scores[i]),
            )
        )
    with ctx.owned_session() as session:  # a run that lost its job writes no image rows
        session.add_all(rows)
        batch = session.get(Batch, batch_id)
        if batch is not None:
            batch.drawn, batch.scorer_id = drawn, info.scorer_id if scored else None
    progress.update("store", len(kept), len(kept))
    result: dict[str, Any] = {"batch_id": batch_id, "images": len(rows), "drawn": drawn}
    if scored:
        result["scorer_id"] = info.scorer_id
        result["mean_score"] = float(sum(r.score or 0.0 for r in rows) / max(len(rows), 1))
    if info.filter is not None:
        result["filter"] = info.filter.model_dump(mode="json")
        if len(rows) < n:
            result["short"] = (
                f"{len(rows)} of the {n} images asked for: only {len(rows)} of {drawn} drawn "
                f"scored at least {info.filter.threshold}"
            )
    return result


def _scores(
    info: SamplingInputs,
    pngs: list[bytes],
    hashes: list[str],
    settings: Settings,
    storage: Storage,
    progress: Any,
) -> tuple[Any, bool]:
    """(scores, whether scored) of the drawn images by the domain's newest scorer. Without a
    scorer: (None, False). An unfiltered batch is still made when scoring fails (logged); a
    filtered one fails, since it cannot choose."""
    if info.scorer_id is None:
        return None, False
    from workers.scoring import embed_pngs, load_scorer, scorer_features

    try:
        with get_sessionmaker()() as session:
            row = session.get(Scorer, info.scorer_id)
            if row is None:
                raise ValueError(f"scorer {info.scorer_id} was deleted")
            fitted, key = load_scorer(row, storage), row.artefact_key
        try:
            encoder = scorer_features(fitted, key, storage, settings)
        except ValueError as exc:
            raise ValueError(f"scorer {info.scorer_id}: {exc}") from exc
        x = embed_pngs(
            encoder, pngs, hashes, settings, on_progress=lambda d, t: progress.update("score", d, t)
        )
        return fitted.score(x, [info.class_name] * len(pngs)), True
    except Exception:
        if info.filter is not None:
            raise
        log.warning("batch %s left unscored", info.batch_id, exc_info=True)
        return None, False
