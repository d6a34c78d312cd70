"""Toy cytology domain: the drawer is deterministic and the rule-based checker accepts its own
classes, rejects other classes, garbage and heavy blur, so later stages can be tested without a
human reviewer."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ml.data import toy
from ml.data.toy import CRITERIA, TOY_CLASSES, CriterionResult, Verdict

N = 50  # images per class in the rate tests


def _by_class(images: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    return {c: images[[lab == c for lab in labels]] for c in TOY_CLASSES}


@pytest.fixture(scope="module")
def cells64() -> dict[str, np.ndarray]:
    return _by_class(*toy.make_toy_images(N, size=64, seed=11))


@pytest.fixture(scope="module")
def verdicts64(cells64) -> dict[tuple[str, str], list[Verdict]]:
    """(drawn class, expected class) -> verdicts, every pair checked once and shared."""
    return {(a, b): toy.check_images(cells64[a], b) for a in TOY_CLASSES for b in TOY_CLASSES}


def _rate(verdicts: list[Verdict]) -> float:
    return sum(v.plausible for v in verdicts) / len(verdicts)


def _median(verdicts: list[Verdict], criterion: str) -> float:
    return float(np.median([v.values[criterion] for v in verdicts]))


def test_classes_and_specs_are_consistent():
    assert len(TOY_CLASSES) == 5 and set(toy.SPECS) == set(TOY_CLASSES)
    for name, spec in toy.SPECS.items():
        assert spec.name == name and set(spec.description) == set(CRITERIA)
        assert spec.radius[0] < spec.radius[1] and spec.nc_ratio[0] < spec.nc_ratio[1]


def test_drawing_is_deterministic_per_seed():
    a, la = toy.make_toy_images(2, size=64, seed=3)
    b, lb = toy.make_toy_images(2, size=64, seed=3)
    c, _ = toy.make_toy_images(2, size=64, seed=4)
    assert a.shape == (10, 64, 64, 3) and a.dtype == np.uint8
    assert la == lb == [cls for cls in TOY_CLASSES for _ in range(2)]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    one = toy.draw_cell("monocyte", np.random.default_rng(0), size=32)
    assert one.shape == (32, 32, 3) and one.dtype == np.uint8


@pytest.mark.parametrize("variant", ["64", "64->32 bilinear", "drawn at 32"])
def test_each_class_passes_its_own_check(variant, cells64, verdicts64):
    for cls in TOY_CLASSES:
        if variant == "64":
            verdicts = verdicts64[(cls, cls)]
        else:
            if variant == "drawn at 32":
                rng = np.random.default_rng(100 + TOY_CLASSES.index(cls))
                images = [toy.draw_cell(cls, rng, size=32) for _ in range(N)]
            else:
                images = [
                    np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR))
                    for im in cells64[cls]
                ]
            verdicts = toy.check_images(images, cls)
        fails = Counter(name for v in verdicts for name in v.failed)
        assert _rate(verdicts) >= 0.95, (variant, cls, _rate(verdicts), dict(fails))


def test_other_classes_are_rejected(verdicts64):
    worst = max(
        (_rate(verdicts64[(a, b)]), a, b) for a in TOY_CLASSES for b in TOY_CLASSES if a != b
    )
    assert worst[0] <= 0.10, f"{worst[1]} images pass as {worst[2]} at rate {worst[0]:.2f}"


def test_each_criterion_measures_a_real_difference(verdicts64):
    v = {cls: verdicts64[(cls, cls)] for cls in TOY_CLASSES}
    assert _median(v["lymphocyte"], "nc_ratio") > _median(v["neutrophil"], "nc_ratio") + 0.15
    assert _median(v["monocyte"], "cell_size") > _median(v["lymphocyte"], "cell_size") + 0.1
    assert _median(v["neutrophil"], "nucleus_lobes") >= 3
    assert _median(v["eosinophil"], "nucleus_lobes") == 2
    assert _median(v["lymphocyte"], "nucleus_lobes") == 1
    assert _median(v["eosinophil"], "granules") > 0.3
    assert _median(v["basophil"], "granules") > 0.3
    assert abs(_median(v["neutrophil"], "granules")) < 0.05
    lymph_as_mono = verdicts64[("lymphocyte", "monocyte")]
    assert _median(lymph_as_mono, "cytoplasm_colour") > toy.COLOUR_TOL
    # Every criterion, on its own, rejects the majority of some other class.
    for criterion in CRITERIA:
        assert any(
            np.mean([criterion in x.failed for x in verdicts64[(a, b)]]) > 0.5
            for a in TOY_CLASSES
            for b in TOY_CLASSES
            if a != b
        ), criterion


def test_granule_measure_tracks_granules(cells64):
    """Painting the granules out of eosinophils/basophils must fail exactly that criterion."""
    for cls in ("eosinophil", "basophil"):
        spec = toy.SPECS[cls]
        palette = np.array([spec.cytoplasm_rgb, spec.granule_rgb, toy.NUCLEUS, toy.BACKGROUND])
        for image in cells64[cls][:5]:
            nearest = np.linalg.norm(image[..., None, :] - palette, axis=-1).argmin(-1)
            bare = image.copy()
            bare[nearest == 1] = spec.cytoplasm_rgb
            assert toy.check_image(image, cls).plausible
            assert "granules" in toy.check_image(bare, cls).failed, cls


def test_small_colour_drift_is_tolerated(cells64):
    """Generated images drift in colour a little; that alone must not flip verdicts."""
    for shift in [(6, -6, 6), (-6, 6, -6)]:
        for cls in TOY_CLASSES:
            shifted = np.clip(cells64[cls][:20].astype(int) + shift, 0, 255).astype(np.uint8)
            assert toy.plausibility(shifted, cls) >= 0.9, (shift, cls)


def test_blank_noise_and_heavy_blur_fail(cells64):
    rng = np.random.default_rng(0)
    blank = np.clip(np.array(toy.BACKGROUND) + rng.normal(0, 2, (64, 64, 3)), 0, 255)
    noise = rng.integers(0, 256, (64, 64, 3))
    for cls in TOY_CLASSES:
        for bad in (blank.astype(np.uint8), noise.astype(np.uint8)):
            assert not toy.check_image(bad, cls).plausible, cls
        blurred = [ndimage.gaussian_filter(im, sigma=(8, 8, 0)) for im in cells64[cls][:10]]
        assert toy.plausibility(blurred, cls) == 0.0, cls
        mild = [ndimage.gaussian_filter(im, sigma=(1, 1, 0)) for im in cells64[cls][:10]]
        assert toy.plausibility(mild, cls) >= 0.9, cls


def test_one_failed_criterion_makes_an_image_implausible(verdicts64):
    ok = [CriterionResult(name, 1.0, 0.0, 2.0, True) for name in CRITERIA]
    assert Verdict("lymphocyte", tuple(ok)).plausible
    for i, name in enumerate(CRITERIA):
        one_bad = list(ok)
        one_bad[i] = CriterionResult(name, 3.0, 0.0, 2.0, False)
        verdict = Verdict("lymphocyte", tuple(one_bad))
        assert not verdict.plausible and verdict.failed == [name]
    for verdicts in verdicts64.values():  # the same rule holds for measured verdicts
        for v in verdicts:
            assert (
                v.plausible == (not v.failed) == all(c.low <= c.value <= c.high for c in v.criteria)
            )


def test_accepts_chw_pil_and_other_sizes(cells64):
    image = cells64["eosinophil"][0]
    assert toy.check_image(image, "eosinophil").plausible
    assert toy.check_image(image.transpose(2, 0, 1), "eosinophil").plausible
    assert toy.check_image(Image.fromarray(image).resize((128, 128)), "eosinophil").plausible
    assert toy.check_images(np.stack([image, image]), "eosinophil")[1].plausible
    assert toy.plausibility([], "eosinophil") == 0.0


def test_write_toy_dataset_layout_and_manifest(tmp_path):
    root = toy.write_toy_dataset(tmp_path / "toy", n_per_class=3, size=32, seed=5)
    assert root == tmp_path / "toy"
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [list(r) for r in rows[:1]] == [["image_id", "class"]] and len(rows) == 15
    assert Counter(r["class"] for r in rows) == dict.fromkeys(TOY_CLASSES, 3)
    images, _ = toy.make_toy_images(3, size=32, seed=5)
    for i, row in enumerate(rows):
        path = root / row["class"] / f"{row['image_id']}.png"
        assert row["image_id"] == f"{row['class']}_{i % 3:04d}"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), images[i])
    assert sorted(p.name for p in root.iterdir()) == sorted([*TOY_CLASSES, "manifest.csv"])


def test_unknown_class_names_the_valid_ones():
    image = np.zeros((64, 64, 3), np.uint8)
    calls = [
        lambda: toy.draw_cell("platelet", np.random.default_rng(0)),
        lambda: toy.check_image(image, "platelet"),
        lambda: toy.plausibility([image], "platelet"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"platelet.*lymphocyte.*basophil"):
            call()


def test_module_does_not_import_torch():
    code = "import sys, ml.data.toy; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
