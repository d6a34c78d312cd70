"""The ``score`` job: train the next version of a review domain's plausibility scorer.

Every reviewed image of the domain (all its review projects and criteria versions) with its
verdict (most of its reviewers: :func:`service.scorers.reviewed_images`) is embedded (the
original PNG in storage; reviewers saw a stripped copy of the same pixels), ``ml.scorer.
fit_scorer`` fits and cross-validates, and the weights go to storage with a ``Scorer`` row. The
sampling job scores new batches with the newest version.

The encoder (``Settings.scorer_encoder_kind``) is the project's CLIP encoder, or the learned
domain encoder of the domain's newest ready model whose codebook has one: its files are copied
beside the scorer's weights (:func:`encoder_prefix`), so the scorer's features stay loadable when
that model is deleted, and the sampling job loads exactly them (:func:`scorer_features`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.models import Dataset, Job, Model, ModelStatus, Scorer
from service.db.session import get_sessionmaker
from service.payloads import ScorePayload
from service.scorers import reviewed_images
from service.storage import Storage
from workers.lifecycle import JobContext
from workers.training import encoder_spec

STAGES = {"load": 0.1, "embed": 0.7, "fit": 0.15, "store": 0.05}
# ml.prototypes.learned_encoder's JSON_NAME and TENSORS_NAME (named here: this module imports no
# torch)
ENCODER_FILES = ("encoder.json", "encoder.safetensors")


def project_encoder(settings: Settings) -> Any:
    """The configured CLIP encoder (``ml.prototypes.encoder.ClipEncoder``), built as the audit job
    does."""
    from ml.prototypes.encoder import ClipEncoder

    spec, untrained = encoder_spec(settings)
    return ClipEncoder(spec, allow_untrained=untrained)


def encoder_prefix(artefact_key: str) -> str:
    """Where a scorer's learned encoder is stored: beside its weights."""
    return artefact_key.removesuffix(".safetensors") + "-encoder"


def _fetch_encoder(prefix: str, identity: str | None, storage: Storage, settings: Settings) -> Any:
    """The learned encoder stored under ``prefix`` (cached in the work folder by checksum),
    checked to be ``identity`` when one is given."""
    from ml.prototypes.learned_encoder import LearnedEncoder

    local = settings.work_dir / "encoders" / prefix.replace("/", "_")
    for name in ENCODER_FILES:
        storage.download(f"{prefix}/{name}", local / name)
    enc = LearnedEncoder.load(local)
    if identity is not None and enc.identity != identity:
        raise ValueError(f"the encoder stored at {prefix} is {enc.identity}, not {identity}")
    return enc


def domain_learned_encoder(
    session: Session, domain: str, storage: Storage, settings: Settings
) -> tuple[Any, str]:
    """(encoder, storage prefix) of the learned encoder of the domain's newest ready model that
    has one; ValueError saying what to do when none has."""
    rows = session.scalars(
        select(Model)
        .join(Dataset)
        .where(
            Dataset.domain == domain,
            Model.status == ModelStatus.ready,
            Model.codebook_path.is_not(None),
        )
        .order_by(Model.id.desc())
    )
    for model in rows:
        prefix = str(model.codebook_path)
        if storage.exists(f"{prefix}/{ENCODER_FILES[0]}"):
            return _fetch_encoder(prefix, None, storage, settings), prefix
    raise ValueError(
        f"the scorer's encoder is the learned one (PROTOMED_SCORER_ENCODER / "
        f"PROTOMED_PROTOTYPE_ENCODER), but no ready model of domain {domain!r} was trained "
        "with a learned encoder: train one (POST /jobs/train with the learned prototype "
        "encoder), or set PROTOMED_SCORER_ENCODER=clip"
    )


def scorer_features(fitted: Any, artefact_key: str, storage: Storage, settings: Settings) -> Any:
    """The encoder a fitted scorer was trained on: its stored learned encoder, or the worker's
    CLIP encoder when that is the one (ValueError naming both otherwise)."""
    from ml.prototypes.learned_encoder import is_learned

    if is_learned(fitted.encoder):
        return _fetch_encoder(encoder_prefix(artefact_key), fitted.encoder, storage, settings)
    encoder = project_encoder(settings)
    if encoder.identity != fitted.encoder:
        raise ValueError(
            f"the scorer was trained on {fitted.encoder} embeddings, this worker's encoder is "
            f"{encoder.identity}: train a new one (POST /scorers)"
        )
    return encoder


def embed_pngs(
    encoder: Any,
    pngs: Sequence[bytes],
    hashes: Sequence[str],
    settings: Settings,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray[Any, Any]:
    """Embeddings (n, dim) of PNG images in input order, through the worker's embedding cache.
    Images are grouped by size (a domain's models may draw at different sizes); the encoder
    resizes each to its input."""
    import torch
    from PIL import Image

    from ml.prototypes.encoder import EmbeddingCache, embed

    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs]
    out = np.zeros((len(arrays), encoder.dim), dtype=np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(a.shape, []).append(i)
    done = 0
    with EmbeddingCache(settings.work_dir / "embeddings.sqlite") as cache:
        for idx in groups.values():
            batch = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2)
            vecs = embed(encoder, batch.contiguous(), [hashes[i] for i in idx], cache)
            out[idx] = vecs.numpy()
            done += len(idx)
            if on_progress is not None:
                on_progress(done, len(arrays))
    return out


def load_scorer(scorer: Scorer, storage: Storage) -> Any:
    """The fitted ``ml.scorer.Scorer`` of a scorer row."""
    from ml.scorer import Scorer as Fitted

    return Fitted.from_bytes(storage.get_bytes(scorer.artefact_key))


def _domain(job_id: int) -> str:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"score job {job_id} was deleted while it ran")
        try:
            return ScorePayload.model_validate(job.params or {}).domain
        except ValidationError:
            raise ValueError(f"score job {job_id} names no domain") from None


def run_scoring(
    job_id: int, ctx: JobContext, settings: Settings, storage: Storage
) -> dict[str, Any]:
    from ml.scorer import fit_scorer

    progress = ctx.stages(STAGES)
    progress.update("load", 0, 1)
    domain = _domain(job_id)
    with get_sessionmaker()() as session:
        images = reviewed_images(session, domain)
    if len(images) < settings.scorer_min_images:
        raise ValueError(
            f"domain {domain!r} has {len(images)} reviewed images; a scorer needs at least "
            f"{settings.scorer_min_images}"
        )
    pngs = [storage.get_bytes(r.storage_key) for r in images]
    source = None  # the stored learned encoder's prefix (None: CLIP)
    if settings.scorer_encoder_kind() == "learned":
        with get_sessionmaker()() as session:
            encoder, source = domain_learned_encoder(session, domain, storage, settings)
    else:
        encoder = project_encoder(settings)
    progress.update("load", 1, 1)
    x = embed_pngs(
        encoder,
        pngs,
        [r.sha256 for r in images],
        settings,
        on_progress=lambda d, t: progress.update("embed", d, t),
    )
    progress.update("fit", 0, 1)
    y = [int(r.plausible) for r in images]
    fitted, metrics = fit_scorer(
        x,
        y,
        [r.class_name for r in images],
        encoder.identity,
        min_images=settings.scorer_min_images,
    )
    progress.update("store", 0, 1)
    data = fitted.to_bytes()
    for _ in range(3):  # two jobs of one domain racing for the same version: take the next
        key = ""
        try:
            with ctx.owned_session() as session:  # a run that lost its job adds no scorer
                version = 1 + int(
                    session.scalar(select(func.max(Scorer.version)).where(Scorer.domain == domain))
                    or 0
                )
                key = f"scorers/{domain}/v{version:04d}-job{job_id}.safetensors"
                storage.put_bytes(key, data, "application/octet-stream")
                if source is not None:  # the learned encoder, kept with the scorer
                    for name in ENCODER_FILES:
                        storage.put_bytes(
                            f"{encoder_prefix(key)}/{name}",
                            storage.get_bytes(f"{source}/{name}"),
                            "application/octet-stream",
                        )
                row = Scorer(
                    domain=domain,
                    version=version,
                    encoder=encoder.identity,
                    artefact_key=key,
                    n_images=len(images),
                    n_plausible=sum(y),
                    metrics=metrics.model_dump(mode="json"),
                    job_id=job_id,
                )
                session.add(row)
                session.flush()  # the version's unique constraint answers here
                scorer_id = row.id
        except IntegrityError:
            if key:
                storage.delete_prefix(key)
                storage.delete_prefix(encoder_prefix(key))
            continue
        break
    else:
        raise RuntimeError(f"could not store a new scorer version of {domain!r}")
    progress.update("store", 1, 1)
    cv = metrics.cv
    return {
        "scorer_id": scorer_id,
        "domain": domain,
        "version": version,
        "images": len(images),
        "plausible": sum(y),
        "verdicts": sum(r.reviews for r in images),
        "cv_auc": cv.auc,
        "cv_auc_ci": list(cv.auc_ci) if cv.auc_ci else None,
        "folds": metrics.folds,
        "encoder": encoder.identity,
    }
