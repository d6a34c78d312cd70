"""The ``paper`` preset is the seed's Table 2 plus its reference [3] (ProtoDiffusion,
github.com/ituvisionlab/ProtoDiffusion ``unet.py``/``train.py``) where the seed is silent:
self-attention where [3] puts it, AdamW weight decay 1e-4, a warm-up then cosine rate, the
linear beta schedule, no clipping, flips or EMA. The model and schedule without those stay
available (``paper-legacy``), and a config stored without their fields loads as that model."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.config import PRESETS, TrainConfig, make_config
from ml.diffusion.process import noise_scheduler
from ml.diffusion.train import Progress, TrainingCancelled, make_lr_scheduler, make_optimizer, train
from ml.models.checkpoint import Conditioning, build_model, load_model, read_checkpoint
from ml.models.unet import AttnBlock, Downsample, ResBlock, UNet, Upsample, count_parameters
from tests.test_train import losses_of, random_set

# A stored `protomed train --preset paper` config without the attention and schedule fields
# (make_config("paper").model_dump(mode="json") without them, at paper-legacy's values).
OLD_PAPER_ARGS = {
    "preset": "paper",
    "mode": "prototype",
    "image_size": 64,
    "in_channels": 3,
    "base_channels": 64,
    "channel_mults": [1, 2, 4, 8],
    "num_res_blocks": 2,
    "dropout": 0.1,
    "norm_groups": 32,
    "class_dim": 768,
    "timesteps": 1000,
    "beta_schedule": "linear",
    "p_uncond": 0.1,
    "lr": 0.0001,
    "weight_decay": 0.0,
    "batch_size": 16,
    "epochs": 1500,
    "max_steps": None,
    "grad_clip": 1.0,
    "ema_decay": 0.9999,
    "precision": "auto",
    "flip": True,
    "channels_last": None,
    "seed": 0,
    "checkpoint_every": 500,
}
# fields OLD_PAPER_ARGS lacks: attention and rate schedule; min-SNR weighting (off: "none");
# freeze_prototypes (True: the table frozen)
NEW_FIELDS = (
    "attention_resolutions",
    "attention_heads",
    "lr_schedule",
    "lr_warmup",
    "loss_weighting",
    "snr_gamma",
    "freeze_prototypes",
)


def _layout(model: torch.nn.Module) -> tuple[int, str]:
    state = model.state_dict()
    text = "\n".join(f"{name} {tuple(v.shape)}" for name, v in state.items())
    return len(state), hashlib.sha256(text.encode()).hexdigest()[:16]


def test_paper_takes_table2_then_protodiffusion() -> None:
    cfg = make_config("paper")
    # Table 2
    assert (cfg.image_size, cfg.base_channels, cfg.channel_mults) == (64, 64, (1, 2, 4, 8))
    assert (cfg.num_res_blocks, cfg.dropout, cfg.timesteps, cfg.lr, cfg.batch_size) == (
        2,
        0.1,
        1000,
        1e-4,
        16,
    )
    # [3]: attention at every level (one head), AdamW(weight_decay=1e-4), warm-up over
    # epochs // 20 (a twentieth of the run) then cosine, no clipping, flips or EMA
    assert cfg.attention_resolutions == (64, 32, 16, 8) and cfg.attention_heads == 1
    assert (cfg.weight_decay, cfg.lr_schedule, cfg.lr_warmup) == (1e-4, "cosine", 1 / 20)
    assert (cfg.grad_clip, cfg.flip, cfg.ema_decay) == (None, False, 0.0)
    # [3]'s get_named_beta_schedule("linear", 1000): np.linspace(1e-4, 0.02, 1000)
    betas = noise_scheduler(cfg).betas.double().numpy()
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6, atol=1e-9)
    model = torch.nn.Linear(2, 2)
    assert make_optimizer(model, cfg).param_groups[0]["weight_decay"] == 1e-4
    # the defaults are the paper preset
    assert TrainConfig().model_dump() == cfg.model_dump()


def test_paper_legacy_is_paper_as_it_was() -> None:
    legacy = make_config("paper-legacy").model_dump(mode="json")
    assert {k: v for k, v in legacy.items() if k not in NEW_FIELDS} == {
        **OLD_PAPER_ARGS,
        "preset": "paper-legacy",
    }
    assert (legacy["attention_resolutions"], legacy["lr_schedule"], legacy["lr_warmup"]) == (
        [],
        "constant",
        0.0,
    )


def _protodiffusion_order(
    chans: list[int], nres: int, size: int, attn_sizes: tuple[int, ...]
) -> list[tuple[str, int, int]]:
    """(kind, channels, feature-map size) of the blocks [3]'s ``Unet.__init__`` builds, in the
    order its forward runs them: per level nres x (ResBlock, AttnBlock) then a downsample;
    the middle ResBlock, AttnBlock, ResBlock; per level upwards (nres + 1) x (ResBlock,
    AttnBlock) then an upsample. Attention only at the sizes listed."""
    order: list[tuple[str, int, int]] = []
    for i, c in enumerate(chans):
        s = size // 2**i
        for _ in range(nres):
            order += [("res", c, s)] + [("attn", c, s)] * (s in attn_sizes)
        if i < len(chans) - 1:
            order.append(("down", c, s // 2))
    c, s = chans[-1], size // 2 ** (len(chans) - 1)
    order += [("res", c, s)] + [("attn", c, s)] * (s in attn_sizes) + [("res", c, s)]
    for i in reversed(range(len(chans))):
        c, s = chans[i], size // 2**i
        for _ in range(nres + 1):
            order += [("res", c, s)] + [("attn", c, s)] * (s in attn_sizes)
        if i:
            order.append(("up", c, s * 2))
    return order


@pytest.mark.parametrize("attn_sizes", [(16, 8, 4), (8,), ()])
def test_attention_sits_where_protodiffusion_puts_it(attn_sizes: tuple[int, ...]) -> None:
    """The blocks the forward pass runs, in order, with their widths and sizes, are [3]'s."""
    cfg = make_config(
        "tiny",
        {"channel_mults": (1, 2, 4), "num_res_blocks": 2, "attention_resolutions": attn_sizes},
    )
    model = build_model(cfg, Conditioning(list("ab"), "baseline"))
    kinds = {ResBlock: "res", AttnBlock: "attn", Downsample: "down", Upsample: "up"}
    seen: list[tuple[str, int, int]] = []
    for module in model.modules():
        if type(module) in kinds:
            kind = kinds[type(module)]
            module.register_forward_hook(
                lambda m, _i, out, kind=kind: seen.append((kind, out.shape[1], out.shape[-1]))
            )
    model(torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([0, -1]))
    assert seen == _protodiffusion_order([8, 16, 32], 2, 16, attn_sizes)


def test_paper_has_protodiffusions_attention_blocks_and_parameters() -> None:
    """21 attention blocks at 64x64 (2 down, 3 up per level, 1 middle), each [3]'s AttnBlock:
    GroupNorm (2C) plus q, k, v and output 1x1 convs (4C^2 + 4C); the rest is paper-legacy."""
    cond = Conditioning(list("abcdefg"), "baseline")
    with torch.device("meta"):
        paper = build_model(make_config("paper"), cond)
        legacy = build_model(make_config("paper-legacy"), cond)
    widths = sorted(m.proj.out_channels for m in paper.modules() if isinstance(m, AttnBlock))
    expected = sorted([64] * 5 + [128] * 5 + [256] * 5 + [512] * 6)
    assert widths == expected
    assert all(m.heads == 1 for m in paper.modules() if isinstance(m, AttnBlock))
    extra = sum(4 * c * c + 6 * c for c in expected)
    assert count_parameters(paper) == count_parameters(legacy) + extra
    assert (count_parameters(legacy), count_parameters(paper)) == (57_222_467, 65_266_115)


def test_attention_sizes_must_be_the_models() -> None:
    with pytest.raises(ValueError, match=r"attention_resolutions \[32\].*\[16, 8\]"):
        make_config("tiny", {"attention_resolutions": (32,)})
    with pytest.raises(ValueError, match="do not split into attention_heads=3"):
        make_config("tiny", {"attention_resolutions": (16,), "attention_heads": 3})


def _reference_rate(lr: float, step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0, then a half cosine to 0 at ``total``."""
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _rates(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rate_warms_up_then_follows_the_cosine_and_resume_continues_it(tmp_path: Path) -> None:
    data = random_set()
    over = {"mode": "baseline", "max_steps": 8, "batch_size": 4}
    cfg = make_config("tiny", {**over, "lr_schedule": "cosine", "lr_warmup": 0.25})
    train(cfg, data, tmp_path / "full", show_progress=False)
    rates = _rates(tmp_path / "full")
    reference = [_reference_rate(cfg.lr, s, 2, 8) for s in range(8)]
    np.testing.assert_allclose(rates, reference, rtol=1e-9, atol=1e-12)
    assert max(rates) == pytest.approx(cfg.lr) and rates[0] == 0 and rates[-1] < 0.1 * cfg.lr

    # interrupted after 3 steps (the trainer checkpoints as it stops), then resumed
    with pytest.raises(TrainingCancelled):
        train(cfg, data, tmp_path / "stop", show_progress=False, progress=_stop_at(3))
    assert read_checkpoint(tmp_path / "stop" / "last.pt")["lr_sched"]["last_epoch"] == 3
    train(cfg, data, tmp_path / "stop", resume=tmp_path / "stop" / "last.pt", show_progress=False)
    assert _rates(tmp_path / "stop") == pytest.approx(rates, rel=1e-12, abs=1e-15)
    assert losses_of(tmp_path / "stop") == losses_of(tmp_path / "full")
    final = read_checkpoint(tmp_path / "stop" / "last.pt")
    assert final["lr_sched"]["last_epoch"] == 8
    assert final["opt"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-15)  # the end


def _stop_at(step: int) -> Callable[[Progress], None]:
    def progress(info: Progress) -> None:
        if info.step == step:
            raise TrainingCancelled

    return progress


def test_constant_schedule_keeps_the_rate_after_its_warm_up() -> None:
    cfg = make_config("tiny", {"lr_schedule": "constant", "lr_warmup": 0.5})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched, rates = make_lr_scheduler(opt, cfg, 8), []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([cfg.lr * s / 4 for s in range(4)] + [cfg.lr] * 4)


def test_a_config_stored_before_the_new_fields_loads_as_it_was() -> None:
    """A paper checkpoint or queued job without the attention and schedule fields loads as
    the model it was trained as (no attention, paper-legacy's parameter names and shapes, a
    constant rate), not with the paper preset's defaults."""
    assert not set(NEW_FIELDS) & set(OLD_PAPER_ARGS)
    cfg = TrainConfig.from_stored(OLD_PAPER_ARGS)
    assert (cfg.attention_resolutions, cfg.lr_schedule, cfg.lr_warmup) == ((), "constant", 0.0)
    assert {k: v for k, v in cfg.model_dump(mode="json").items() if k in OLD_PAPER_ARGS} == (
        OLD_PAPER_ARGS
    )
    with torch.device("meta"):
        model = build_model(cfg, Conditioning(list("abc"), "baseline"))
    assert not any(isinstance(m, AttnBlock) for m in model.modules())
    assert _layout(model) == (274, "c5dcf0db50ba08fa")  # test_model's paper-legacy layout
    # stored fields always win over the fill-in
    assert TrainConfig.from_stored({**OLD_PAPER_ARGS, "lr_schedule": "cosine"}).lr_schedule == (
        "cosine"
    )


def test_an_old_checkpoint_loads_and_resumes_as_it_was(tmp_path: Path) -> None:
    """A checkpoint whose args lack the attention and schedule fields and which holds no
    scheduler state samples with the same weights and resumes on the rate its run had."""
    data = random_set()
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 4, "batch_size": 4})
    train(cfg, data, tmp_path / "full", show_progress=False)
    train(cfg.model_copy(update={"max_steps": 2}), data, tmp_path / "old", show_progress=False)
    ckpt = read_checkpoint(tmp_path / "old" / "last.pt")
    del ckpt["lr_sched"]
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k not in NEW_FIELDS}
    for group in ckpt["opt"]["param_groups"]:
        group.pop("initial_lr", None)  # no scheduler ever touched the old optimiser
    torch.save(ckpt, tmp_path / "old" / "last.pt")

    loaded = load_model(tmp_path / "old")
    assert loaded.cfg.attention_resolutions == () and loaded.cfg.lr_schedule == "constant"
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key]), key
    train(cfg, data, tmp_path / "old", resume=tmp_path / "old" / "last.pt", show_progress=False)
    assert losses_of(tmp_path / "old") == losses_of(tmp_path / "full")
    assert _rates(tmp_path / "old")[2:] == [cfg.lr, cfg.lr]


def test_every_preset_builds_and_cpu_presets_stay_attention_free() -> None:
    """tiny (the tests' model) and cpu-small (the demo's) keep their recipe and speed."""
    for name in PRESETS:
        cfg = make_config(name)
        with torch.device("meta"):
            model: UNet = build_model(cfg, Conditioning(list("ab"), "baseline"))
        has_attention = any(isinstance(m, AttnBlock) for m in model.modules())
        assert has_attention == (name == "paper"), name
    for name in ("tiny", "cpu-small"):
        cfg = make_config(name)
        assert (cfg.weight_decay, cfg.grad_clip, cfg.flip, cfg.lr_schedule) == (
            0.0,
            1.0,
            True,
            "constant",
        ), name


def test_resuming_with_a_different_model_names_the_difference(tmp_path: Path) -> None:
    """An old ``paper`` checkpoint resumed under today's ``paper`` (attention) is refused with
    the fields that differ and the preset to use, not a state-dict traceback."""
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1, "batch_size": 4})
    train(cfg, random_set(), tmp_path, show_progress=False)
    attn = cfg.model_copy(update={"attention_resolutions": (16,), "max_steps": 2})
    with pytest.raises(
        ValueError, match=r"attention_resolutions=\(\) \(config: \(16,\)\).*paper-legacy"
    ):
        train(attn, random_set(), tmp_path, resume=tmp_path / "last.pt", show_progress=False)
