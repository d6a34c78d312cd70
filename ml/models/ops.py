"""Fast kernels for the UNet (ml.models.unet), each the same function as a plain formula.

``ml/models/unet.py`` states the model; this module computes some of its layers faster. Every
function
here names, in its docstring, the plain formula it equals (its spec) and why it is faster, and
``tests/test_fast_paths.py`` holds it to that formula: outputs and gradients, NCHW and
channels-last (NHWC) inputs, with and without autograd. The timings quoted are in
``bench/README.md`` ("What moved the numbers").

Two kinds of saving appear:
- less arithmetic or fewer passes over the activations for the same result (``film_group_norm``,
  ``upsample_conv``, the CPU ``dropout`` mask);
- when autograd is off (sampling, evaluation) nothing keeps intermediate tensors for a backward
  pass, so temporaries are overwritten in place (``silu``, ``add_residual``): fewer allocations,
  and on a CPU fewer page faults through freshly mapped memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _no_autograd() -> bool:
    """True while sampling or evaluating: no tensor is saved for a backward pass."""
    return not torch.is_grad_enabled()


def silu(x: torch.Tensor) -> torch.Tensor:
    """Spec: ``F.silu(x)`` = x * sigmoid(x).

    Without autograd, ``x`` is overwritten with the result (so pass only a temporary the caller
    does not read again): the buffer is reused instead of a new one allocated.
    """
    return F.silu(x, inplace=_no_autograd())


def add_residual(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Spec: ``h + skip``.

    Without autograd the sum is written into ``h`` (a temporary: a block's last conv output),
    saving one activation-sized allocation per block.
    """
    return h.add_(skip) if _no_autograd() else h + skip


def film_group_norm(
    x: torch.Tensor, norm: nn.GroupNorm, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """Spec: ``norm(x) * (1 + scale) + shift``: an affine GroupNorm followed by FiLM, with
    per-sample ``scale`` and ``shift`` of shape (N, C, 1, 1).

    Faster: norm(x) = g(x) * w + b with g the plain group normalisation, so the whole is
    g(x) * [w (1 + scale)] + [b (1 + scale) + shift]. Both brackets are (N, C, 1, 1) and cheap;
    the activations then see one multiply-add pass instead of three (the norm's affine, the
    scale, the shift).
    """
    gain = norm.weight[:, None, None] * (1 + scale)
    bias = torch.addcmul(shift, norm.bias[:, None, None], 1 + scale)
    return torch.addcmul(bias, F.group_norm(x, norm.num_groups, eps=norm.eps), gain)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Spec: ``F.dropout(x, p, training)``: zero each element with probability ``p``, scale the
    rest by 1 / (1 - p); the identity (``x`` itself) when not training or ``p == 0``.

    Faster on a CPU: the mask comes from 16 random bits per element drawn 64 at a time (mt19937's
    ``bernoulli_``, which ``F.dropout`` uses, is 3.4x slower and was 5-9% of a training step);
    the keep probability is 1 - p to within 2^-16, and the same global seed gives the same mask.
    Other devices, and layouts whose channel lanes cannot be viewed as int64, use ``F.dropout``.
    """
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


class KernelCache:
    """The last ``upsample_kernel`` built from one conv weight, reused while that weight, the
    compute dtype, the memory layout and the device are unchanged (sampling runs the same
    weights for hundreds of steps). Keyed on the weight's storage and version counter, so an
    in-place optimiser or EMA step, or ``load_state_dict``, invalidates it. Plain Python state:
    nothing enters the module's ``state_dict``."""

    def __init__(self) -> None:
        # ((weight storage, version, dtype, memory format, device), kernel)
        self._entry: (
            tuple[tuple[int, int, torch.dtype, torch.memory_format, torch.device], torch.Tensor]
            | None
        ) = None

    def kernel(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The transposed-conv weight for input ``x``, in ``x``'s memory layout (oneDNN then
        skips a reorder)."""
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        if (torch.is_grad_enabled() and w.requires_grad) or w.is_inference():
            # training: rebuilt, differentiable; inference tensors have no version to key on
            return upsample_kernel(w).contiguous(memory_format=fmt)
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else w.dtype
        key = (w.data_ptr(), w._version, dtype, fmt, x.device)
        if self._entry is None or self._entry[0] != key:
            with torch.no_grad():
                self._entry = (key, upsample_kernel(w).to(dtype).contiguous(memory_format=fmt))
        return self._entry[1]


def upsample_conv(
    x: torch.Tensor, conv: nn.Conv2d, cache: KernelCache | None = None
) -> torch.Tensor:
    """Spec: ``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3 ``conv`` with
    padding 1 (and its gradients with respect to ``x``, the weight and the bias).

    Faster: computed as one stride-2 transposed conv whose 4x4 kernel sums the 3x3 taps that land
    on the same input pixel (``upsample_kernel``): 16 instead of 36 multiply-adds per input pixel
    and channel pair (these convs are 17% of the ``paper`` UNet's arithmetic), and the 2x larger
    intermediate image is never made. With a ``cache`` the kernel is derived once per weight
    version while sampling instead of at every call.
    """
    w = (cache or KernelCache()).kernel(conv.weight, x)
    return F.conv_transpose2d(x, w, conv.bias, stride=2, padding=1)


def self_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Spec: ``qkv`` (N, 3C, H, W) holds q, k and v (N, C, H, W each, in that order along the
    channels); per head of d = C / heads channels (head j: channels j*d to (j+1)*d - 1 of each)
    and per image, over the L = H*W positions, ``softmax(q^T k / sqrt(d)) v``; returned as
    (N, C, H, W), the heads concatenated along the channels.

    Faster: ``F.scaled_dot_product_attention`` picks a fused kernel (flash or memory-efficient
    attention on CUDA, a blocked kernel on CPUs) that never holds the L x L weights in memory,
    which the written-out product does (4096 x 4096 per head and image at 64x64). The result
    is returned as a channels-last view, the layout the following 1x1 conv prefers.
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    # (N, H, W, 3, heads, d) -> three (N, heads, L, d) views
    tokens = qkv.permute(0, 2, 3, 1).reshape(n, h * w, 3, heads, c // heads)
    q, k, v = tokens.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, d)
    return out.transpose(1, 2).reshape(n, h, w, c).permute(0, 3, 1, 2)
