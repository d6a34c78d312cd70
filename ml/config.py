"""All knobs of the core in one typed place: presets, overrides, precision choice.

A training run is described by one flat :class:`TrainConfig` (as DiT's ``args``), so any field can
be overridden from the CLI (``--set epochs=3``) or the API, and the whole config travels inside the
checkpoint. Sampling has its own small :class:`SampleConfig`.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ml.errors import Invalid

if TYPE_CHECKING:  # torch is imported where used: the API validates configs without loading it
    import torch

Mode = Literal["prototype", "baseline"]
Precision = Literal["auto", "fp32", "bf16"]
LossWeighting = Literal["none", "min_snr"]
SchedulerName = Literal["ddim", "dpm++", "dpm++sde"]
PresetName = Literal["paper", "paper-legacy", "cpu-small", "tiny"]  # PRESETS' keys (checked below)
LrSchedule = Literal["constant", "cosine"]
# Classifiers of the downstream evaluation (ml.evaluation.downstream): resnext50 is the seed's.
Backbone = Literal["small", "resnet18", "resnext50"]
# Steps when none are given: DDIM-50 is the seed's; SDE-DPM-Solver++ at 20 steps beat it on the
# toy model by CLIP FD and by the rule-based checker (bench/README.md, "Fewer steps").
DEFAULT_STEPS: dict[str, int] = {"ddim": 50, "dpm++": 20, "dpm++sde": 20}
DEFAULT_SCHEDULER: SchedulerName = "dpm++sde"
MAX_SEED = 2**31 - 1  # seeds are stored in PostgreSQL INTEGER columns
# Images per class a data selection may ask for (training and held-out, each): ~100 is the
# method's regime; the bound keeps one request from decoding millions of images into memory.
MAX_PER_CLASS = 10_000
MAX_STEPS = 10_000_000  # max_steps' bound (the demo's --steps names it too)


class TrainConfig(BaseModel):
    """One diffusion training run. Defaults are the ``paper`` preset: the seed's Table 2 where it
    gives a value, else its reference [3], ProtoDiffusion (Baykal et al. 2024, code at
    github.com/ituvisionlab/ProtoDiffusion, ``unet.py``/``train.py``). How each field was decided
    is the comment beside it ("Table 2", "[3]", or why neither); the README's "The paper preset
    against the seed and [3]" table lists what still differs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    preset: str = "paper"
    mode: Mode = "prototype"
    # Every number has an upper bound too: the API takes these as overrides from any admin
    # client, and batch_size=1e9 or base_channels=100000 would exhaust the machine's memory
    # (errors name the allowed range: describe_validation_error).
    # UNet (Table 2)
    image_size: int = Field(64, ge=8, le=512)
    in_channels: int = Field(3, ge=1, le=4)
    base_channels: int = Field(64, ge=8, le=512)
    channel_mults: tuple[Annotated[int, Field(ge=1, le=16)], ...] = Field(
        (1, 2, 4, 8), min_length=1, max_length=6
    )
    num_res_blocks: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    norm_groups: int = Field(32, ge=1, le=128)
    class_dim: int = Field(
        768,
        ge=1,
        le=4096,
        description=(
            "class-embedding width; training with a codebook sets it to the codebook's width "
            "in both modes (768 = ViT-L-14's, for a baseline trained without one)"
        ),
    )
    # False: [3]'s ``proto_unfrozen`` ablation, the table starts at the prototypes and trains with
    # the model. The method (and [3]'s main setting) freezes it; prototype mode only.
    freeze_prototypes: bool = True
    # diffusion
    timesteps: int = Field(1000, ge=10, le=10_000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    p_uncond: float = Field(0.1, ge=0.0, le=1.0, description="condition dropped (CFG training)")
    # Min-SNR-gamma (Hang et al. 2023): each timestep's loss weighted by min(SNR, gamma)/SNR
    # (epsilon prediction), so the easy low-noise steps stop dominating the gradient; "none" is
    # the seed's plain MSE.
    loss_weighting: LossWeighting = "none"
    snr_gamma: float = Field(5.0, gt=0, le=1000.0, description="gamma of min-SNR weighting")
    # optimisation
    lr: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0, le=10.0)  # [3]: AdamW(weight_decay=1e-4)
    batch_size: int = Field(16, ge=1, le=1024, description="per process (per GPU under DDP)")
    epochs: int = Field(1500, ge=1, le=100_000)
    max_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="stop after this many steps if set"
    )
    grad_clip: float | None = Field(None, gt=0, le=1e6)  # [3] clips no gradients
    # [3] keeps no EMA (it trains, saves and samples the raw weights); 0 makes the EMA copy equal
    # the weights, so sampling "EMA weights" samples those. paper-legacy's is 0.9999.
    ema_decay: float = Field(0.0, ge=0, lt=1)
    precision: Precision = "auto"
    flip: bool = Field(  # [3]'s data loaders flip nothing (ToTensor and Normalize only)
        False, description="random horizontal/vertical flips (cells, lesions)"
    )
    # NHWC activations (the layout tensor cores and oneDNN's convolutions prefer); None = NHWC
    # except bf16 training on a CPU, where PyTorch's NHWC GroupNorm costs more than the
    # convolutions gain (ml.diffusion.train.memory_format, bench/README.md).
    channels_last: bool | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(500, ge=1, le=10_000_000, description="steps between checkpoints")
    # --- Self-attention and the learning-rate schedule, as [3]. A stored config without these
    # fields loads with PRE_ATTENTION's values (from_stored).
    # [3]'s AttnBlock (GroupNorm, 1x1 q/k/v/out projections, one head, residual) follows every
    # res block at every level and sits between the two middle res blocks; listed here by
    # feature-map size (the middle block has it when the smallest size is listed). () = none.
    attention_resolutions: tuple[Annotated[int, Field(ge=1, le=512)], ...] = Field(
        (64, 32, 16, 8), max_length=6
    )
    attention_heads: int = Field(1, ge=1, le=64)  # [3]: one head over all channels
    # [3]: linear warm-up over epochs // 20, then cosine annealing (diffusers' schedulers, per
    # optimiser step; README table for how they differ from [3]'s per-epoch GradualWarmup).
    lr_schedule: LrSchedule = "cosine"
    lr_warmup: float = Field(0.05, ge=0.0, lt=1.0, description="warm-up share of all steps")

    def check_image_size(self) -> None:
        """The UNet halves the size len(mults)-1 times, so it must divide evenly."""
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} "
                f"(2^(len(channel_mults)-1) for channel_mults={list(self.channel_mults)})"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"base_channels*mult={self.base_channels * m} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        sizes = [self.image_size // 2**i for i in range(len(self.channel_mults))]
        stray = [r for r in self.attention_resolutions if r not in sizes]
        if stray:
            raise ValueError(
                f"attention_resolutions {stray} are not feature-map sizes of this model "
                f"({sizes}); use [] for no attention"
            )
        for r in self.attention_resolutions:
            ch = self.base_channels * self.channel_mults[sizes.index(r)]
            if ch % self.attention_heads:
                raise ValueError(
                    f"{ch} channels at size {r} do not split into "
                    f"attention_heads={self.attention_heads} heads"
                )

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> TrainConfig:
        """A config read back from a checkpoint or a queued job: fields it lacks because it was
        written before they existed take the values that reproduce that older model and
        schedule (PRE_ATTENTION), not today's defaults."""
        return cls(**{**PRE_ATTENTION, **values})


class SampleConfig(BaseModel):
    """How images are drawn from a trained model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scheduler: SchedulerName = DEFAULT_SCHEDULER
    steps: int | None = Field(None, ge=1, le=1000, description="None: the scheduler's default")
    guidance: float = Field(2.0, ge=0.0, le=50.0, description="CFG scale w; 1 = no guidance")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity (0 = deterministic)")
    batch_size: int = Field(64, ge=1, le=1024)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    use_ema: bool = True
    # auto: bf16 autocast where the hardware runs it natively (CUDA, AMX/AVX512-BF16 CPUs),
    # else fp32. bench/solver_quality.py compares CLIP-space FD of bf16 and fp32 on the same
    # seeds; bench/speed.py the speed.
    precision: Precision = "auto"
    # NHWC activations: oneDNN's convolutions run 1.08-1.29x faster on the CPUs measured, and in
    # bf16 NHWC avoids the reorders NCHW needs (bench/README.md); tensor cores prefer it too.
    channels_last: bool = True

    @model_validator(mode="after")
    def _steps(self) -> SampleConfig:
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.scheduler]
        return self


# [3]'s self-attention and rate schedule, off: no attention, a constant rate. A stored config
# without these fields describes that model and schedule (TrainConfig.from_stored).
PRE_ATTENTION: dict[str, Any] = {
    "attention_resolutions": (),
    "attention_heads": 1,
    "lr_schedule": "constant",
    "lr_warmup": 0.0,
}
# The recipe without [3]'s training choices (on top of PRE_ATTENTION): no weight decay, gradient
# clipping at norm 1, random flips, EMA 0.9999.
LEGACY_RECIPE: dict[str, Any] = {
    **PRE_ATTENTION,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "flip": True,
    "ema_decay": 0.9999,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The seed's Table 2, and its reference [3] where the seed is silent (TrainConfig's fields).
    "paper": {},
    # `paper` without [3]'s additions: Table 2 without attention, a constant rate, no weight
    # decay, clipping, flips and EMA 0.9999 (what a paper config stored without those fields ran).
    "paper-legacy": {**LEGACY_RECIPE},
    # Trains visibly on 2 CPU cores in minutes (2.5M parameters at 32x32).
    "cpu-small": {
        **LEGACY_RECIPE,
        "image_size": 32,
        "base_channels": 32,
        "channel_mults": (1, 2, 4),
        "num_res_blocks": 1,
        "norm_groups": 8,
        "epochs": 200,
        "lr": 1e-3,  # a small model on a CPU budget: converges visibly faster than 1e-4
        "ema_decay": 0.999,
        "checkpoint_every": 200,
    },
    # For unit tests only: a few thousand parameters.
    "tiny": {
        **LEGACY_RECIPE,
        "image_size": 16,
        "base_channels": 8,
        "channel_mults": (1, 2),
        "num_res_blocks": 1,
        "norm_groups": 4,
        "class_dim": 16,
        "epochs": 1,
        "lr": 1e-3,
        "ema_decay": 0.9,
        "precision": "fp32",
    },
}


assert set(PRESETS) == set(get_args(PresetName)), "PresetName must name exactly the presets"


def make_config(preset: str = "paper", overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset with overrides applied and validated; errors name the field and what is allowed."""
    if preset not in PRESETS:
        raise Invalid(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **(overrides or {}), "preset": preset}
    cfg = TrainConfig(**values)
    cfg.check_image_size()
    return cfg


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["epochs=3", "channel_mults=[1,2]"]`` -> dict; values are JSON where they parse as JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise Invalid(f"override {pair!r} must look like field=value")
        key = key.strip()
        if key not in TrainConfig.model_fields:
            raise Invalid(f"unknown field {key!r}; {field_hint(TrainConfig, key)}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


_BOUND_ERRORS = ("greater_than", "less_than", "too_short", "too_long")
# What other trainers (and this project's own CLI flags) call a TrainConfig field.
FIELD_ALIASES = {
    "steps": "max_steps",
    "train_steps": "max_steps",
    "num_steps": "max_steps",
    "iterations": "max_steps",
    "learning_rate": "lr",
}


def field_hint(model: type[BaseModel], name: str) -> str:
    """``"did you mean max_steps?"`` for a near miss, else every field: a refused name alone
    leaves the user guessing what the model calls the knob they meant. Names other tools use
    for a field (:data:`FIELD_ALIASES`) come first: ``steps`` is spelled closer to
    ``timesteps`` (the noise schedule's length) than to ``max_steps``, the knob meant."""
    import difflib

    fields = sorted(model.model_fields)
    alias = FIELD_ALIASES.get(name)
    near = [alias] if alias in fields else difflib.get_close_matches(name, fields, n=2, cutoff=0.6)
    if near:
        return f"did you mean {' or '.join(near)}?"
    return f"fields are: {', '.join(fields)}"


def allowed_range(model: type[BaseModel], name: str) -> str | None:
    """``"1 <= batch_size <= 1024"`` from a field's bounds (items: ``"...; each 1 <= x <= 16"``
    for tuples), or None for a field without numeric bounds."""
    field = model.model_fields.get(name)
    if field is None:
        return None

    def bounds(metadata: list[Any], what: str) -> str | None:
        lo = next((f"{m.ge} <= " for m in metadata if isinstance(m, Ge)), None)
        lo = lo or next((f"{m.gt} < " for m in metadata if isinstance(m, Gt)), "")
        hi = next((f" <= {m.le}" for m in metadata if isinstance(m, Le)), None)
        hi = hi or next((f" < {m.lt}" for m in metadata if isinstance(m, Lt)), "")
        return f"{lo}{what}{hi}" if lo or hi else None

    parts = []
    numeric = bounds(field.metadata, name)
    if numeric:
        parts.append(numeric)
    lengths = [m for m in field.metadata if isinstance(m, MinLen | MaxLen)]
    if lengths:
        lo = next((m.min_length for m in lengths if isinstance(m, MinLen)), 0)
        hi = next((m.max_length for m in lengths if isinstance(m, MaxLen)), "any")
        parts.append(f"{lo} to {hi} items")
    args = getattr(field.annotation, "__args__", ())
    if args and getattr(args[0], "__metadata__", None):
        meta = [x for m in args[0].__metadata__ for x in getattr(m, "metadata", [m])]
        item = bounds(meta, "each item")
        if item:
            parts.append(item)
    return "; ".join(parts) or None


def describe_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per wrong field, for CLI and API messages; a value out of bounds also gets the
    field's whole allowed range (from ``model``'s fields, default: the model that failed, when
    it is :class:`TrainConfig` or :class:`SampleConfig`)."""
    model = model or {"SampleConfig": SampleConfig}.get(err.title) or TrainConfig
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "value"
        line = f"{loc}: {e['msg']}"
        if e["type"].startswith(_BOUND_ERRORS) and e["loc"]:
            allowed = allowed_range(model, str(e["loc"][0]))
            if allowed:
                line += f" (allowed: {allowed})"
        elif e["type"] == "extra_forbidden" and len(e["loc"]) == 1 and err.title == model.__name__:
            line += f" ({field_hint(model, str(e['loc'][0]))})"
        lines.append(line)
    return "; ".join(lines)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present (honouring LOCAL_RANK under torchrun), else CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 only (CUDA with bf16, or AVX512-BF16/AMX CPUs with oneDNN): emulated bf16
    is slower than fp32 (ViT-L-14 ran 5.5x slower on an AVX2-only EPYC)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16" or bf16_supported(device):
        return torch.bfloat16
    return None
