"""The evaluation job: both models' checkpoints and the codebook on this machine, the real split
they were trained on, an external test set if the request named one (another registered
dataset, made local as a training set is), synthetic sets (generated, or given batches), then
``ml.evaluation.evaluate``. The typed result (``ml.schemas.evaluation.EvaluationResult``, dumped as
JSON) is the job's
result; each model keeps a summary in its metrics."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.orm import Session

from service.archive import ensure_local
from service.config import Settings
from service.db.models import Batch, Dataset, Job, Model
from service.db.session import get_sessionmaker
from service.payloads import EvaluatePayload
from service.storage import Storage
from workers.lifecycle import JobContext
from workers.sampling import local_checkpoint
from workers.training import encoder_spec, read_roots

if TYPE_CHECKING:
    from ml.data.images import ImageSet  # imports torch: only for the annotation


def _stored_batches(session: Any, ids: list[int]) -> list[tuple[str, list[str]]]:
    """(class, storage keys in index order) of each given batch."""
    out = []
    for batch in (session.get(Batch, i) for i in ids):
        if batch is not None:
            keys = [img.storage_key for img in sorted(batch.images, key=lambda i: i.index)]
            out.append((batch.class_name, keys))
    return out


@dataclass(frozen=True)
class StoredModel:
    id: int
    checkpoint_key: str
    codebook_key: str | None


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's images are: its folder, or the archive an upload was kept as."""

    id: int
    name: str
    root: str
    archive_key: str | None

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetFiles:
        return cls(dataset.id, dataset.name, dataset.root, dataset.archive_key)


@dataclass(frozen=True)
class EvaluationInputs:
    """Everything the job reads from the database, read once before the long work."""

    payload: EvaluatePayload
    models: dict[str, StoredModel]  # mode -> its checkpoint and codebook
    dataset: DatasetFiles  # the models' own
    test: DatasetFiles | None  # the external test set, if the request named one
    batches: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


def _load(job_id: int) -> EvaluationInputs:
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} was deleted while it ran")
        p = EvaluatePayload.model_validate(job.params)
        rows = {
            "baseline": _model(session, p.models.baseline),
            "prototype": _model(session, p.models.prototype),
        }
        test = None
        if p.test_dataset_id is not None:
            test_row = session.get(Dataset, p.test_dataset_id)
            if test_row is None:
                raise RuntimeError(
                    f"test dataset {p.test_dataset_id} was deleted before the evaluation ran"
                )
            test = DatasetFiles.of(test_row)
        return EvaluationInputs(
            payload=p,
            models={m: StoredModel(r.id, _checkpoint(r), r.codebook_path) for m, r in rows.items()},
            dataset=DatasetFiles.of(rows["prototype"].dataset),
            test=test,
            batches={m: _stored_batches(session, ids) for m, ids in p.batches},
        )


def _checkpoint(model: Model) -> str:
    if not model.checkpoint_path:
        raise RuntimeError(f"model {model.id} has no checkpoint")
    return model.checkpoint_path


def _model(session: Session, model_id: int) -> Model:
    """The model row an evaluation names; a clear error if it was deleted since the request."""
    model = session.get(Model, model_id)
    if model is None:
        raise RuntimeError(f"model {model_id} was deleted before its evaluation ran")
    return model


def _codebook(prefix: str, model_id: int, storage: Storage, work_dir: Path) -> Any:
    from ml.prototypes.cpl import Codebook

    folder = work_dir / "models" / str(model_id) / "codebook"
    for key in storage.list_keys(prefix.rstrip("/") + "/"):
        dest = folder / key.rsplit("/", 1)[1]
        if not dest.is_file():
            storage.download(key, dest)
    return Codebook.load(folder)


def _batch_images(
    batches: list[tuple[str, list[str]]], classes: list[str], storage: Storage
) -> ImageSet:
    """An ImageSet from stored PNGs of given batches (labels from each batch's class)."""
    import torch
    from PIL import Image

    from ml.data.images import ImageSet

    images, labels = [], []
    for class_name, keys in batches:
        for key in keys:
            arr = np.asarray(Image.open(io.BytesIO(storage.get_bytes(key))).convert("RGB"))
            images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            labels.append(classes.index(class_name))
    missing = sorted(set(classes) - {classes[i] for i in labels})
    if missing:
        raise ValueError(f"the given batches have no images of {', '.join(missing)}")
    return ImageSet(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        classes=classes,
        paths=[""] * len(labels),
        hashes=[],
    )


def run_evaluation(
    job_id: int, ctx: JobContext, settings: Settings, storage: Storage
) -> dict[str, Any]:
    from ml.config import resolve_device
    from ml.evaluation.evaluate import evaluate
    from ml.models.checkpoint import load_model
    from ml.prototypes.encoder import ClipEncoder, EmbeddingCache

    progress = ctx.stages({"load": 0.05, "evaluate": 0.95})  # rough shares of the job's time
    progress.update("load", 0, 1)
    info = _load(job_id)
    device = resolve_device()
    models, book = {}, None
    for mode, stored in info.models.items():
        path = local_checkpoint(stored.checkpoint_key, stored.id, storage, settings.work_dir)
        models[mode] = load_model(path, device=device)
        if mode == "prototype" and stored.codebook_key:
            book = _codebook(stored.codebook_key, stored.id, storage, settings.work_dir)

    def local(files: DatasetFiles) -> Path:
        return ensure_local(
            files.root,
            files.archive_key,
            storage,
            settings.work_dir,
            max_bytes=settings.max_unpacked_bytes,
            max_files=settings.max_upload_files,
        )

    root = local(info.dataset)
    test_root = local(info.test) if info.test is not None else None
    classes = list(models["prototype"].cond.classes)
    given = {m: _batch_images(b, classes, storage) for m, b in info.batches.items() if b}
    spec, untrained = encoder_spec(settings)
    encoder = ClipEncoder(spec, device=str(device), allow_untrained=untrained)
    with EmbeddingCache(settings.work_dir / "embeddings.sqlite") as cache:
        result = evaluate(
            models,
            encoder,
            info.payload.config,
            codebook=book,
            cache=cache,
            synthetic=given,
            root=str(root),
            roots=read_roots(settings),
            test_data=test_root,
            test_name=info.test.name if info.test else info.dataset.name,
            progress=lambda _stage, f: progress.update("evaluate", f, 1),
        )
    if result.test_set is not None:  # the registered dataset it was, not only its folder
        dataset_id = info.test.id if info.test else info.dataset.id
        result.test_set = result.test_set.model_copy(update={"dataset_id": dataset_id})
    with ctx.owned_session() as session:  # a run that lost its job adds no metrics
        for mode, stored in info.models.items():
            model = _model(session, stored.id)
            entry = {
                "job_id": job_id,
                "as": mode,
                "f1": result.downstream.sets[mode].mean.f1,
                "fd": result.distribution[mode].overall.fd,
            }
            metrics = dict(model.metrics or {})
            metrics["evaluations"] = [*metrics.get("evaluations", []), entry]
            model.metrics = metrics
    return result.model_dump(mode="json")
