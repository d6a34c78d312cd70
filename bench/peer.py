"""The peer: diffusers' ``UNet2DModel`` built with our UNet's layout, behind our call signature.

Same layout (DownBlock2D/UpBlock2D; AttnDownBlock2D/AttnUpBlock2D and the middle block's
attention at the sizes where our model has self-attention, one head as ours; scale-shift time
conditioning) and the same class conditioning input (a 768-d class vector through a two-layer
MLP into diffusers' "identity" class embedding), so parameter counts agree within 1% at every
preset. Used by ``speed.py``, ``command.py`` and ``gpu.sh``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ml.config import TrainConfig, make_config
from ml.models.checkpoint import Conditioning, build_model

N_CLASSES = 8


class DiffusersPeer(nn.Module):
    """diffusers' UNet2DModel behind our model's call signature ``(x, t, labels)``: labels pick
    a row of a class-vector table (-1: a learnable null vector), fed as the class embedding."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        chans = tuple(cfg.base_channels * m for m in cfg.channel_mults)
        # diffusers' attention blocks put an attention layer after every resnet of the level
        # and one in the middle block, where ours (as [3]) puts them
        attend = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(len(chans))]
        # head_dim None: one head of all channels, as ours with attention_heads=1 (diffusers
        # takes one head width for all levels: several heads match ours at the first level)
        head_dim = None if cfg.attention_heads == 1 else chans[0] // cfg.attention_heads
        self.unet = UNet2DModel(
            sample_size=cfg.image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=chans,
            layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attend[::-1]),
            add_attention=attend[-1],
            attention_head_dim=head_dim,
            dropout=cfg.dropout,
            norm_num_groups=cfg.norm_groups,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        # UNet2DModel adds an "identity" class embedding to its time embedding: project the
        # class vector to that width with the same two-layer MLP its time embedding uses.
        width = 4 * cfg.base_channels
        self.class_proj = nn.Sequential(
            nn.Linear(cfg.class_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.table = nn.Parameter(torch.randn(N_CLASSES, cfg.class_dim) * 0.02)
        self.null = nn.Parameter(torch.zeros(cfg.class_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cls = torch.where(labels[:, None] < 0, self.null, self.table[labels.clamp(min=0)])
        eps: torch.Tensor = self.unet(x, t, class_labels=self.class_proj(cls)).sample
        return eps


def conditioning() -> Conditioning:
    """Our side's class table: ``N_CLASSES`` learnable rows (the baseline mode), like the peer."""
    return Conditioning([f"c{i}" for i in range(N_CLASSES)], "baseline")


def build(
    which: str, preset: str, precision: str, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, TrainConfig]:
    """Ours or the peer at a preset (plus ``overrides``), with the config each trains and
    samples with."""
    cfg = make_config(preset, {**(overrides or {}), "mode": "baseline", "precision": precision})
    if which == "ours":
        return build_model(cfg, conditioning()), cfg
    return DiffusersPeer(cfg), cfg.model_copy(update={"channels_last": False})  # as shipped
