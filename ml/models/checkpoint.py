"""Build the UNet for a run and move it to and from disk.

A checkpoint is one ``torch.save`` dict, as DiT's: ``{model, ema, opt, step, args, ...}`` plus what
sampling needs without the training data (classes, mode, prototype count and weights, encoder
identity). Files are written to a temporary name and renamed, so a crash never leaves a torn file.

Checkpoints travel through shared storage, so they are read with ``torch.load(weights_only=True)``:
tensors and plain data (dicts, lists, str, numbers) only. Unpickling anything else could run code
chosen by whoever wrote the file; such a file is refused. What is saved is kept to those types
(``args`` is the config as JSON, ``cond`` plain lists and dicts).

``format`` names the layout of the UNet's parameter names. :func:`read_checkpoint` hands every
checkpoint on in today's layout (:data:`FORMAT_VERSION`): a file in the flat layout (format 1,
see :func:`remap_legacy_keys`) has its ``model``, ``ema`` and optimiser state renamed as it is
read, so nothing past this module knows that layout.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ml.config import TrainConfig
from ml.errors import Invalid, NotFound
from ml.models.unet import UNet

FORMAT_VERSION = 2  # UNet's per-level names: down.{level}.res.{j}, .attn.{j}, .resample

T = TypeVar("T")


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


# --- Format 1: the flat layout ------------------------------------------------------------------
#
# Format 1 names the encoder and decoder as flat lists in forward order: ``down.{i}`` and
# ``up.{i}`` hold residual blocks and resamplings alike, and an attention block sits in
# ``down_attn.{i}`` / ``up_attn.{i}``, keyed by the index of the residual block it follows. Every
# other name (class table, conditioning MLP, conv_in, mid, mid_attn, norm_out, conv_out) is the
# same in both formats.

_FLAT = re.compile(r"(down|up)(_attn)?\.(\d+)\.(.+)")
# UNet's top-level modules in the order it registers them (its state_dict's and parameters' order)
_TOP = (
    "null_embed",
    "class_embed",
    "cond_mlp",
    "conv_in",
    "down",
    "mid",
    "mid_attn",
    "up",
    "norm_out",
    "conv_out",
)
_KINDS = ("res", "attn", "resample")  # a Level's order


def is_legacy_layout(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is in the flat layout (format 1): its first encoder entry is a
    residual block, ``down.0.conv1``, where today's layout has ``down.0.res.0.conv1``."""
    return "down.0.conv1.weight" in state


def _legacy_names(keys: list[str]) -> dict[str, str]:
    """Format-1 name -> today's name, in the order ``UNet.state_dict()`` lists today's names."""
    known = set(keys)
    place: dict[tuple[str, int], tuple[int, str, int]] = {}
    for part in ("down", "up"):
        found = {int(m[3]) for k in keys if (m := _FLAT.fullmatch(k)) and m[1] == part and not m[2]}
        level = j = 0
        for i in sorted(found):
            if f"{part}.{i}.conv1.weight" in known:
                place[part, i] = (level, "res", j)
                j += 1
            else:  # a resampling ends the level
                place[part, i] = (level, "resample", 0)
                level, j = level + 1, 0

    renamed: list[tuple[tuple[int, int, int, int], str, str]] = []
    for key in keys:
        m = _FLAT.fullmatch(key)
        if m is None:
            top = key.split(".", 1)[0]
            order = (_TOP.index(top) if top in _TOP else len(_TOP), 0, 0, 0)
            renamed.append((order, key, key))
            continue
        part, attn, i, rest = m[1], m[2], int(m[3]), m[4]
        level, kind, j = place.get((part, i), (0, "", 0))
        if attn:
            if kind != "res":
                raise ValueError(f"{key} does not follow a residual block {part}.{i}")
            kind = "attn"
        name = f"{part}.{level}.{kind}." + (rest if kind == "resample" else f"{j}.{rest}")
        renamed.append(((_TOP.index(part), level, _KINDS.index(kind), j), key, name))
    renamed.sort(key=lambda r: r[0])  # stable: a module's own parameters keep their order
    return {old: new for _, old, new in renamed}


def remap_legacy_keys(state: Mapping[str, T]) -> dict[str, T]:
    """A format-1 state dict under today's names, in the order ``UNet.state_dict()`` lists them;
    the values are the same objects. The flat lists split into levels where a resampling (an
    entry without ``conv1``) ends one:

        down.{i}.X       -> down.{level}.res.{j}.X   (residual block j of its level)
        down.{i}.X       -> down.{level}.resample.X  (the level's downsampling)
        down_attn.{i}.X  -> down.{level}.attn.{j}.X  (the attention after down.{i})

    and the same for ``up``/``up_attn``. A state dict already in today's layout comes back as it
    is."""
    if not is_legacy_layout(state):
        return dict(state)
    return {new: state[old] for old, new in _legacy_names(list(state)).items()}


def _remap_optimizer(opt: dict[str, Any], old: list[str], names: dict[str, str]) -> dict[str, Any]:
    """The optimiser state of a model whose parameters ``old`` (in the model's order) were
    renamed and reordered: ``names`` maps each old name to its new one, listed in the new order.
    The state is keyed by a parameter's index among the trainable ones in the model's order;
    only the prototype table is ever frozen, so the count of indices tells whether it is one."""
    count = sum(len(g["params"]) for g in opt["param_groups"])
    if count not in (len(old), len(old) - 1):
        raise ValueError(f"the optimiser state holds {count} parameters, the model {len(old)}")
    frozen = {"class_embed.weight"} if count == len(old) - 1 else set()
    index = {n: i for i, n in enumerate(n for n in names.values() if n not in frozen)}
    moved = {i: index[names[n]] for i, n in enumerate(n for n in old if n not in frozen)}
    return {
        **opt,
        "state": {moved[int(i)]: s for i, s in opt["state"].items()},
        "param_groups": [
            {**g, "params": sorted(moved[int(i)] for i in g["params"])} for g in opt["param_groups"]
        ],
    }


def upgrade_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in today's layout: a format-1 one's weights, EMA weights and optimiser state
    under today's names and order (:func:`remap_legacy_keys`); others as they are."""
    if not is_legacy_layout(ckpt["model"]):
        return ckpt
    out = {**ckpt, "model": remap_legacy_keys(ckpt["model"]), "format": FORMAT_VERSION}
    if ckpt.get("ema") is not None:
        out["ema"] = remap_legacy_keys(ckpt["ema"])
    if ckpt.get("opt") is not None:
        old = list(ckpt["model"])
        out["opt"] = _remap_optimizer(ckpt["opt"], old, _legacy_names(old))
    return out


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
    return upgrade_checkpoint(ckpt)


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
