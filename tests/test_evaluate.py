"""``protomed evaluate`` end to end on the toy domain at a tiny size: synthetic sets of the real
set's size per class, the downstream classifier on real/baseline/prototype over two seeds,
CLIP-space metrics, the toy checker; the clear error without held-out images; an external test
set (``--test-data``) used for every score, and the clear errors when its classes do not match
or it holds the models' own images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ml.cli import app
from ml.data.toy import TOY_CLASSES, write_toy_dataset
from ml.schemas.evaluation import EvaluationResult, evaluation_tables, tables_text

runner = CliRunner()
TINY_ENCODER = ["--encoder", "protomed-tiny-vit", "--untrained", "--no-cache"]
TINY_MODEL = ["--preset", "tiny", "--set", "max_steps=3", "--set", "batch_size=8"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def trained_pair(tmp: Path, heldout: int) -> Path:
    data = write_toy_dataset(tmp / "data", n_per_class=8, size=32, seed=0)
    r = invoke(
        "prototypes",
        data,
        "--out",
        tmp / "cb",
        "--n-per-class",
        5,
        "--heldout",
        heldout,
        "--epochs",
        5,
        "--image-size",
        32,
        *TINY_ENCODER,
    )
    assert r.exit_code == 0, r.output
    for mode in ("prototype", "baseline"):
        r = invoke(
            "train", "--out", tmp / mode, "--mode", mode, "--codebook", tmp / "cb", *TINY_MODEL
        )
        assert r.exit_code == 0, r.output
    return tmp


def evaluate_args(tmp: Path) -> list[object]:
    return [
        "evaluate",
        "--baseline",
        tmp / "baseline",
        "--prototype",
        tmp / "prototype",
        "--codebook",
        tmp / "cb",
        "--out",
        tmp / "eval.json",
        "--seeds",
        "0,1",
        "--epochs",
        2,
        "--steps",
        3,
        *TINY_ENCODER,
    ]


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
    typed = EvaluationResult.model_validate(result)  # the JSON file is the typed result
    assert typed.test_set is not None and typed.test_set.source == "held-out"
    assert typed.test_set.total == 15 and typed.reference == "real training images"
    assert tables_text(evaluation_tables(typed)) in r.output  # the printed table is the file's
    # what a user at the terminal needs: each stage as it starts, the feature space named with
    # its caveat, the chance levels beside the F1s, and no seed the classifiers did not use
    for stage in (
        "generate baseline",
        "generate prototype",
        "embed real and synthetic images",
        "train classifiers (real, baseline, prototype x 2 seeds)",
    ):
        assert f"[evaluate] {stage} ..." in r.output, r.output
    assert "UNTRAINED protomed-tiny-vit space (random features" in r.output
    assert "CLIP space" not in r.output
    assert "chance: uniform guess" in r.output and "chance: majority class" in r.output
    assert result["downstream"]["config"]["seed"] is None and result["downstream"]["seeds"] == [
        0,
        1,
    ]


@pytest.mark.slow
def test_evaluate_on_an_external_test_set(tmp_path: Path) -> None:
    """Every score is measured on the external folder: its size (4 per class, not the 3
    held out), the classifiers' test set, the CLIP-space reference; an extra class folder of
    the test set is ignored and said so."""
    tmp = trained_pair(tmp_path, heldout=3)
    ext = write_toy_dataset(tmp / "external", n_per_class=4, size=32, seed=7)
    shutil.copytree(ext / TOY_CLASSES[0], ext / "platelet")  # a class the models do not know
    r = invoke(*evaluate_args(tmp), "--test-data", ext, "--test-name", "site-b")
    assert r.exit_code == 0, r.output
    result = EvaluationResult.model_validate_json((tmp / "eval.json").read_text())
    test = result.test_set
    assert test is not None and test.source == "external" and test.path == str(ext.resolve())
    assert test.n_per_class == dict.fromkeys(result.classes, 4) and test.total == 20
    assert test.ignored_classes == ["platelet"] and "platelet" in r.output
    assert result.n_heldout == dict.fromkeys(result.classes, 3)  # recorded, not tested on
    assert result.downstream.n_test == 20
    runs = result.downstream.sets["prototype"].runs
    assert all(sum(run.support) == 20 for run in runs)  # the classifiers saw the 20
    assert result.reference == "external test set site-b"  # the name given, not the folder's
    assert set(result.distribution) == {"real train", "baseline", "prototype"}
    assert result.distribution["real train"].overall.n_real == 20  # the reference: external
    assert result.distribution["real train"].overall.n_fake == 25  # the 5 x 5 training images
    assert result.distribution["prototype"].overall.n_real == 20
    assert "20 real images of the external test set site-b" in r.output
    r = invoke(*evaluate_args(tmp), "--test-data", ext)  # no name given: the folder's path
    assert r.exit_code == 0, r.output
    named = EvaluationResult.model_validate_json((tmp / "eval.json").read_text())
    assert named.test_set is not None and named.test_set.name == str(ext)


def test_external_test_set_errors(tmp_path: Path) -> None:
    """A test set lacking a model class, or holding the models' own images, is refused with one
    clear line before anything is generated."""
    tmp = trained_pair(tmp_path, heldout=3)
    partial = write_toy_dataset(tmp / "partial", n_per_class=4, size=32, seed=7)
    shutil.rmtree(partial / TOY_CLASSES[1])
    r = invoke(*evaluate_args(tmp), "--test-data", partial)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and f"class(es) ['{TOY_CLASSES[1]}']" in r.output
    assert "it must have every one of" in r.output and "Traceback" not in r.output
    r = invoke(*evaluate_args(tmp), "--test-data", tmp / "data")  # the models' own folder
    assert r.exit_code == 2 and "pixel-identical" in r.output, r.output
    assert not (tmp / "eval.json").exists()


def test_evaluate_without_heldout_images_is_a_clear_error(tmp_path: Path) -> None:
    tmp = trained_pair(tmp_path, heldout=0)
    r = invoke(*evaluate_args(tmp))
    assert r.exit_code == 2
    assert "no held-out real images" in r.output and "n_heldout" in r.output
    assert "Traceback" not in r.output
