"""The speed work keeps outputs the same: each kernel of ml.models.ops against the plain formula its
docstring states, the UNet built on them against the textbook model, the CPU dropout's
statistics and gradient, the fused optimiser against the reference one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ml.config import make_config
from ml.diffusion.train import make_optimizer
from ml.models import ops
from ml.models.checkpoint import Conditioning, build_model
from ml.models.ops import dropout
from ml.models.unet import AttnBlock, ResBlock, UNet, Upsample


def _reference_block(block: ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The textbook block (norm, SiLU, conv; norm * (1 + scale) + shift; SiLU, conv; skip)."""
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale) + shift
    return block.skip(x) + block.conv2(F.silu(h))


def _reference_upsample(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """[3]'s ``AttnBlock.forward`` (ProtoDiffusion ``unet.py``, one head, written out with
    ``bmm``), with its q, k, v 1x1 convs read out of our fused one; several heads as
    ``nn.MultiheadAttention`` computes them (its functional form), our convs as projections."""
    b, c, hh, ww = x.shape
    h = block.norm(x)
    if block.heads == 1:
        q, k, v = block.qkv(h).chunk(3, dim=1)
        q = q.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=-1)
        out = torch.bmm(w, v.permute(0, 2, 3, 1).reshape(b, hh * ww, c))
        return x + block.proj(out.reshape(b, hh, ww, c).permute(0, 3, 1, 2))
    tokens = h.flatten(2).permute(2, 0, 1)  # (L, N, C), as nn.MultiheadAttention's functional
    out, _ = F.multi_head_attention_forward(
        tokens,
        tokens,
        tokens,
        c,
        block.heads,
        block.qkv.weight.reshape(3 * c, c),
        block.qkv.bias,
        None,
        None,
        False,
        0.0,
        block.proj.weight.reshape(c, c),
        block.proj.bias,
        need_weights=False,
    )
    return x + out.permute(1, 2, 0).reshape(b, c, hh, ww)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (a fresh UNet's output conv is zero, which hides errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _reference_unet(model: UNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    emb = model.condition(t, y)
    h = model.conv_in(x)
    skips = [h]
    for level in model.down:
        for block, attn in zip(level.res, level.attn, strict=True):
            h = _reference_block(block, h, emb)
            if isinstance(attn, AttnBlock):
                h = _reference_attention(attn, h)
            skips.append(h)
        if level.resample is not None:
            h = level.resample(h)
            skips.append(h)
    h = _reference_block(model.mid[0], h, emb)
    if isinstance(model.mid_attn, AttnBlock):
        h = _reference_attention(model.mid_attn, h)
    h = _reference_block(model.mid[1], h, emb)
    for level in model.up:
        for block, attn in zip(level.res, level.attn, strict=True):
            h = _reference_block(block, torch.cat([h, skips.pop()], dim=1), emb)
            if isinstance(attn, AttnBlock):
                h = _reference_attention(attn, h)
        if level.resample is not None:
            h = _reference_upsample(level.resample, h)
    return model.conv_out(F.silu(model.norm_out(h)))


@pytest.mark.parametrize(
    "attention", [{}, {"attention_resolutions": (16, 8), "attention_heads": 2}]
)  # tiny as it ships (no attention), and with attention at both of its sizes
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_unet_matches_the_plain_formula(channels_last: bool, grad: bool, attention: dict) -> None:
    cfg = make_config("tiny", attention)
    model = _randomised(build_model(cfg, Conditioning(["a", "b", "c"], "baseline"))).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    y = torch.tensor([0, 1, 2, -1, 0, -1])
    with torch.no_grad():
        ref = _reference_unet(model, x, t, y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    with torch.set_grad_enabled(grad):  # grad off takes the in-place path sampling uses
        out = model(x.contiguous(memory_format=fmt), t, y)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_attention_block_is_protodiffusions_with_the_same_gradients(
    heads: int, channels_last: bool, grad: bool
) -> None:
    """AttnBlock (through ops.self_attention) against [3]'s AttnBlock written out (one head)
    and nn.MultiheadAttention (four heads): outputs, and gradients for the input and weights;
    without autograd (sampling) the residual add runs in place and must give the same."""
    torch.manual_seed(0)
    block = _randomised(AttnBlock(16, heads=heads, groups=4))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 16, 5, 6).contiguous(memory_format=fmt).requires_grad_()
    ref = _reference_attention(block, x)
    with torch.set_grad_enabled(grad):
        out = block(x)
    assert out.shape == x.shape and ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if grad:
        g = torch.randn_like(ref)
        wrt = [x, block.qkv.weight, block.qkv.bias, block.proj.weight, block.norm.weight]
        for a, b in zip(
            torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_equals_nearest_then_conv_with_the_same_gradients(channels_last: bool) -> None:
    """The transposed-conv form: same output and same gradients for input, weight and bias."""
    torch.manual_seed(0)
    up = _randomised(Upsample(8))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8, 5, 7).contiguous(memory_format=fmt).requires_grad_()
    ref, out = _reference_upsample(up, x), up(x)
    assert out.shape == (3, 8, 10, 14) and out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.upsample_conv(x, up.conv), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    wrt = [x, up.conv.weight, up.conv.bias]
    for a, b in zip(
        torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_kernel_cache_follows_the_weights_and_autocast() -> None:
    """Sampling reuses the derived kernel, but never a stale one: an optimiser step, a loaded
    checkpoint or bf16 autocast each give the output of the plain formula."""
    torch.manual_seed(0)
    up = _randomised(Upsample(4))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(up(x), _reference_upsample(up, x), rtol=1e-5, atol=1e-5)
        up.conv.weight.mul_(-0.5)  # in place, as optimisers and EMA updates change weights
        torch.testing.assert_close(up(x), _reference_upsample(up, x), rtol=1e-5, atol=1e-5)
        up.load_state_dict(_randomised(Upsample(4), seed=3).state_dict())
        torch.testing.assert_close(up(x), _reference_upsample(up, x), rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = up(x)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), _reference_upsample(up, x), rtol=0.05, atol=0.05)
    with torch.inference_mode():  # weights made under inference mode carry no version counter
        frozen = _randomised(Upsample(4), seed=4)
        torch.testing.assert_close(frozen(x), _reference_upsample(frozen, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_film_group_norm_is_the_norm_then_scale_and_shift(channels_last: bool) -> None:
    """ops.film_group_norm against its spec, norm(x) * (1 + scale) + shift, and its gradients."""
    torch.manual_seed(0)
    norm = _randomised(torch.nn.GroupNorm(4, 8))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 8, 5, 7).contiguous(memory_format=fmt).requires_grad_()
    scale = torch.randn(3, 8, 1, 1, requires_grad=True)
    shift = torch.randn(3, 8, 1, 1, requires_grad=True)
    ref = norm(x) * (1 + scale) + shift
    out = ops.film_group_norm(x, norm, scale, shift)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    wrt = [x, scale, shift, norm.weight, norm.bias]
    for a, b in zip(
        torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_sampling_ops_overwrite_their_input_only_without_autograd() -> None:
    """ops.silu and ops.add_residual equal F.silu and +; they reuse the temporary's buffer only
    when autograd is off, and leave it alone when a backward pass may need it."""
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        tmp = x.clone()
        out = ops.silu(tmp)
        assert out.data_ptr() == tmp.data_ptr()
        torch.testing.assert_close(out, F.silu(x))
        tmp = x.clone()
        out = ops.add_residual(tmp, x)
        assert out.data_ptr() == tmp.data_ptr()
        torch.testing.assert_close(out, 2 * x)
    tmp = x.clone()
    torch.testing.assert_close(ops.silu(tmp), F.silu(x))
    torch.testing.assert_close(ops.add_residual(tmp, x), 2 * x)
    assert torch.equal(tmp, x)


def test_dropout_keeps_one_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    x = torch.ones(4, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    for p in (0.1, 0.5):
        out = dropout(x, p, training=True)
        kept = (out != 0).float().mean().item()
        assert abs(kept - (1 - p)) < 0.01, (p, kept)
        assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert dropout(x, 0.1, training=False) is x
    # seeded like the trainer: the same global seed gives the same mask
    torch.manual_seed(3)
    a = dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.1, True))


def test_dropout_masks_are_independent_across_positions() -> None:
    """Neighbouring lanes of one 64-bit draw must not be correlated (each is its own 16 bits)."""
    torch.manual_seed(0)
    keep = dropout(torch.ones(8, 64, 32, 32), 0.5, True) != 0
    a, b = keep[:, 0::2].float().flatten(), keep[:, 1::2].float().flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 0.02, corr


def test_dropout_gradient_is_the_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    out = dropout(x, 0.25, True)
    out.sum().backward()
    expected = (out != 0).float() / 0.75
    torch.testing.assert_close(x.grad, expected)


def test_fused_adamw_matches_the_reference_update() -> None:
    cfg = make_config("tiny", {"weight_decay": 0.01})
    cond = Conditioning(["a", "b"], "baseline")
    torch.manual_seed(0)
    fused_model = build_model(cfg, cond)
    ref_model = build_model(cfg, cond)
    ref_model.load_state_dict(fused_model.state_dict())
    fused = make_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    ref = torch.optim.AdamW(ref_model.parameters(), lr=cfg.lr, weight_decay=0.01, foreach=False)
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    t, y = torch.tensor([1, 50, 300, 900]), torch.tensor([0, 1, -1, 1])
    for _ in range(3):
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            opt.zero_grad()
            model.eval()(x, t, y).square().mean().backward()
            opt.step()
    pairs = zip(fused_model.state_dict().items(), ref_model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_training_layout_is_nhwc_except_bf16_on_a_cpu() -> None:
    from ml.diffusion.train import memory_format

    cfg = make_config("tiny")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert memory_format(cfg, cpu, None) == torch.channels_last
    assert memory_format(cfg, cpu, torch.bfloat16) == torch.contiguous_format
    assert memory_format(cfg, cuda, torch.bfloat16) == torch.channels_last
    forced = cfg.model_copy(update={"channels_last": True})
    assert memory_format(forced, cpu, torch.bfloat16) == torch.channels_last
    off = cfg.model_copy(update={"channels_last": False})
    assert memory_format(off, cpu, None) == torch.contiguous_format
