"""A domain encoder learned from the labelled images: a small CNN trained jointly with the class
prototypes (convolutional prototype learning, Yang et al., CVPR 2018: DCE + lambda * PL).

Why: without CLIP weights (CI, an air-gapped box) the only open_clip encoder is an untrained one,
whose random features make prototypes that barely separate the classes. The seed's reference
(ProtoDiffusion) learns its prototypes with a classifier trained from scratch on the target data;
this does the same, sized for the data it meets here: 24-64 px images, ~100 per class, 2 CPU
cores. A ResNet-18 is built for 224 px ImageNet (its stem divides 64 px down to 2x2 by the last
stage) and costs ~8x the compute of :class:`ConvNet4`, which trains on 800 cells64 images in
well under a minute on one core at 32 px and still separates the classes (README, "The learned
encoder").

Training uses the training split only, with the augmentations that leave the label unchanged in
these domains (cells and lesions have no up or left: flips and right-angle rotations; small shifts;
a small brightness/contrast/colour jitter for stain and lighting), for a fixed budget (40
epochs, cosine learning rate: chosen on cells64's held-out part, README) whose last epoch is
kept, so the held-out accuracy in the report is not the one that picked it. ``patience`` turns on
early stopping on the held-out part instead (the report then says its accuracy picked the epoch).

The result is an artifact beside the codebook (``encoder.safetensors`` + ``encoder.json``: the
architecture, the training data's hashes, seed and budget) loaded through the same interface as
:class:`ml.prototypes.encoder.ClipEncoder` (``identity``, ``dim``, ``image_size``, ``encode``),
with the
identity ``learned:<sha256 of the safetensors file>``, which keys its cached embeddings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from torch import nn

from ml.errors import Invalid
from ml.prototypes.cpl import (
    CPLConfig,
    artifact_files,
    check_labels,
    dce_loss,
    init_prototypes,
    pl_loss,
    read_artifact,
    sq_dists,
    write_artifact,
)
from ml.prototypes.encoder import encode_in_batches

LEARNED = "learned"  # the encoder name that selects this encoder (CLI --encoder, settings)
IDENTITY_PREFIX = "learned:"
FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "encoder.json", "encoder.safetensors"


class DomainEncoderConfig(BaseModel):
    """The network and its training budget (recorded in the artifact)."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["convnet4"] = "convnet4"
    width: int = Field(32, ge=4, description="channels of the first block (doubling to 4x)")
    dim: int = Field(64, ge=2, description="embedding size")
    input_size: int = Field(32, ge=8, description="images are resized to this before the net")
    epochs: int = Field(40, ge=1, description="most epochs")
    patience: int | None = Field(
        None,
        ge=1,
        description="early stopping: keep the epoch best on the held-out part, stop after this "
        "many epochs without a gain (None: train the whole budget and keep the last epoch)",
    )
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(64, ge=2)
    augment: bool = True
    jitter: float = Field(0.1, ge=0, lt=1, description="brightness/contrast/colour jitter")
    seed: int = 0


class ConvNet4(nn.Module):
    """Four conv3x3-BN-ReLU blocks (max-pooling between), global average pool, a linear map to
    ``dim`` and L2 normalisation (the embeddings live on the unit sphere, like CLIP's)."""

    def __init__(self, width: int = 32, dim: int = 64) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.body(x).mean((2, 3))), dim=-1)


def _build(cfg: DomainEncoderConfig) -> ConvNet4:
    """The network at its seeded initialisation, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ConvNet4(cfg.width, cfg.dim)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float (N,3,size,size) in [0, 1] (antialiased bilinear)."""
    x = images.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.clamp(0.0, 1.0)


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Label-preserving views of cell and lesion images (float (N,3,S,S) in [0,1]): a random
    flip and right-angle rotation (the 8 symmetries of the square), a shift of up to S/8 pixels
    (reflected border), and brightness, contrast and per-channel gain each within +-jitter."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    rot = torch.randint(4, (n,), generator=gen)
    x = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, rot, strict=True)])
    pad = max(1, s // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offs = torch.randint(2 * pad + 1, (n, 2), generator=gen)
    x = torch.stack([padded[i, :, a : a + s, b : b + s] for i, (a, b) in enumerate(offs.tolist())])
    if jitter > 0:

        def factor(*shape: int) -> torch.Tensor:
            return 1.0 + (torch.rand(n, *shape, generator=gen) * 2 - 1) * jitter

        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * factor(1, 1, 1) + mean  # contrast
        x = x * factor(1, 1, 1) * factor(3, 1, 1)  # brightness, colour balance
    return x.clamp(0.0, 1.0)


@dataclass
class TrainedEncoder:
    """What :func:`train_domain_encoder` returns: the encoder, the prototypes trained with it
    (C, K, D), the initial (untrained) encoder for the report's comparison, and its history."""

    encoder: LearnedEncoder
    prototypes: torch.Tensor
    untrained: LearnedEncoder
    final_loss: float
    training: dict[str, Any]


class LearnedEncoder:
    """A trained :class:`ConvNet4` behind :class:`ml.prototypes.encoder.ClipEncoder`'s interface:
    uint8
    (N,3,S,S) images in, L2-normalised float32 (N, dim) embeddings out, on the CPU."""

    def __init__(
        self,
        net: ConvNet4,
        mean: torch.Tensor,
        std: torch.Tensor,
        meta: dict[str, Any],
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg = DomainEncoderConfig(**meta["config"])
        self.meta = meta
        self.device = torch.device(device or "cpu")
        self.net = net.eval().requires_grad_(False).to(self.device)
        self._mean = mean.reshape(1, 3, 1, 1).float().to(self.device)
        self._std = std.reshape(1, 3, 1, 1).float().to(self.device)
        self._identity: str | None = meta.get("identity")

    @property
    def identity(self) -> str:
        """``learned:<sha256 of encoder.safetensors>``; known once saved (or loaded)."""
        if self._identity is None:
            raise ValueError("a learned encoder has an identity only once saved (save())")
        return self._identity

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def image_size(self) -> int:
        return self.cfg.input_size

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.device) - self._mean) / self._std

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) -> the net's normalised float input at ``image_size``."""
        return self.normalise(_resize(images, self.image_size))

    def encode(
        self,
        images: torch.Tensor,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """uint8 (N,3,S,S) -> L2-normalised float32 (N, dim) on the CPU (as ClipEncoder)."""
        return encode_in_batches(
            images, lambda x: self.net(self.preprocess(x)), self.dim, batch_size, on_batch
        )

    def save(self, directory: str | Path) -> str:
        """Write encoder.safetensors + encoder.json (temp files, then os.replace); returns and
        takes the identity ``learned:<sha256 of the safetensors file>``."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {"input.mean": self._mean.flatten(), "input.std": self._std.flatten()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

        def meta(sha: str) -> dict[str, Any]:
            return {
                **self.meta,
                "format_version": FORMAT_VERSION,
                "identity": IDENTITY_PREFIX + sha,
            }

        sha = write_artifact(Path(directory), JSON_NAME, TENSORS_NAME, tensors, meta)
        self.meta = {**meta(sha), "tensors_sha256": sha}
        self._identity = self.meta["identity"]
        return self.identity

    @classmethod
    def load(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> LearnedEncoder:
        """The encoder saved in ``directory`` (a codebook folder); checks the file's checksum
        against its JSON, so the identity names exactly these weights."""
        directory = Path(directory)
        if directory.name in (JSON_NAME, TENSORS_NAME):
            directory = directory.parent
        missing = f"written by `protomed prototypes --encoder {LEARNED}` beside its codebook"
        jpath, tpath = artifact_files(
            directory, JSON_NAME, TENSORS_NAME, "learned encoder", missing
        )
        try:
            meta, t = read_artifact(jpath, tpath, FORMAT_VERSION)
            if meta["identity"] != IDENTITY_PREFIX + meta["tensors_sha256"]:
                raise ValueError(f"{JSON_NAME}'s identity is not its checksum's")
            net = ConvNet4(**{k: meta["config"][k] for k in ("width", "dim")})
            net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
            return cls(net, t["input.mean"], t["input.std"], meta, device)
        except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise Invalid(f"corrupt learned encoder at {directory}: {e}") from e


def is_learned(identity: str) -> bool:
    return identity.startswith(IDENTITY_PREFIX)


def load_codebook_encoder(
    codebook_dir: str | Path, identity: str, device: str | torch.device | None = None
) -> LearnedEncoder:
    """The learned encoder saved beside a codebook, checked to be the one its embeddings came
    from (``identity``, the codebook's ``encoder``)."""
    enc = LearnedEncoder.load(codebook_dir, device)
    if enc.identity != identity:
        raise Invalid(
            f"the encoder beside the codebook at {codebook_dir} is {enc.identity}, but the "
            f"codebook was learned with {identity}"
        )
    return enc


def refuse_same_space(metric_encoder: str, prototype_encoder: str | None, what: str) -> None:
    """ValueError when ``what`` would measure images in the learned space the prototypes were
    fitted in: that space was trained to pull each class onto its prototype, so distances in it
    favour prototype mode by construction. Use CLIP, or a learned encoder trained on a disjoint
    split (a different identity)."""
    if is_learned(metric_encoder) and metric_encoder == prototype_encoder:
        raise Invalid(
            f"{what} would use the learned encoder the prototypes were fitted with "
            f"({metric_encoder[:20]}...): it favours prototype mode by construction; use a "
            "CLIP encoder or a learned encoder trained on a disjoint split"
        )


def _heldout_accuracy(
    net: ConvNet4, x: torch.Tensor, y: torch.Tensor, protos: torch.Tensor, batch: int
) -> float:
    net.eval()
    with torch.no_grad():
        f = torch.cat([net(x[i : i + batch]) for i in range(0, len(x), batch)])
        pred = sq_dists(f, protos).flatten(1).argmin(1) // protos.shape[1]
    return (pred == y).float().mean().item()


def untrained_encoder(
    train_images: torch.Tensor,
    classes: list[str],
    cpl: CPLConfig,
    cfg: DomainEncoderConfig,
    data: dict[str, Any] | None = None,
) -> LearnedEncoder:
    """The network at its seeded initialisation, its input normalised by the training images'
    channel statistics: where :func:`train_domain_encoder` starts, and what the prototype report
    and the ablation (``bench/ablation.py``) compare the learned encoder with. Saved, it is a
    complete encoder artifact (``trained: false`` in its JSON)."""
    x01 = _resize(train_images, cfg.input_size)
    mean, std = x01.mean((0, 2, 3)), x01.std((0, 2, 3)).clamp_min(1e-3)
    meta: dict[str, Any] = {
        "arch": cfg.arch,
        "config": cfg.model_dump(),
        "prototype_loss": {"k": cpl.k, "gamma": cpl.gamma, "lam": cpl.lam},
        "classes": list(classes),
        "data": data or {},
        "trained": False,
    }
    return LearnedEncoder(_build(cfg), mean, std, meta)


def train_domain_encoder(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    classes: list[str],
    cpl: CPLConfig,
    cfg: DomainEncoderConfig,
    *,
    heldout_images: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    data: dict[str, Any] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainedEncoder:
    """Train :class:`ConvNet4` and cpl.k prototypes per class jointly (Adam on DCE + cpl.lam *
    PL, cpl.gamma) on the training images only, seeded (one seed, one thread: one result).
    Prototypes start at the class means (k-means for K > 1) of the initial network's features.
    The last epoch is kept; with ``cfg.patience`` and held-out images, the epoch with the best
    held-out nearest-prototype accuracy is (ties: the earlier), stopping after ``patience``
    epochs without a gain. The held-out accuracy of each epoch is in the history either way.
    ``data`` (e.g. the images' hashes and the selection) is recorded in the artifact."""
    y = torch.as_tensor(train_labels, dtype=torch.long)
    n, n_cls = len(train_images), len(classes)
    check_labels(y, n, classes, cpl.k)
    gen = torch.Generator().manual_seed(cfg.seed)
    x01 = _resize(train_images, cfg.input_size)
    untrained = untrained_encoder(train_images, classes, cpl, cfg, data)
    meta = {**untrained.meta, "trained": False}
    mean, std = untrained._mean.flatten(), untrained._std.flatten()

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    net = _build(cfg)
    with torch.no_grad():
        net.eval()
        feats = torch.cat([net(norm(x01[i : i + 256])) for i in range(0, n, 256)])
    protos = nn.Parameter(init_prototypes(feats, y, n_cls, cpl.k, gen).clone())
    opt = torch.optim.AdamW(
        [
            {"params": net.parameters(), "weight_decay": cfg.weight_decay},
            {"params": [protos], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    hx = hy = None
    if heldout_images is not None and heldout_labels is not None and len(heldout_images):
        hx = norm(_resize(heldout_images, cfg.input_size))
        hy = torch.as_tensor(heldout_labels, dtype=torch.long)
    best: tuple[float, int, dict[str, torch.Tensor], torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    drop_last = n > cfg.batch_size  # BatchNorm cannot train on a batch of one
    if on_epoch is not None:
        on_epoch(0, cfg.epochs)
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            if drop_last and len(idx) < cfg.batch_size:
                continue
            xb = augment(x01[idx], gen, cfg.jitter) if cfg.augment else x01[idx]
            f = net(norm(xb))
            loss = dce_loss(f, y[idx], protos, cpl.gamma) + cpl.lam * pl_loss(f, y[idx], protos)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        sched.step()
        row = {"epoch": epoch, "loss": total / max(seen, 1)}
        if hx is not None and hy is not None:
            row["heldout_acc"] = _heldout_accuracy(net, hx, hy, protos.detach(), 256)
            if cfg.patience is not None and (best is None or row["heldout_acc"] > best[0]):
                best = (
                    row["heldout_acc"],
                    epoch,
                    copy.deepcopy(net.state_dict()),
                    protos.detach().clone(),
                )
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, cfg.epochs)
        if best is not None and cfg.patience is not None and epoch - best[1] >= cfg.patience:
            break
    final = protos.detach().clone()
    kept = epoch
    if best is not None:
        kept, final = best[1], best[3]
        net.load_state_dict(best[2])
    net.eval()
    with torch.no_grad():
        f = torch.cat([net(norm(x01[i : i + 256])) for i in range(0, n, 256)])
        final_loss = (dce_loss(f, y, final, cpl.gamma) + cpl.lam * pl_loss(f, y, final)).item()
    training = {
        "epochs_run": epoch,
        "kept_epoch": kept,
        "selected_on": "heldout (early stopping)" if best is not None else "budget (last epoch)",
        "history": history,
    }
    meta["training"] = {k: v for k, v in training.items() if k != "history"}
    meta["trained"] = True
    encoder = LearnedEncoder(net, mean, std, meta)
    return TrainedEncoder(encoder, final, untrained, final_loss, training)
