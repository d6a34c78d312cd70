"""The class-conditional UNet of the seed's Table 2, with prototype or baseline class embeddings.

Layout follows the common DDPM UNet (and diffusers' ``UNet2DModel``, so the two can be compared
like for like): conv in, per level ``num_res_blocks`` residual blocks then a strided-conv
downsample, a two-block middle, per level ``num_res_blocks + 1`` blocks with skip connections
then a nearest-neighbour upsample, norm/SiLU/conv out. Self-attention as the seed's reference
[3] (ProtoDiffusion's ``unet.py``) places it: an :class:`AttnBlock` after every residual block of
each level whose feature-map size is in ``attention_resolutions``, and between the two middle
blocks when the smallest size is listed (the ``paper`` preset lists every size; ``()`` gives
the attention-free model of ``paper-legacy``). The encoder and decoder are lists of
:class:`Level`: per resolution its residual blocks, the attention after each (``nn.Identity``
where the level has none) and the resampling to the next level.

Conditioning: the sinusoidal time embedding is **concatenated** with the class embedding, and an
MLP turns that into one vector that every residual block applies as a FiLM scale/shift.

Class embeddings (``mode``):
- ``prototype``: the table is initialised from the CLIP-space prototype codebook and frozen.
  Rows are ``class * K + j`` for K prototypes per class; the caller picks ``j`` (the image's
  nearest own-class prototype in training, a weighted draw at sampling).
- ``baseline``: the same kind of table (one row per class), randomly initialised and learnable.
- ``prototype`` with ``freeze_table=False``: initialised from the codebook, then learnable (the
  ablation arm [3] calls ``proto_unfrozen``; ``bench/ablation.py``).

Classifier-free guidance: label ``-1`` means "no condition" and selects a learnable null
embedding, so the conditional and unconditional passes can share one batch.

This file is only the model. Where a layer is computed faster than written (SiLU and residual
adds in place while sampling, FiLM folded into GroupNorm's affine, the CPU dropout mask, the
upsampling as one transposed conv, attention through ``F.scaled_dot_product_attention``), it
calls a kernel in ``ml.models.ops`` whose docstring states the plain formula it equals;
``tests/test_fast_paths.py`` holds each to that formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ml.models import ops

NULL_LABEL = -1


# --- Embeddings ----------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --- Building blocks -----------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the conditioning vector applied after the second norm as a FiLM
    scale/shift, plus a skip (1x1 conv when the width changes):

        h = conv1(silu(norm1(x)))
        h = norm2(h) * (1 + scale) + shift        with (scale, shift) = emb_proj(emb)
        out = skip(x) + conv2(dropout(silu(h)))
    """

    def __init__(
        self, cin: int, cout: int, emb_dim: int, *, dropout: float = 0.1, groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(ops.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = ops.film_group_norm(h, self.norm2, scale, shift)
        h = self.conv2(ops.dropout(ops.silu(h), self.dropout.p, self.training))
        return ops.add_residual(h, self.skip(x))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, as [3]'s ``AttnBlock`` (there with one head):

        q, k, v = 1x1 convs of norm(x)
        out = x + proj(softmax(q^T k / sqrt(d)) v)        per head of d = C / heads channels

    q, k and v come from one 1x1 conv of 3C outputs (the same parameters as three separate
    ones); the attention itself is ``ops.self_attention``.
    """

    def __init__(self, ch: int, *, heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.self_attention(self.qkv(self.norm(x)), self.heads)
        return ops.add_residual(self.proj(h), x)


class Downsample(nn.Module):
    """A 3x3 conv with stride 2: half the resolution, same channels."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv: ``conv(interpolate(x, 2, "nearest"))``
    (computed as one transposed conv by ``ops.upsample_conv``; same parameters)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.kernels = ops.KernelCache()  # the derived kernel, reused while sampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.upsample_conv(x, self.conv, self.kernels)


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks ``res``, each followed by its
    ``attn`` (an :class:`AttnBlock`, or ``nn.Identity`` at a size without attention), then
    ``resample`` to the next level's resolution (``None`` for the last level of each: the
    encoder's smallest size and the decoder's full size)."""

    def __init__(
        self, res: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None
    ) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


# --- The model -----------------------------------------------------------------------------------


class UNet(nn.Module):
    """Epsilon-predicting UNet conditioned on time and a class-embedding table row."""

    def __init__(
        self,
        *,
        num_embeddings: int,
        class_dim: int = 768,
        image_size: int = 64,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mults: tuple[int, ...] = (1, 2, 4, 8),
        num_res_blocks: int = 2,
        dropout: float = 0.1,
        norm_groups: int = 32,
        attention_resolutions: tuple[int, ...] = (),
        attention_heads: int = 1,
        prototypes: torch.Tensor | None = None,
        freeze_table: bool = True,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.time_dim = base_channels
        emb_dim = 4 * base_channels

        # Class table: frozen prototypes, or a learnable random table (the baseline); prototypes
        # with freeze_table=False start the table there and train it ([3]'s proto_unfrozen).
        self.class_embed = nn.Embedding(num_embeddings, class_dim)
        if prototypes is not None:
            if tuple(prototypes.shape) != (num_embeddings, class_dim):
                raise ValueError(
                    f"prototype table has shape {tuple(prototypes.shape)}, "
                    f"expected ({num_embeddings}, {class_dim})"
                )
            with torch.no_grad():
                self.class_embed.weight.copy_(prototypes)
            self.class_embed.weight.requires_grad_(not freeze_table)
        else:
            nn.init.normal_(self.class_embed.weight, std=prototypes_scale_hint(class_dim))
        self.null_embed = nn.Parameter(torch.zeros(class_dim))
        self.cond_mlp = nn.Sequential(
            nn.Linear(self.time_dim + class_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )

        chans = [base_channels * m for m in channel_mults]
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=dropout, groups=norm_groups)

        attend = [image_size // 2**level in attention_resolutions for level in range(len(chans))]

        def attn(level: int, ch: int) -> nn.Module:
            if not attend[level]:
                return nn.Identity()
            return AttnBlock(ch, heads=attention_heads, groups=norm_groups)

        # The order modules are built in fixes the initial weights a seed draws: each block's
        # attention (or Identity) just before the block, the resampling after a level's blocks.
        self.down = nn.ModuleList()
        skip_chans = [chans[0]]
        ch = chans[0]
        for level, cout in enumerate(chans):
            res: list[ResBlock] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks):
                attns.append(attn(level, cout))
                res.append(block(ch, cout))
                ch = cout
                skip_chans.append(ch)
            last = level == len(chans) - 1
            if not last:
                skip_chans.append(ch)
            self.down.append(Level(res, attns, None if last else Downsample(ch)))

        self.mid = nn.ModuleList([block(ch, ch), block(ch, ch)])
        self.mid_attn = attn(len(chans) - 1, ch)

        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            res, attns = [], []
            for _ in range(num_res_blocks + 1):
                attns.append(attn(level, cout))
                res.append(block(ch + skip_chans.pop(), cout))
                ch = cout
            self.up.append(Level(res, attns, Upsample(ch) if level > 0 else None))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        assert self.conv_out.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.conv_out.bias)

    @property
    def frozen_table(self) -> bool:
        return not self.class_embed.weight.requires_grad

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """concat(sinusoid(t), class embedding or null) -> MLP; computed once per forward."""
        null = labels < 0
        cls = self.class_embed(labels.clamp(min=0))
        cls = torch.where(null[:, None], self.null_embed.to(cls.dtype).expand_as(cls), cls)
        temb = timestep_embedding(t, self.time_dim).to(cls.dtype)
        return F.silu(self.cond_mlp(torch.cat([temb, cls], dim=-1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (N,C,H,W) noisy images; t: (N,) timesteps; labels: (N,) table rows, -1 = null."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.condition(t, labels)
        h: torch.Tensor = self.conv_in(x)
        skips = [h]
        for level in cast(Iterable[Level], self.down):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid[1](self.mid_attn(self.mid[0](h, emb)), emb)
        for level in cast(Iterable[Level], self.up):
            for res, attn in zip(level.res, level.attn, strict=True):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)
        out: torch.Tensor = self.conv_out(ops.silu(self.norm_out(h)))
        return out


# --- Helpers -------------------------------------------------------------------------------------


def prototypes_scale_hint(class_dim: int) -> float:
    """Baseline init scale: match the norm of L2-normalised CLIP prototypes (about 1)."""
    return 1.0 / math.sqrt(class_dim)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
