"""Downstream utility experiment: backbones, a learnable toy problem, determinism, scores
checked against sklearn and by hand, input checks, the Tables 5-6 rows (ml.schemas.evaluation)."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from ml.data.images import ImageSet
from ml.errors import NotFound
from ml.evaluation.downstream import (
    DownstreamConfig,
    _flip,
    downstream_experiment,
    evaluate_classifier,
    make_classifier,
    train_classifier,
)
from ml.schemas.evaluation import DownstreamResult, downstream_table, tables_text

CLASSES = ["red", "blue"]


def _colour_set(
    n_per_class: int, size: int = 24, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy reddish vs bluish uint8 images: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(n_per_class)
    base = torch.tensor([[170.0, 60.0, 80.0], [60.0, 80.0, 170.0]])[labels]  # (N, 3)
    noise = torch.randn(len(labels), 3, size, size, generator=gen) * 40
    images = (base[:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


FAST = DownstreamConfig(epochs=4, batch_size=8, image_size=24, lr=3e-3)


# ---------------------------------------------------------------- models


def test_small_and_resnet18_shapes():
    x = torch.randn(2, 3, 64, 64)
    for backbone in ("small", "resnet18"):
        net = make_classifier(backbone, 5).eval()
        assert net(x).shape == (2, 5)
    assert make_classifier("small", 3).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert sum(p.numel() for p in make_classifier("small", 2).parameters()) < 1_000_000


def test_resnext50_shape_and_size():
    net = make_classifier("resnext50", 7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    # 25,028,904 with ImageNet's 1000-way fc; the head swap leaves 22,979,904 + 2048*7 + 7
    assert sum(p.numel() for p in net.parameters()) == 22_979_904 + 2048 * 7 + 7


def test_local_weights_load_everything_but_fc(tmp_path):
    donor = make_classifier("resnet18", 2)
    donor.fc = nn.Linear(512, 1000)  # an ImageNet-shaped file
    torch.save(donor.state_dict(), tmp_path / "r18.pt")
    net = make_classifier("resnet18", 3, weights=tmp_path / "r18.pt")
    assert torch.equal(net.conv1.weight, donor.conv1.weight)
    assert net.fc.out_features == 3

    torch.save(make_classifier("small", 2).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit this backbone"):
        make_classifier("resnet18", 3, weights=tmp_path / "small.pt")
    with pytest.raises(NotFound):
        make_classifier("resnext50", 3, weights=tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="no pretrained weights"):
        make_classifier("small", 3, weights=tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="unknown backbone"):
        make_classifier("vit", 3)


def test_config_is_typed():
    assert DownstreamConfig().backbone == "small" and DownstreamConfig().epochs == 30
    with pytest.raises(pydantic.ValidationError):
        DownstreamConfig(backbone="vgg")
    with pytest.raises(pydantic.ValidationError):
        DownstreamConfig(epoch=3)  # typo: extra fields are refused


# ---------------------------------------------------------------- training


def test_small_cnn_learns_colour_classes():
    train = _colour_set(20, seed=0)
    test_images, test_labels = _colour_set(15, seed=1)
    model = train_classifier(train, FAST)
    scores = evaluate_classifier(model, test_images, test_labels, CLASSES)
    assert scores["f1"] > 0.9, scores


def test_training_is_deterministic_and_leaves_global_rng_alone():
    train = _colour_set(10, seed=2)
    test_images, _ = _colour_set(10, seed=3)
    cfg = FAST.model_copy(update={"epochs": 2})
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    state = torch.get_rng_state()
    a = train_classifier(train, cfg)
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be changed
    torch.manual_seed(456)
    b = train_classifier(train, cfg)
    c = train_classifier(train, cfg.model_copy(update={"seed": 1}))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.net[0][0].weight, c.net[0][0].weight)  # the seed matters
    with torch.no_grad():
        assert torch.equal(a(test_images), b(test_images))


def test_flips_cover_all_four_orientations():
    x = torch.arange(27.0).view(1, 3, 3, 3).repeat(64, 1, 1, 1)  # no symmetry: 4 distinct
    out = _flip(x, torch.Generator().manual_seed(0))
    kinds = [x[0], x[0].flip(-1), x[0].flip(-2), x[0].flip(-1, -2)]
    seen = [next(i for i, k in enumerate(kinds) if torch.equal(o, k)) for o in out]
    assert sorted(set(seen)) == [0, 1, 2, 3]
    assert torch.equal(out, _flip(x, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- evaluation


class _Fixed(nn.Module):
    """Predicts the class written into each image's first pixel."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(images[:, 0, 0, 0].long(), 4).float()


def test_evaluate_classifier_matches_hand_and_sklearn():
    y_true = np.array([0, 0, 0, 1, 1, 2])  # unequal supports: macro differs from weighted
    y_pred = np.array([0, 1, 1, 1, 0, 0])  # class 2 never predicted
    images = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.from_numpy(y_pred).to(torch.uint8)
    got = evaluate_classifier(_Fixed(), images, torch.from_numpy(y_true), ["a", "b", "c"])
    # by hand: P = (1/3, 1/3, 0), R = (1/3, 1/2, 0), F1 = (1/3, 2/5, 0)
    assert got["precision"] == pytest.approx(2 / 9)
    assert got["recall"] == pytest.approx(5 / 18)
    assert got["f1"] == pytest.approx(11 / 45)
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert got["confusion"] == [[1, 2, 0], [1, 1, 0], [1, 0, 0]]
    assert got["support"] == [3, 2, 1]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, c in enumerate("abc"):
        assert got["per_class"][c] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    # a class absent from the test set still gets its row, column and a 0 in the macro mean
    four = evaluate_classifier(_Fixed(), images, torch.from_numpy(y_true), ["a", "b", "c", "d"])
    assert four["support"] == [3, 2, 1, 0] and len(four["confusion"]) == 4
    assert four["confusion"][0] == [1, 2, 0, 0] and four["confusion"][3] == [0, 0, 0, 0]
    assert four["f1"] == pytest.approx(11 / 60)


# ---------------------------------------------------------------- the experiment


def test_experiment_rejects_bad_sets():
    good = _colour_set(4)
    images, labels = good
    only_red = (images[:4], labels[:4])
    cfg = FAST.model_copy(update={"epochs": 1})
    with pytest.raises(ValueError, match=r"training set 'baseline' has no training images.*blue"):
        downstream_experiment({"real": good, "baseline": only_red}, good, CLASSES, cfg)
    with pytest.raises(ValueError, match=r"test set has no test images.*blue"):
        downstream_experiment({"real": good}, only_red, CLASSES, cfg)
    other = ImageSet(images, labels, ["nevus", "melanoma"], [""] * 8, [""] * 8)
    with pytest.raises(ValueError, match=r"'prototype' has classes \['nevus', 'melanoma'\]"):
        downstream_experiment({"prototype": other}, good, CLASSES, cfg)
    with pytest.raises(ValueError, match="labels must index"):
        downstream_experiment({"real": (images, labels + 1)}, good, CLASSES, cfg)


def test_experiment_summary_and_tables():
    cfg = DownstreamConfig(epochs=1, batch_size=8, image_size=16)
    sets = {name: _colour_set(4, size=16, seed=i) for i, name in enumerate(["prototype", "real"])}
    sets["baseline"] = ImageSet(*_colour_set(4, size=16, seed=5), CLASSES, [""] * 8, [""] * 8)
    res = downstream_experiment(sets, _colour_set(3, size=16, seed=9), CLASSES, cfg, seeds=(0, 1))
    assert res["seeds"] == [0, 1] and res["n_test"] == 6 and res["classes"] == CLASSES
    for entry in res["sets"].values():
        assert entry["n_train"] == 8 and [r["seed"] for r in entry["runs"]] == [0, 1]
        f1s = [r["f1"] for r in entry["runs"]]
        assert entry["mean"]["f1"] == pytest.approx(np.mean(f1s))
        assert entry["std"]["f1"] == pytest.approx(np.std(f1s, ddof=1))
        assert set(entry["per_class_f1"]) == set(CLASSES)
    table = downstream_table(DownstreamResult.model_validate(res))  # the result is typed
    labels = [row[0] for row in table.rows]
    assert labels[:3] == ["real", "baseline", "prototype"]  # the paper's order
    assert labels[3].startswith("chance: uniform guess") and labels[4] == "chance: majority class"
    assert res["chance"]["majority"]["f1"] == pytest.approx((2 * 0.5 / 1.5) / 2)  # 3 + 3 test


def test_tables_5_6_formats_percent():
    def entry(m: float, s: float) -> dict:
        keys = ("precision", "recall", "f1", "accuracy")
        return {
            "n_train": 8,
            "runs": [],
            "per_class_f1": {},
            "mean": dict.fromkeys(keys, m),
            "std": dict.fromkeys(keys, s),
        }

    res = {
        "classes": CLASSES,
        "n_test": 40,
        "seeds": [0, 1, 2],
        "config": {},
        "sets": {"prototype": entry(0.912, 0.0123), "real": entry(0.95, 0.0)},
    }
    table = downstream_table(DownstreamResult.model_validate(res), "40 held-out real images")
    assert "40 held-out real images" in table.title and "3 seed(s)" in table.title
    assert table.rows[0][0] == "real"
    assert table.rows[1] == ["prototype", *["91.20", "1.23"] * 3, "8"]
    text = tables_text([table])
    assert text.splitlines()[-1].split() == table.rows[1]
