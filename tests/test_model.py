"""UNet, conditioning and diffusion objective: shapes, frozen prototypes, the null path."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ml.config import make_config, parse_overrides
from ml.diffusion.process import diffusion_loss, guided_sample, noise_scheduler, sampler
from ml.models.checkpoint import Conditioning, build_model
from ml.models.unet import NULL_LABEL, UNet, count_parameters, timestep_embedding


def _tiny(mode: str = "baseline", k: int = 1, classes: int = 3) -> tuple[UNet, torch.Tensor | None]:
    cfg = make_config("tiny", {"mode": mode})
    table = torch.randn(classes * k, cfg.class_dim) if mode == "prototype" else None
    weights = torch.ones(classes, k) / k
    cond = Conditioning([f"c{i}" for i in range(classes)], mode, k, weights)
    return build_model(cfg, cond, table), table


def test_paper_preset_is_table2():
    cfg = make_config("paper")
    assert (cfg.image_size, cfg.base_channels, cfg.channel_mults) == (64, 64, (1, 2, 4, 8))
    assert (cfg.num_res_blocks, cfg.dropout, cfg.timesteps) == (2, 0.1, 1000)
    assert (cfg.lr, cfg.batch_size) == (1e-4, 16)
    with torch.device("meta"):  # shapes only
        model = build_model(cfg, Conditioning(list("abcdefg"), "baseline"))
        legacy = build_model(make_config("paper-legacy"), Conditioning(list("abcdefg"), "baseline"))
    # Same order of size as diffusers' UNet2DModel of Table 2 (55.5M) plus FiLM and the
    # concatenated class input; [3]'s self-attention adds 8.0M (tests/test_paper_preset.py).
    assert 50e6 < count_parameters(legacy) < 60e6
    assert 60e6 < count_parameters(model) < 70e6


@pytest.mark.parametrize(
    "preset,n_keys,digest",
    [
        ("paper-legacy", 274, "c5dcf0db50ba08fa"),
        ("cpu-small", 146, "b290842880e0f21d"),
        ("paper", 400, "d01201ae65a70c6a"),
    ],
)
def test_state_dict_layout_is_stable(preset: str, n_keys: int, digest: str) -> None:
    """The parameter names and shapes checkpoints of FORMAT_VERSION hold: a change to them needs
    a new format and a remap in ml.models.checkpoint (tests/test_checkpoint_layout.py checks
    the older format's); a cache such as the upsampling's kernels is not state."""
    with torch.device("meta"):  # shapes only, no memory or init time
        model = build_model(make_config(preset), Conditioning(list("abc"), "baseline"))
    state = model.state_dict()
    text = "\n".join(f"{name} {tuple(v.shape)}" for name, v in state.items())
    assert (len(state), hashlib.sha256(text.encode()).hexdigest()[:16]) == (n_keys, digest)


@pytest.mark.parametrize("size,mults", [(16, (1, 2)), (32, (1, 2, 4))])
def test_output_shape_matches_input(size, mults):
    model = UNet(
        num_embeddings=4,
        class_dim=8,
        image_size=size,
        base_channels=8,
        channel_mults=mults,
        num_res_blocks=2,
        norm_groups=4,
    )
    x = torch.randn(3, 3, size, size)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([0, 3, NULL_LABEL]))
    assert out.shape == x.shape


def test_timestep_embedding_distinguishes_steps():
    e = timestep_embedding(torch.tensor([0, 1, 500]), 32)
    assert e.shape == (3, 32)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[1], e[2])


def test_time_and_class_are_concatenated_not_summed():
    model, _ = _tiny()
    first = model.cond_mlp[0]
    assert first.in_features == model.time_dim + model.class_embed.embedding_dim


def _train_steps(model: UNet, steps: int = 3) -> None:
    cfg = make_config("tiny")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = noise_scheduler(cfg)
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.rand(4, 3, 16, 16) * 2 - 1
        loss = diffusion_loss(model, x, torch.tensor([0, 1, 2, 0]), sched, p_uncond=0.25)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_prototype_table_is_bit_identical_after_training():
    model, table = _tiny("prototype", k=2)
    assert model.frozen_table
    before = model.class_embed.weight.detach().clone()
    assert torch.equal(before, table)
    null_before = model.null_embed.detach().clone()
    _train_steps(model)
    assert torch.equal(model.class_embed.weight, before)
    assert not torch.equal(model.null_embed, null_before), "the null embedding must learn"


def test_baseline_table_learns():
    model, _ = _tiny("baseline")
    assert not model.frozen_table
    before = model.class_embed.weight.detach().clone()
    _train_steps(model)
    assert not torch.equal(model.class_embed.weight, before)


def test_null_label_uses_null_embedding():
    model, _ = _tiny("prototype")
    with torch.no_grad():
        model.null_embed.copy_(torch.randn_like(model.null_embed))
    t = torch.tensor([5, 5])
    emb_null = model.condition(t, torch.tensor([NULL_LABEL, NULL_LABEL]))
    assert torch.allclose(emb_null[0], emb_null[1])
    expected = model.cond_mlp(
        torch.cat([timestep_embedding(t[:1], model.time_dim), model.null_embed[None]], dim=-1)
    )
    assert torch.allclose(emb_null[:1], torch.nn.functional.silu(expected), atol=1e-6)
    emb_cls = model.condition(t, torch.tensor([0, 1]))
    assert not torch.allclose(emb_cls[0], emb_null[0])
    assert not torch.allclose(emb_cls[0], emb_cls[1])


def test_guidance_batches_cond_and_uncond_and_mixes():
    """w=1 equals the conditional model alone; w=0 the unconditional; others extrapolate."""
    model, _ = _tiny("prototype")
    torch.manual_seed(1)
    for p in model.parameters():  # give the zero-initialised output layer some weight
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    model.eval()
    cfg = make_config("tiny")
    noise = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 1])
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    outs = {}
    for w in (0.0, 1.0, 3.0):
        calls.clear()
        outs[w] = guided_sample(model, labels, noise, sampler("ddim", noise_scheduler(cfg), 4), w)
        assert calls == ([4] * 4 if w == 3.0 else [2] * 4), "cond+uncond must share one batch"
    handle.remove()
    assert not torch.allclose(outs[0.0], outs[1.0])
    assert not torch.allclose(outs[3.0], outs[1.0])


def test_dce_of_diffusion_loss_is_finite_and_positive():
    model, _ = _tiny("baseline")
    loss = diffusion_loss(
        model,
        torch.zeros(2, 3, 16, 16),
        torch.tensor([0, 1]),
        noise_scheduler(make_config("tiny")),
        0.5,
    )
    assert torch.isfinite(loss) and loss > 0


def _reference_min_snr(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR (Hang et al. 2023, epsilon prediction), from the linear schedule's
    betas (DDPM: 1e-4 to 0.02 over T=1000), computed here without diffusers."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, dim=0)[t]
    snr = abar / (1.0 - abar)
    return (torch.minimum(snr, torch.full_like(snr, gamma)) / snr).float()


def test_min_snr_weight_matches_the_reference_formula():
    from ml.diffusion.process import min_snr_weight

    sched = noise_scheduler(make_config("tiny"))
    t = torch.tensor([0, 10, 50, 100, 200, 500, 999])
    got = min_snr_weight(sched, t, 5.0)
    assert torch.allclose(got, _reference_min_snr(t, 5.0), rtol=1e-3)  # float32 schedule
    assert got[0] < 0.01 and got[-1] == 1.0  # clean steps down-weighted, noisy ones kept


class _Zero(torch.nn.Module):
    """Predicts zero noise: the per-image loss is then the mean square of the drawn noise."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_min_snr_loss_weights_each_image_by_its_timestep():
    x0 = torch.zeros(6, 3, 8, 8)
    sched = noise_scheduler(make_config("tiny"))
    torch.manual_seed(3)
    noise = torch.randn_like(x0)  # the loss draws noise, then t, from the global RNG
    t = torch.randint(0, 1000, (6,))
    expected = (_reference_min_snr(t, 5.0) * noise.pow(2).mean(dim=(1, 2, 3))).mean()
    torch.manual_seed(3)
    got = diffusion_loss(_Zero(), x0, torch.zeros(6, dtype=torch.long), sched, 0.0, snr_gamma=5.0)
    assert torch.allclose(got, expected, rtol=1e-4)
    torch.manual_seed(3)
    plain = diffusion_loss(_Zero(), x0, torch.zeros(6, dtype=torch.long), sched, 0.0)
    assert torch.allclose(plain, noise.pow(2).mean(), rtol=1e-5)


def test_loss_weighting_is_a_config_choice_off_by_default():
    assert make_config("paper").loss_weighting == "none"
    assert make_config("tiny", {"loss_weighting": "min_snr"}).snr_gamma == 5.0
    with pytest.raises(ValueError, match="loss_weighting"):
        make_config("tiny", {"loss_weighting": "p2"})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        make_config("tiny", {"image_size": 17})
    with pytest.raises(ValueError, match="unknown field 'epoch'"):
        parse_overrides(["epoch=3"])
    assert parse_overrides(["channel_mults=[1,2]", "mode=baseline"]) == {
        "channel_mults": [1, 2],
        "mode": "baseline",
    }


def test_allocator_tuning_applies_on_glibc():
    from ml.runtime import tune_allocator

    assert tune_allocator() is True
