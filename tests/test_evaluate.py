"""``protomed evaluate`` end to end on the toy domain at a tiny size: synthetic sets of the real
set's size per class, the downstream classifier on real/baseline/prototype over two seeds,
CLIP-space metrics, the toy checker; and the clear error without held-out images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ml.cli import app
from ml.toy import write_toy_dataset

runner = CliRunner()
TINY_ENCODER = ["--encoder", "protomed-tiny-vit", "--untrained", "--no-cache"]
TINY_MODEL = ["--preset", "tiny", "--set", "max_steps=3", "--set", "batch_size=8"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def trained_pair(tmp: Path, heldout: int) -> Path:
    data = write_toy_dataset(tmp / "data", n_per_class=8, size=32, seed=0)
    r = invoke("prototypes", data, "--out", tmp / "cb", "--n-per-class", 5, "--heldout", heldout,
               "--epochs", 5, "--image-size", 32, *TINY_ENCODER)  # fmt: skip
    assert r.exit_code == 0, r.output
    for mode in ("prototype", "baseline"):
        r = invoke("train", "--out", tmp / mode, "--mode", mode, "--codebook", tmp / "cb",
                   *TINY_MODEL)  # fmt: skip
        assert r.exit_code == 0, r.output
    return tmp


def evaluate_args(tmp: Path) -> list[object]:
    return ["evaluate", "--baseline", tmp / "baseline", "--prototype", tmp / "prototype",
            "--codebook", tmp / "cb", "--out", tmp / "eval.json", "--seeds", "0,1",
            "--epochs", 2, "--steps", 3, *TINY_ENCODER]  # fmt: skip


@pytest.mark.slow
def test_evaluate_on_the_toy_domain(tmp_path: Path) -> None:
    tmp = trained_pair(tmp_path, heldout=3)
    r = invoke(*evaluate_args(tmp))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp / "eval.json").read_text())
    classes = result["classes"]
    assert len(classes) == 5 and result["n_train"] == dict.fromkeys(classes, 5)
    assert result["n_heldout"] == dict.fromkeys(classes, 3)
    sets = result["downstream"]["sets"]
    assert list(sets) == ["real", "baseline", "prototype"]
    for name, entry in sets.items():
        assert entry["n_train"] == 25, name  # equal size per class for all three
        assert len(entry["runs"]) == 2 and 0.0 <= entry["mean"]["f1"] <= 1.0
        assert entry["runs"][0]["confusion"] and len(entry["runs"][0]["confusion"]) == 5
    assert result["downstream"]["n_test"] == 15
    dist = result["distribution"]
    assert set(dist) == {"real held-out", "baseline", "prototype"}
    assert dist["prototype"]["overall"]["n_fake"] == 25
    assert 0.0 <= dist["prototype"]["overall"]["consistency"] <= 1.0
    assert dist["baseline"]["overall"]["fd"] > 0
    toy = result["toy_plausibility"]
    assert set(toy) == {"real", "baseline", "prototype"} and set(toy["real"]) == set(classes)
    assert toy["real"]["lymphocyte"] == 1.0  # real toy cells pass the checker
    assert "real" in r.output and "prototype" in r.output and "FD" in r.output


def test_evaluate_without_heldout_images_is_a_clear_error(tmp_path: Path) -> None:
    tmp = trained_pair(tmp_path, heldout=0)
    r = invoke(*evaluate_args(tmp))
    assert r.exit_code == 2
    assert "no held-out real images" in r.output and "n_heldout" in r.output
    assert "Traceback" not in r.output
