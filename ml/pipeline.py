"""The core's steps as plain functions (data -> prototypes -> training), shared by CLI and workers.

A codebook remembers the data selection it was learned on, so training (both modes) can rebuild
exactly the same training split at the model's image size.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.config import TrainConfig
from ml.console import progress_bar
from ml.data.images import DatasetSplit, ImageSet, load_selection, load_split, scan
from ml.diffusion.train import ProgressCallback, train
from ml.errors import Invalid
from ml.prototypes.cpl import Codebook, CPLConfig, PrototypeReport, finish_codebook, fit_prototypes
from ml.prototypes.encoder import ClipEncoder, EmbeddingCache, EncoderSpec, embed
from ml.prototypes.learned_encoder import (
    LEARNED,
    DomainEncoderConfig,
    LearnedEncoder,
    train_domain_encoder,
)

log = logging.getLogger(__name__)
StageCallback = Callable[[str, float, float], None]  # (stage, done, total): job progress


def image_keys(data: ImageSet) -> list[str]:
    """Keys that survive resizing (``class/file``), used to remember each image's prototype."""
    return [
        f"{data.classes[int(y)]}/{Path(p).name}"
        for p, y in zip(data.paths, data.labels, strict=True)
    ]


@dataclass
class PrototypeRun:
    codebook: Codebook
    report: PrototypeReport
    split: DatasetSplit
    out_dir: Path


def learn_prototypes(
    data: Path | str | dict[str, Any],
    out_dir: Path | str,
    *,
    encoder_spec: EncoderSpec,
    cpl: CPLConfig,
    allow_untrained: bool = False,
    cache: EmbeddingCache | None = None,
    device: str | None = None,
    progress: bool = False,
    roots: Sequence[Path | str] | None = None,
    on_progress: StageCallback | None = None,
    domain: DomainEncoderConfig | None = None,
) -> PrototypeRun:
    """Load a split, embed it with CLIP (cached), fit prototypes, save the codebook. With
    ``encoder_spec.model_name == "learned"`` the encoder is instead learned from the training
    images jointly with the prototypes (``domain``: its network and budget; see
    :func:`_learn_domain_prototypes`).

    ``data`` is a dataset folder (all images, no held-out) or a selection dict with the keyword
    arguments of :func:`ml.data.images.load_split` plus ``root``; ``roots`` are the folders every
    file
    read must resolve inside (default: the dataset folder). Inputs are checked cheapest first,
    so a missing folder, a link leaving the roots or missing weights fail at once: the folder is
    listed (nothing decoded), the weights located, then the encoder built and images decoded.
    ``on_progress(stage, done, total)`` follows the two long stages, ``embed`` (images) and
    ``prototypes`` (epochs).
    """
    selection: dict[str, Any] = dict(data) if isinstance(data, dict) else {"root": data}
    root = selection.pop("root")
    scan(Path(root), selection.get("layout", "auto"), roots)
    if encoder_spec.model_name == LEARNED:
        if cpl.head is not None:
            raise Invalid(
                f"--head is for fixed CLIP embeddings: the {LEARNED} encoder trains its whole net"
            )
        split = load_split(root, **selection, roots=roots)
        return _learn_domain_prototypes(
            split,
            Path(out_dir),
            cpl,
            domain or DomainEncoderConfig(seed=cpl.seed),
            cache,
            on_progress,
            progress,
        )
    encoder = ClipEncoder(encoder_spec, device=device, allow_untrained=allow_untrained)
    split = load_split(root, **selection, roots=roots)
    n_train, n_all = len(split.train), len(split.train) + len(split.heldout)

    def embedded(offset: int, share: int) -> Callable[[int, int], None] | None:
        """One embed call's progress as images done out of train + held-out."""
        if on_progress is None:
            return None
        return lambda done, total: on_progress(
            "embed", offset + share * done / max(total, 1), n_all
        )

    train_emb = embed(
        encoder, split.train.images, split.train.hashes, cache, on_batch=embedded(0, n_train)
    )
    held_emb = held_y = None
    if len(split.heldout):
        held_emb = embed(
            encoder,
            split.heldout.images,
            split.heldout.hashes,
            cache,
            on_batch=embedded(n_train, n_all - n_train),
        )
        held_y = split.heldout.labels
    codebook, report = fit_prototypes(
        train_emb,
        split.train.labels,
        split.classes,
        cpl,
        heldout_emb=held_emb,
        heldout_labels=held_y,
        encoder_identity=encoder.identity,
        hashes=image_keys(split.train),
        progress=progress,
        on_epoch=None if on_progress is None else lambda d, t: on_progress("prototypes", d, t),
    )
    codebook.selection = dict(split.selection)
    out_dir = Path(out_dir)
    codebook.save(out_dir)
    return PrototypeRun(codebook, report, split, out_dir)


def _learn_domain_prototypes(
    split: DatasetSplit,
    out_dir: Path,
    cpl: CPLConfig,
    cfg: DomainEncoderConfig,
    cache: EmbeddingCache | None,
    on_progress: StageCallback | None,
    progress: bool = False,
) -> PrototypeRun:
    """Train the domain encoder and its prototypes on the training split, save the encoder
    beside the codebook, embed both parts with it (cached under its identity) and report the
    held-out accuracy next to the same network untrained (prototypes fitted on its fixed
    features) and a logistic probe on each."""
    data = {
        "selection": dict(split.selection),
        "train_sha256": hashlib.sha256("\n".join(split.train.hashes).encode()).hexdigest(),
        "train_images": len(split.train),
        "heldout_sha256": hashlib.sha256("\n".join(split.heldout.hashes).encode()).hexdigest(),
    }
    held = split.heldout if len(split.heldout) else None
    bar = progress_bar(
        desc="encoder + prototypes", total=cfg.epochs, unit="epoch", disable=not progress
    )

    def on_epoch(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if on_progress is not None:  # the joint training is the job's prototype stage
            on_progress("prototypes", done, total)

    with bar:
        trained = train_domain_encoder(
            split.train.images,
            split.train.labels,
            split.classes,
            cpl,
            cfg,
            heldout_images=None if held is None else held.images,
            heldout_labels=None if held is None else held.labels,
            data=data,
            on_epoch=on_epoch,
        )
    encoder = trained.encoder
    encoder.save(out_dir)

    def embedded(enc: LearnedEncoder, part: ImageSet | None) -> torch.Tensor | None:
        return None if part is None else embed(enc, part.images, part.hashes, cache)

    codebook, report = finish_codebook(
        trained.prototypes,
        embed(encoder, split.train.images, split.train.hashes, cache),
        split.train.labels,
        split.classes,
        cpl,
        encoder_identity=encoder.identity,
        final_loss=trained.final_loss,
        heldout_emb=embedded(encoder, held),
        heldout_labels=None if held is None else held.labels,
        hashes=image_keys(split.train),
    )
    # The untrained network: no identity of its own (never saved), so it is not cached.
    base = fit_prototypes(
        trained.untrained.encode(split.train.images),
        split.train.labels,
        split.classes,
        cpl,
        heldout_emb=None if held is None else trained.untrained.encode(held.images),
        heldout_labels=None if held is None else held.labels,
        encoder_identity="untrained",
    )[1]
    report.encoder_kind = LEARNED
    report.untrained_nearest_prototype_acc = base.nearest_prototype_acc
    report.untrained_logreg_acc = base.logreg_acc
    report.encoder_training = {k: v for k, v in trained.training.items() if k != "history"}
    codebook.report = report.to_dict()
    codebook.selection = dict(split.selection)
    codebook.save(out_dir)
    return PrototypeRun(codebook, report, split, out_dir)


def training_data(
    cfg: TrainConfig,
    *,
    codebook: Codebook | None = None,
    root: Path | str | None = None,
    roots: Sequence[Path | str] | None = None,
) -> ImageSet:
    """The training images at the model's size: the codebook's selection, else ``root``
    (``roots``: as for :func:`ml.data.images.load_split`)."""
    if codebook is not None and codebook.selection:
        base = dict(codebook.selection)
    elif root is not None:
        base = {"root": str(root)}
    else:
        raise Invalid("give a dataset folder or a codebook that records its data selection")
    base["image_size"] = cfg.image_size
    if "layout" in base:
        return load_selection(base, roots).train
    return load_split(base.pop("root"), **base, roots=roots).train


def train_model(
    cfg: TrainConfig,
    out_dir: Path | str,
    *,
    codebook: Codebook | None = None,
    root: Path | str | None = None,
    resume: Path | str | None = None,
    progress: ProgressCallback | None = None,
    device: str | None = None,
    show_progress: bool = True,
    roots: Sequence[Path | str] | None = None,
) -> Path:
    """Train one mode on the codebook's training split; returns the checkpoint path."""
    if cfg.mode == "prototype" and codebook is None:
        raise Invalid("prototype mode needs --codebook (run `protomed prototypes` first)")
    data = training_data(cfg, codebook=codebook, root=root, roots=roots)
    keyed = ImageSet(
        images=data.images,
        labels=data.labels,
        classes=data.classes,
        paths=data.paths,
        hashes=image_keys(data),
    )
    extra = {"selection": codebook.selection if codebook else {"root": str(root)}}
    result = train(
        cfg,
        keyed,
        out_dir,
        codebook=codebook,
        resume=resume,
        progress=progress,
        device=device,
        show_progress=show_progress,
        extra=extra,
    )
    return result.checkpoint
