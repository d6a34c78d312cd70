"""The memorisation audit (``ml.audit``) on the toy domain: planted exact, flipped and slightly
perturbed copies of training images are flagged; fresh real images (drawn from the same
distribution, never trained on, never used for the thresholds) are flagged no more often than
the calibrated rate allows, with a tolerance from the binomial spread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from ml.audit import audit_images, audit_table, flip_views, pixel_distances
from ml.data.images import DatasetSplit, load_split
from ml.data.toy import make_toy_images, write_toy_dataset
from ml.prototypes.encoder import ClipEncoder, EncoderSpec
from ml.prototypes.weights import TINY_MODEL
from ml.schemas.audit import AuditConfig, AuditReport

CLASSES = ["lymphocyte", "neutrophil"]
SIZE = 32
PLANTED = 6  # per kind and class


@pytest.fixture(scope="module")
def encoder() -> ClipEncoder:
    return ClipEncoder(EncoderSpec(TINY_MODEL, None), device="cpu", allow_untrained=True)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> DatasetSplit:
    root = write_toy_dataset(tmp_path_factory.mktemp("toy"), n_per_class=100, size=SIZE, seed=0)
    return load_split(root, n_per_class=40, n_heldout=60, image_size=SIZE, classes=CLASSES)


def fresh_real(n_per_class: int, seed: int = 7) -> tuple[torch.Tensor, list[str]]:
    """Real toy images of the same distribution that are in neither part of the split."""
    arr, labels = make_toy_images(n_per_class, size=SIZE, seed=seed)
    keep = [i for i, c in enumerate(labels) if c in CLASSES]
    images = torch.from_numpy(arr[keep]).permute(0, 3, 1, 2).contiguous()
    return images, [labels[i] for i in keep]


def planted(split: DatasetSplit) -> tuple[torch.Tensor, list[str], list[str]]:
    """Per class: exact copies, flipped copies and copies with small Gaussian pixel noise of
    training images. Small means below how close real toy cells get to each other: at 32x32
    the closest held-out lymphocytes are about 2% RMS from a training one, so noise of sd 1%
    (2.6 grey levels); noise of sd 2% already makes a copy as far as a different real cell."""
    gen = torch.Generator().manual_seed(0)
    images, classes, kinds = [], [], []
    for c, name in enumerate(split.classes):
        idx = torch.nonzero(split.train.labels == c).flatten()[: 3 * PLANTED]
        exact, flipped, noisy = idx[:PLANTED], idx[PLANTED : 2 * PLANTED], idx[2 * PLANTED :]
        images += [split.train.images[exact]]
        images += [split.train.images[flipped].flip(-1), split.train.images[flipped][:3].flip(-2)]
        src = split.train.images[noisy].float()
        noise = torch.randn(src.shape, generator=gen) * 0.01 * 255
        images += [(src + noise).round().clamp(0, 255).to(torch.uint8)]
        n_flip = PLANTED + 3
        classes += [name] * (PLANTED + n_flip + PLANTED)
        kinds += ["exact"] * PLANTED + ["flip"] * n_flip + ["noise"] * PLANTED
    return torch.cat(images), classes, kinds


@pytest.fixture(scope="module")
def report(split: DatasetSplit, encoder: ClipEncoder) -> tuple[AuditReport, list[str]]:
    copies, copy_classes, kinds = planted(split)
    fresh, fresh_classes = fresh_real(50)
    images = torch.cat([copies, fresh])
    kinds += ["fresh"] * len(fresh)
    rep = audit_images(images, copy_classes + fresh_classes, split, encoder, flips=True)
    return rep, kinds


def test_planted_copies_are_flagged(report: tuple[AuditReport, list[str]]) -> None:
    rep, kinds = report
    by_kind: dict[str, list[bool]] = {}
    for a, kind in zip(rep.images, kinds, strict=True):
        by_kind.setdefault(kind, []).append(a.flagged)
    assert all(by_kind["exact"]), "every exact copy is flagged"
    assert all(by_kind["flip"]), "flipped copies count: the model trains with random flips"
    assert np.mean(by_kind["noise"]) >= 0.8, "most slightly perturbed copies are flagged"
    for a, kind in zip(rep.images, kinds, strict=True):
        if kind == "exact":
            assert a.pixel.distance == 0.0 and "pixel" in a.flagged_by
            assert a.pixel.flip == "none" and a.pixel.nndr == 0.0
        if kind == "flip":
            assert a.pixel.distance == 0.0 and a.pixel.flip in ("h", "v")


def test_fresh_real_images_are_flagged_at_the_calibrated_rate(
    report: tuple[AuditReport, list[str]],
) -> None:
    """Fresh real images are exchangeable with the calibration images, so each is flagged with
    probability at most the expected rate (k / (n+1) per space, summed); the count over all of
    them may exceed the mean only by the binomial spread: allow its 99.9% quantile."""
    rep, kinds = report
    expected = max(c.calibration.expected_false_flag_rate for c in rep.per_class)
    assert expected <= 2 * 0.05 + 1e-9  # n = 30 per class: k = 1, 1/31 per space
    fresh = [a.flagged for a, k in zip(rep.images, kinds, strict=True) if k == "fresh"]
    assert sum(fresh) <= binom.ppf(0.999, len(fresh), expected), (sum(fresh), len(fresh))
    # the held-out check half: the same bound, on the images the report itself measured
    t = rep.totals
    assert t.n_check == 60 and t.check_flagged <= binom.ppf(0.999, t.n_check, expected)
    assert t.check_upper95 is not None and t.check_upper95 >= (t.check_rate or 0)


def test_report_contents(report: tuple[AuditReport, list[str]], split: DatasetSplit) -> None:
    rep, _kinds = report
    assert rep.classes == CLASSES and rep.image_size == SIZE
    assert rep.flips == ["none", "h", "v", "hv"] and rep.encoder
    assert rep.n_train == dict.fromkeys(CLASSES, 40) and rep.n_heldout == dict.fromkeys(CLASSES, 60)
    for c in rep.per_class:
        cal = c.calibration
        assert (cal.n_calibration, cal.n_check, cal.rank) == (30, 30, 1)
        assert set(cal.thresholds) == {"pixel", "clip"} and cal.thresholds["pixel"] > 0
        assert cal.expected_false_flag_rate == pytest.approx(2 / 31)
        # copies pull the batch's median distance below the held-out one
        assert c.dcr_ratio["pixel"] is not None and c.dcr_ratio["pixel"] < 1.0
    flagged = rep.flagged()
    assert flagged and all(a.pixel.train_path in split.train.paths for a in flagged)
    text = audit_table(rep)
    assert "lymphocyte" in text and "flagged" in text and "no formal privacy guarantee" in text
    assert AuditReport.model_validate_json(rep.model_dump_json()) == rep  # the stored form


def test_pixel_distance_is_rms_of_unit_pixels() -> None:
    black = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    d = pixel_distances(flip_views(black, False), torch.cat([black, white]))
    assert d.shape == (1, 1, 2) and d[0, 0].tolist() == [0.0, 1.0]


def test_an_empty_batch_is_an_empty_audit(split: DatasetSplit) -> None:
    """No generated image: nothing flagged, the calibration still reported (the pixel space
    reshaped an empty tensor with -1 and failed before)."""
    empty = torch.zeros(0, *split.train.images.shape[1:], dtype=torch.uint8)
    assert pixel_distances(flip_views(empty, True), split.train.images).shape[1] == 0
    rep = audit_images(empty, [], split, None, AuditConfig(spaces=("pixel",)), flips=True)
    assert rep.images == [] and rep.totals.n_images == 0 and rep.totals.n_flagged == 0


def test_pixel_only_audit_needs_no_encoder(split: DatasetSplit) -> None:
    copies, classes, _ = planted(split)
    rep = audit_images(copies, classes, split, None, AuditConfig(spaces=("pixel",)), flips=False)
    assert rep.encoder == "" and rep.flips == ["none"]
    # without flips, flipped copies are no longer exact matches (the model did not learn them)
    flagged = [a for a in rep.images if a.flagged]
    assert len(flagged) >= 2 * PLANTED and all(a.flagged_by == ["pixel"] for a in flagged)


def test_bad_inputs_are_clear_errors(split: DatasetSplit, tmp_path: Path) -> None:
    images, classes, _ = planted(split)
    with pytest.raises(ValueError, match="training split has"):
        audit_images(
            images, ["basophil"] * len(images), split, None, AuditConfig(spaces=("pixel",))
        )
    small = images[:, :, :16, :16].contiguous()
    with pytest.raises(ValueError, match="model's image size"):
        audit_images(small, classes, split, None, AuditConfig(spaces=("pixel",)))
    with pytest.raises(ValueError, match="needs an encoder"):
        audit_images(images, classes, split, None)
