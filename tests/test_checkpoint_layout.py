"""Checkpoints in the flat layout (format 1) load and resume as they were: their parameter names
are renamed as the file is read (``ml.models.checkpoint.remap_legacy_keys``), so the UNet knows
only its own per-level layout."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ml.config import make_config
from ml.diffusion.train import train
from ml.models.checkpoint import (
    FORMAT_VERSION,
    Conditioning,
    build_model,
    load_model,
    read_checkpoint,
    remap_legacy_keys,
    upgrade_checkpoint,
)
from tests.test_train import losses_of, random_set

# Format 1's top-level names in the order its UNet registered them.
FORMAT1_TOP = (
    "null_embed",
    "class_embed",
    "cond_mlp",
    "conv_in",
    "down",
    "down_attn",
    "mid",
    "mid_attn",
    "up",
    "up_attn",
    "norm_out",
    "conv_out",
)

# tiny with attention at both sizes, module by module: format 1's name -> today's.
TINY_ATTENTION_FORMAT1 = {
    "down.0": "down.0.res.0",
    "down_attn.0": "down.0.attn.0",
    "down.1": "down.0.resample",
    "down.2": "down.1.res.0",
    "down_attn.2": "down.1.attn.0",
    "up.0": "up.0.res.0",
    "up_attn.0": "up.0.attn.0",
    "up.1": "up.0.res.1",
    "up_attn.1": "up.0.attn.1",
    "up.2": "up.0.resample",
    "up.3": "up.1.res.0",
    "up_attn.3": "up.1.attn.0",
    "up.4": "up.1.res.1",
    "up_attn.4": "up.1.attn.1",
}


def format1_names(names: list[str]) -> dict[str, str]:
    """Today's name -> format 1's, in format 1's order: ``down``/``up`` number each level's
    residual blocks and then its resampling on from the previous level's; an attention block
    sits under ``down_attn``/``up_attn`` with the number of the block it follows."""
    split = [n.split(".") for n in names]
    flat: dict[tuple[str, int, str, int], int] = {}
    for part in ("down", "up"):
        at = 0
        for level in sorted({int(s[1]) for s in split if s[0] == part}):
            blocks = sorted({int(s[3]) for s in split if s[:3] == [part, str(level), "res"]})
            for j in blocks:
                flat[part, level, "res", j] = flat[part, level, "attn", j] = at + j
            flat[part, level, "resample", 0] = at + len(blocks)
            at += len(blocks) + any(s[:3] == [part, str(level), "resample"] for s in split)
    out: list[tuple[tuple[int, int], str, str]] = []
    for name, s in zip(names, split, strict=True):
        if s[0] in ("down", "up"):
            kind, j = s[2], 0 if s[2] == "resample" else int(s[3])
            i = flat[s[0], int(s[1]), kind, j]
            top = s[0] + ("_attn" if kind == "attn" else "")
            rest = s[3:] if kind == "resample" else s[4:]
            old = ".".join([top, str(i), *rest])
            out.append(((FORMAT1_TOP.index(top), i), name, old))
        else:
            out.append(((FORMAT1_TOP.index(s[0]), 0), name, name))
    out.sort(key=lambda r: r[0])  # stable: a module's own parameters keep their order
    return {name: old for _, name, old in out}


def as_format1(state: dict[str, Any]) -> dict[str, Any]:
    return {old: state[new] for new, old in format1_names(list(state)).items()}


def _digest(shapes: dict[str, tuple[int, ...]]) -> tuple[int, str]:
    text = "\n".join(f"{name} {shape}" for name, shape in shapes.items())
    return len(shapes), hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "preset,n_keys,digest",
    [
        ("paper-legacy", 274, "d1d0504eab13209e"),
        ("cpu-small", 146, "c61dfa64d1ee3ab5"),
        ("paper", 400, "5df73371153b1f3d"),
    ],
)
def test_format1_names_are_the_flat_layout_and_remap_back(
    preset: str, n_keys: int, digest: str
) -> None:
    """The digests are those of format-1 checkpoints' names and shapes (the flat UNet's
    ``state_dict``), so ``as_format1`` writes what those files hold; the remap gives back
    today's names in today's order."""
    with torch.device("meta"):
        model = build_model(make_config(preset), Conditioning(list("abc"), "baseline"))
    state = model.state_dict()
    old = as_format1(state)
    assert _digest({k: tuple(v.shape) for k, v in old.items()}) == (n_keys, digest)
    back = remap_legacy_keys(old)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)
    assert remap_legacy_keys(state) == state  # today's layout passes through


def test_tiny_with_attention_maps_module_by_module() -> None:
    """Each format-1 module (a flat-list entry, an index-keyed attention block) becomes the
    module of today's layout listed in TINY_ATTENTION_FORMAT1, parameter by parameter."""
    cfg = make_config("tiny", {"attention_resolutions": (16, 8)})
    state = build_model(cfg, Conditioning(list("ab"), "baseline")).state_dict()
    old = as_format1(state)
    flat = {
        ".".join(k.split(".")[:2])
        for k in old
        if k.split(".")[0] in ("down", "down_attn", "up", "up_attn")
    }
    assert flat == set(TINY_ATTENTION_FORMAT1)
    remapped = remap_legacy_keys(old)
    for key, value in old.items():
        module = ".".join(key.split(".")[:2])
        new = TINY_ATTENTION_FORMAT1[module] + key[len(module) :] if module in flat else key
        assert remapped[new] is value, key
    assert list(remapped) == list(state)


def _format1_optimizer(opt: dict[str, Any], names: list[str], frozen: set[str]) -> dict[str, Any]:
    """An optimiser state as format 1's model order indexes it."""
    to_old = format1_names(names)  # in format 1's order
    old_order = [old for new, old in to_old.items() if new not in frozen]
    new_order = [n for n in names if n not in frozen]
    index = {i: old_order.index(to_old[n]) for i, n in enumerate(new_order)}
    return {
        "state": {index[i]: s for i, s in opt["state"].items()},
        "param_groups": [
            {**g, "params": sorted(index[i] for i in g["params"])} for g in opt["param_groups"]
        ],
    }


@pytest.mark.parametrize("frozen_table", [False, True])
def test_optimiser_state_follows_its_parameters(frozen_table: bool) -> None:
    """Adam's moments of each parameter land on that parameter, with the prototype table
    frozen (left out of the optimiser) or not."""
    cfg = make_config("tiny", {"attention_resolutions": (8,), "mode": "prototype"})
    cfg = cfg.model_copy(update={"freeze_prototypes": frozen_table})
    cond = Conditioning(list("ab"), "prototype")
    torch.manual_seed(0)
    model = build_model(cfg, cond, torch.randn(2, cfg.class_dim))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([0, 1]))
    (out.square().mean() + model.conv_out.weight.square().sum()).backward()
    opt.step()
    names = list(model.state_dict())
    frozen = {"class_embed.weight"} if frozen_table else set()
    ckpt = {
        "model": as_format1(model.state_dict()),
        "ema": None,
        "opt": _format1_optimizer(opt.state_dict(), names, frozen),
    }
    upgraded = upgrade_checkpoint(ckpt)
    assert upgraded["format"] == FORMAT_VERSION and list(upgraded["model"]) == names
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fresh.load_state_dict(upgraded["opt"])
    for p in model.parameters():
        if p.requires_grad:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(fresh.state[p][key], opt.state[p][key])


def test_a_format1_checkpoint_samples_and_resumes_as_it_was(tmp_path: Path) -> None:
    """A run's checkpoint rewritten in format 1 loads to the same weights and outputs, and
    resumes to the same losses as the run never interrupted; what it writes next is today's."""
    data = random_set()
    over = {"mode": "baseline", "batch_size": 4, "attention_resolutions": (16, 8)}
    cfg = make_config("tiny", {**over, "max_steps": 4})
    train(cfg, data, tmp_path / "full", show_progress=False)
    train(cfg.model_copy(update={"max_steps": 2}), data, tmp_path / "old", show_progress=False)
    ckpt = read_checkpoint(tmp_path / "old" / "last.pt")
    names = list(ckpt["model"])
    old = {
        **ckpt,
        "model": as_format1(ckpt["model"]),
        "ema": as_format1(ckpt["ema"]),
        "opt": {**ckpt["opt"], **_format1_optimizer(ckpt["opt"], names, set())},
        "format": 1,
    }
    torch.save(old, tmp_path / "old" / "last.pt")
    assert "down_attn.0.qkv.weight" in torch.load(tmp_path / "old" / "last.pt")["model"]

    loaded = load_model(tmp_path / "old")
    assert list(loaded.model.state_dict()) == names
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key]), key
    reference = build_model(cfg, loaded.cond)
    reference.load_state_dict(ckpt["ema"])
    reference.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 400, 999]), torch.tensor([0, 2, -1])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t, y), reference(x, t, y))

    train(cfg, data, tmp_path / "old", resume=tmp_path / "old" / "last.pt", show_progress=False)
    assert losses_of(tmp_path / "old") == losses_of(tmp_path / "full")
    written = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    assert written["format"] == FORMAT_VERSION and list(written["model"]) == names
