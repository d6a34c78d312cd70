"""The training job: codebook (always, so both modes share one split), then the UNet, then upload.

Runs on a ``gpu`` worker. One process per GPU: with several GPUs (or ``train_processes`` > 1)
training runs under ``torchrun`` and progress is read from the run's ``metrics.jsonl``. A re-run
after a lost worker resumes from the run folder's ``last.pt`` when it is on this machine.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.archive import ensure_local
from service.config import Settings
from service.db.models import Job, Model
from service.db.session import get_sessionmaker
from service.payloads import TrainPayload
from service.storage import Storage
from workers.lifecycle import JobContext, JobStopped
from workers.progress import StagedProgress

log = logging.getLogger(__name__)
# Rough shares of a training job's time (cpu-small, ViT-L-14 embeddings on a CPU); they only
# shape the progress bar and the ETA of stages not yet started (workers.progress).
STAGES = {"data": 0.02, "embed": 0.2, "prototypes": 0.05, "train": 0.7, "upload": 0.03}


def encoder_spec(settings: Settings) -> tuple[Any, bool]:
    """The configured CLIP encoder; ``untrained`` builds it with random weights (tests only)."""
    from ml.prototypes.encoder import EncoderSpec

    untrained = settings.encoder_weights == "untrained"
    return EncoderSpec(settings.encoder, None if untrained else settings.encoder_weights), untrained


def prototype_encoder_spec(settings: Settings) -> tuple[Any, bool]:
    """The encoder the codebook is learned with: the learned domain encoder
    (``prototype_encoder="learned"``, trained on the dataset's training images with the
    prototypes and saved beside the codebook), else the configured CLIP encoder."""
    if settings.prototype_encoder == "learned":
        from ml.prototypes.encoder import EncoderSpec
        from ml.prototypes.learned_encoder import LEARNED

        return EncoderSpec(LEARNED, None), False
    return encoder_spec(settings)


def read_roots(settings: Settings) -> list[Path]:
    """Where a job's dataset files may resolve: :meth:`Settings.dataset_roots`, the same list
    registration checked. Checked again on every read because a registered folder can change
    (gain a link to /etc) after registration."""
    return settings.dataset_roots()


@dataclass(frozen=True)
class TrainingInputs:
    model_id: int
    config: dict[str, Any]  # the model's TrainConfig as JSON (validated when the API stored it)
    payload: TrainPayload
    root: str  # the dataset's folder, or where its archive unpacks
    archive_key: str | None


def _load(job_id: int) -> TrainingInputs:
    """Everything the job needs from the database, read once (the claim marked the model as
    training: ``service.job_state``)."""
    with get_sessionmaker()() as session:
        job = session.get(Job, job_id)
        if job is None or job.model is None:
            raise ValueError(f"train job {job_id} has no model")
        model: Model = job.model
        return TrainingInputs(
            model_id=model.id,
            config=dict(model.config),
            payload=TrainPayload.model_validate(job.params),
            root=model.dataset.root,
            archive_key=model.dataset.archive_key,
        )


def _codebook(
    info: TrainingInputs, root: Path, run_dir: Path, settings: Settings, progress: StagedProgress
) -> Any:
    from ml.pipeline import learn_prototypes
    from ml.prototypes.cpl import Codebook, CPLConfig
    from ml.prototypes.encoder import EmbeddingCache

    book_dir = run_dir / "codebook"
    if (book_dir / "codebook.json").is_file():  # a re-run: same selection, same codebook
        return Codebook.load(book_dir)
    spec, untrained = prototype_encoder_spec(settings)
    selection = info.payload.selection.for_ml(str(root))
    cpl = CPLConfig(k=info.payload.k, seed=info.payload.selection.seed)
    with EmbeddingCache(settings.work_dir / "embeddings.sqlite") as cache:
        run = learn_prototypes(
            selection,
            book_dir,
            encoder_spec=spec,
            cpl=cpl,
            allow_untrained=untrained,
            cache=cache,
            roots=read_roots(settings),
            on_progress=progress.update,
        )
    return run.codebook


def processes(settings: Settings) -> int:
    if settings.train_processes:
        return settings.train_processes
    import torch

    return max(1, torch.cuda.device_count())


def _train_single(
    cfg: Any, book: Any, run_dir: Path, progress: StagedProgress, roots: list[Path]
) -> Path:
    from ml.diffusion.train import Progress, TrainingCancelled
    from ml.pipeline import train_model

    def on_step(p: Progress) -> None:
        try:
            progress.update("train", p.step, p.total_steps)
        except JobStopped as exc:  # the trainer checkpoints on TrainingCancelled, then re-raises
            raise TrainingCancelled(str(exc)) from exc

    resume = run_dir / "last.pt" if (run_dir / "last.pt").is_file() else None
    try:
        return train_model(
            cfg,
            run_dir,
            codebook=book,
            resume=resume,
            progress=on_step,
            show_progress=False,
            roots=roots,
        )
    except TrainingCancelled as exc:
        if isinstance(exc.__cause__, JobStopped):
            raise exc.__cause__ from None
        raise


def _train_ddp(
    cfg: Any,
    book: Any,
    run_dir: Path,
    ctx: JobContext,
    progress: StagedProgress,
    nproc: int,
    roots: list[Path],
) -> Path:
    """``torchrun`` over the machine's GPUs; progress from metrics.jsonl, cancel terminates."""
    from ml.diffusion.train import steps_for

    sets = [f"{k}={json.dumps(v)}" for k, v in cfg.model_dump(mode="json").items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ml.cli",
        "train",
        "--mode",
        cfg.mode,
        "--codebook",
        str(run_dir / "codebook"),
        "--out",
        str(run_dir),
        "--preset",
        cfg.preset,
    ]
    for s in sets:
        if not s.startswith(("mode=", "preset=")):
            cmd += ["--set", s]
    for r in roots:
        cmd += ["--allow-root", str(r)]
    if (run_dir / "last.pt").is_file():
        cmd += ["--resume", str(run_dir / "last.pt")]
    total = steps_for(cfg, len(book.assignments), nproc)
    proc = subprocess.Popen(cmd)
    metrics = run_dir / "metrics.jsonl"
    try:
        while proc.poll() is None:
            time.sleep(1.0)
            if metrics.is_file() and total:
                lines = metrics.read_text().splitlines()
                step = json.loads(lines[-1])["step"] if lines else 0
                progress.update("train", min(step, total), total)
            else:
                ctx.check()
    except JobStopped:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {proc.returncode}")
    return run_dir / "last.pt"


def _upload(model_id: int, run_dir: Path, storage: Storage) -> dict[str, str]:
    prefix = f"models/{model_id}"
    keys = {"checkpoint": f"{prefix}/checkpoint.pt", "codebook": f"{prefix}/codebook"}
    # last.pt is only replaced whole (save_checkpoint): local storage links it, no second copy
    storage.put_file(keys["checkpoint"], run_dir / "last.pt", link=True)
    for f in sorted((run_dir / "codebook").iterdir()):
        storage.put_file(f"{keys['codebook']}/{f.name}", f)
    for name in ("summary.json", "metrics.jsonl", "config.json"):
        if (run_dir / name).is_file():
            storage.put_file(f"{prefix}/{name}", run_dir / name)
    return keys


def run_training(
    job_id: int, ctx: JobContext, settings: Settings, storage: Storage
) -> dict[str, Any]:
    """Train the job's model; returns the job result. Its finish makes the model ready."""
    from ml.config import TrainConfig
    from ml.diffusion.provenance import file_sha256

    progress = ctx.stages(STAGES)
    progress.update("data", 0, 1)
    info = _load(job_id)
    model_id = info.model_id
    run_dir = settings.work_dir / "models" / str(model_id)
    root = ensure_local(
        info.root,
        info.archive_key,
        storage,
        settings.work_dir,
        max_bytes=settings.max_unpacked_bytes,
        max_files=settings.max_upload_files,
    )
    progress.update("data", 1, 1)
    book = _codebook(info, root, run_dir, settings, progress)
    cfg = TrainConfig.from_stored(info.config)  # a job queued before an upgrade runs as it was
    nproc = processes(settings)
    if nproc > 1:
        _train_ddp(cfg, book, run_dir, ctx, progress, nproc, read_roots(settings))
    else:
        _train_single(cfg, book, run_dir, progress, read_roots(settings))
    progress.update("upload", 0, 1)
    keys = _upload(model_id, run_dir, storage)
    summary = json.loads((run_dir / "summary.json").read_text())
    # What a model card (service.model_cards) needs and only training knows: the encoder the
    # codebook came from, the data selection with its held-out part, and the checkpoint's hash
    # (the one every generated PNG's provenance names).
    metrics = {
        **summary,
        "prototypes": book.report,
        "encoder": book.encoder,
        "selection": book.selection,
        "checkpoint_sha256": file_sha256(run_dir / "last.pt"),
    }
    with ctx.owned_session() as session:  # a run that lost its job writes nothing
        model = session.get(Model, model_id)
        assert model is not None
        model.checkpoint_path, model.codebook_path = keys["checkpoint"], keys["codebook"]
        model.metrics = metrics  # ready when the job's finish matches (service.job_state)
    progress.update("upload", 1, 1)
    return {"model_id": model_id, **keys, "steps": summary["steps"], "loss": summary["final_loss"]}
