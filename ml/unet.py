"""The class-conditional UNet of the seed's Table 2, with prototype or baseline class embeddings.

Layout follows the common DDPM UNet (and diffusers' ``UNet2DModel``, so the two can be compared
like for like): conv in, per level ``num_res_blocks`` residual blocks then a strided-conv
downsample, a two-block middle, per level ``num_res_blocks + 1`` blocks with skip connections
then a nearest-neighbour upsample, norm/SiLU/conv out. No attention (Table 2 has none).

Conditioning: the sinusoidal time embedding is **concatenated** with the class embedding, and an
MLP turns that into one vector that every residual block applies as a FiLM scale/shift.

Class embeddings (``mode``):
- ``prototype``: the table is initialised from the CLIP-space prototype codebook and frozen.
  Rows are ``class * K + j`` for K prototypes per class; the caller picks ``j`` (the image's
  nearest own-class prototype in training, a weighted draw at sampling).
- ``baseline``: the same kind of table (one row per class), randomly initialised and learnable.

Classifier-free guidance: label ``-1`` means "no condition" and selects a learnable null
embedding, so the conditional and unconditional passes can share one batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NULL_LABEL = -1


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


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning vector applied as scale/shift."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()  # sampling: reuse buffers, fewer page faults
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        # FiLM folded into the norm's affine, per sample: norm(h)*w*(1+s) + b*(1+s) + shift is
        # one multiply-add pass over the activations instead of three.
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        norm = self.norm2
        gain = norm.weight[:, None, None] * (1 + scale)
        bias = torch.addcmul(shift, norm.bias[:, None, None], 1 + scale)
        h = torch.addcmul(bias, F.group_norm(h, norm.num_groups, eps=norm.eps), gain)
        h = self.conv2(dropout(F.silu(h, inplace=inplace), self.dropout.p, self.training))
        return h.add_(self.skip(x)) if inplace else h + self.skip(x)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with a cheaper mask on the CPU: 16 random bits per element drawn 64 at a
    time (mt19937's ``bernoulli_`` is 3.4x slower and was 5-9% of a training step); keep
    probability 1 - p to within 2^-16. Other devices use the native fused kernel."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.dim() != 4:
        return F.dropout(x, p, training=True)
    bits = torch.empty_like(x, dtype=torch.int16)  # same layout (NCHW or NHWC) as x
    lanes = bits.permute(0, 2, 3, 1) if x.is_contiguous(memory_format=torch.channels_last) else bits
    if lanes.shape[-1] % 4 or not lanes.is_contiguous():
        return F.dropout(x, p, training=True)
    lanes.view(torch.int64).random_(-(2**63), None)  # full 64-bit draws: 4 uniform int16 each
    drop = bits < -32768 + round(p * 65536)
    # where, not x * mask (a bool mask in a product is first cast to x's dtype, a copy) nor
    # masked_fill (its out-of-place form returns NCHW for an NHWC input)
    return torch.where(drop, 0.0, x).mul_(1.0 / (1.0 - p))


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv: the usual layer and parameters, computed
    as one stride-2 transposed conv whose 4x4 kernel sums the 3x3 taps that land on the same
    input pixel. The same function with 16 instead of 36 multiply-adds per input pixel and
    channel pair (these convs are 17% of the paper UNet's arithmetic), and the 2x larger
    intermediate image is never made. Sampling reuses the kernel until the weights change."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.kernel(x), self.conv.bias, stride=2, padding=1)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The transposed-conv weight, in ``x``'s memory layout (oneDNN then skips a reorder)."""
        w = self.conv.weight
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        if (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():
            # training: rebuilt, differentiable; inference tensors have no version to key on
            return upsample_kernel(w).contiguous(memory_format=fmt)
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else w.dtype
        key = (w.data_ptr(), w._version, dtype, fmt, x.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, upsample_kernel(w).to(dtype).contiguous(memory_format=fmt))
        return self._cache[1]


def upsample_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) conv weight -> (in, out, 4, 4) stride-2 transposed-conv weight equal to
    nearest 2x upsampling followed by the conv (padding 1). Along each axis, output pixel 2i
    sees input i-1 through tap 0 and input i through taps 1 and 2; pixel 2i+1 sees input i
    through taps 0 and 1 and input i+1 through tap 2; a transposed conv reads kernel row
    p + 1 - 2i for output p, hence rows (w2, w1 + w2, w0 + w1, w0)."""

    def taps(t: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = t.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return taps(taps(w, 2), 3).transpose(0, 1)


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
        prototypes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.time_dim = base_channels
        emb_dim = 4 * base_channels

        # Class table: frozen prototypes, or a learnable random table (the baseline).
        self.class_embed = nn.Embedding(num_embeddings, class_dim)
        if prototypes is not None:
            if tuple(prototypes.shape) != (num_embeddings, class_dim):
                raise ValueError(
                    f"prototype table has shape {tuple(prototypes.shape)}, "
                    f"expected ({num_embeddings}, {class_dim})"
                )
            with torch.no_grad():
                self.class_embed.weight.copy_(prototypes)
            self.class_embed.weight.requires_grad_(False)
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
            return ResBlock(cin, cout, emb_dim, dropout, norm_groups)

        self.down = nn.ModuleList()
        skip_chans = [chans[0]]
        ch = chans[0]
        for level, cout in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, cout))
                ch = cout
                skip_chans.append(ch)
            if level < len(chans) - 1:
                self.down.append(Downsample(ch))
                skip_chans.append(ch)

        self.mid = nn.ModuleList([block(ch, ch), block(ch, ch)])

        self.up = nn.ModuleList()
        for level, cout in reversed(list(enumerate(chans))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_chans.pop(), cout))
                ch = cout
            if level > 0:
                self.up.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
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
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


def prototypes_scale_hint(class_dim: int) -> float:
    """Baseline init scale: match the norm of L2-normalised CLIP prototypes (about 1)."""
    return 1.0 / math.sqrt(class_dim)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
