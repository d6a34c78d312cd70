"""Build the UNet for a run and move it to and from disk.

A checkpoint is one ``torch.save`` dict, as DiT's: ``{model, ema, opt, step, args, ...}`` plus what
sampling needs without the training data (classes, mode, prototype count and weights, encoder
identity). Files are written to a temporary name and renamed, so a crash never leaves a torn file.

Checkpoints travel through shared storage, so they are read with ``torch.load(weights_only=True)``:
tensors and plain data (dicts, lists, str, numbers) only. Unpickling anything else could run code
chosen by whoever wrote the file; such a file is refused. What is saved is kept to those types
(``args`` is the config as JSON, ``cond`` plain lists and dicts).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml.config import TrainConfig
from ml.errors import Invalid, NotFound
from ml.models.unet import UNet

FORMAT_VERSION = 1


@dataclass
class Conditioning:
    """How class names map to rows of the class-embedding table."""

    classes: list[str]
    mode: str
    k: int = 1
    weights: torch.Tensor | None = None  # (C, K) share of training images per prototype
    encoder: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_embeddings(self) -> int:
        return len(self.classes) * (self.k if self.mode == "prototype" else 1)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise Invalid(f"unknown class {name!r}; this model knows: {', '.join(self.classes)}")
        return self.classes.index(name)

    def sample_rows(self, class_idx: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Table rows for n images of one class.

        With K prototypes per class, each image picks prototype j with probability equal to the
        share of that class's training images nearest to it, so the mixture matches the data.
        """
        if self.mode != "prototype" or self.k == 1:
            base = class_idx * (self.k if self.mode == "prototype" else 1)
            return torch.full((n,), base, dtype=torch.long)
        w = self.weights[class_idx] if self.weights is not None else torch.ones(self.k)
        j = torch.multinomial(w.float() + 1e-12, n, replacement=True, generator=generator)
        return class_idx * self.k + j

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "mode": self.mode,
            "k": self.k,
            "weights": None if self.weights is None else self.weights.tolist(),
            "encoder": self.encoder,
            # plain JSON types only, so the checkpoint stays loadable with weights_only=True
            "extra": json.loads(json.dumps(self.extra, default=str)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Conditioning:
        w = d.get("weights")
        return cls(
            classes=list(d["classes"]),
            mode=d["mode"],
            k=int(d.get("k", 1)),
            weights=None if w is None else torch.tensor(w),
            encoder=d.get("encoder"),
            extra=d.get("extra") or {},
        )


def build_model(
    cfg: TrainConfig, cond: Conditioning, prototypes: torch.Tensor | None = None
) -> UNet:
    """The UNet for a config; ``prototypes`` (C*K, D) initialises the class table, frozen unless
    ``cfg.freeze_prototypes`` is False."""
    if cond.mode == "prototype" and prototypes is None:
        raise Invalid("prototype mode needs a codebook (run `protomed prototypes` first)")
    class_dim = prototypes.shape[1] if prototypes is not None else cfg.class_dim
    return UNet(
        num_embeddings=cond.num_embeddings,
        class_dim=class_dim,
        image_size=cfg.image_size,
        in_channels=cfg.in_channels,
        base_channels=cfg.base_channels,
        channel_mults=tuple(cfg.channel_mults),
        num_res_blocks=cfg.num_res_blocks,
        dropout=cfg.dropout,
        norm_groups=cfg.norm_groups,
        attention_resolutions=tuple(cfg.attention_resolutions),
        attention_heads=cfg.attention_heads,
        prototypes=prototypes if cond.mode == "prototype" else None,
        freeze_table=cfg.freeze_prototypes,
    )


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Atomic write: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save({**payload, "format": FORMAT_VERSION}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU, with a clear error for a missing or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise NotFound(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:GLOBAL|global:?) ([\w.]+)", str(exc))
        if found is None:  # not a pickle at all: a torn or foreign file
            lines = [x for x in str(exc).splitlines() if x.strip() and "torch.load" not in x]
            reason = lines[-1].strip() if lines else type(exc).__name__
            raise Invalid(f"{path} is not a readable protomed checkpoint ({reason})") from None
        raise Invalid(
            f"{path} refused: it holds a pickled object ({found.group(1)}), not only tensors and "
            "plain data. protomed loads checkpoints with weights_only=True, since unpickling such "
            "an object could run code; use a checkpoint written by protomed"
        ) from None
    except Exception as exc:  # zip errors vary by torch version
        raise Invalid(f"{path} is not a readable protomed checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise Invalid(f"{path} is not a protomed checkpoint (missing model/args)")
    return ckpt


@dataclass
class LoadedModel:
    model: UNet
    cfg: TrainConfig
    cond: Conditioning
    step: int
    path: Path


def load_model(
    path: Path | str, *, use_ema: bool = True, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Rebuild the UNet from a checkpoint (EMA weights by default) in eval mode."""
    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_stored(ckpt["args"])
    cond = Conditioning.from_dict(ckpt["cond"])
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    table = state["class_embed.weight"]
    model = build_model(cfg, cond, prototypes=table if cond.mode == "prototype" else None)
    model.load_state_dict(state)
    model.to(device).eval()
    p = Path(path)
    return LoadedModel(model, cfg, cond, int(ckpt["step"]), p / "last.pt" if p.is_dir() else p)
