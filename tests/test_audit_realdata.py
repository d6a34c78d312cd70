"""The memorisation audit on real images (derm64: HAM10000 lesions, cells64: PBC blood cells):
training images planted among generated stand-ins are flagged, and real held-out images the
thresholds never saw are flagged no more often than calibrated (plus the binomial spread).

Uses the untrained ``protomed-tiny-vit`` encoder (no weights offline): the pixel-space audit is
what these numbers measure; CLIP space here is random features."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binom

from ml.audit import audit_images
from ml.data.images import load_split
from ml.prototypes.encoder import TINY_MODEL, ClipEncoder, EncoderSpec

CLASSES = {"derm64": ["mel", "nv"], "cells64": ["lymphocyte", "neutrophil"]}


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["derm64", "cells64"])
def test_planted_copies_among_real_images_are_flagged(name, real_data) -> None:
    split = load_split(
        real_data / name, n_per_class=30, n_heldout=40, image_size=64, classes=CLASSES[name]
    )
    gen = torch.Generator().manual_seed(0)
    planted, classes, kinds = [], [], []
    for c, cls in enumerate(split.classes):
        idx = torch.nonzero(split.train.labels == c).flatten()[:10]
        planted += [split.train.images[idx[:4]], split.train.images[idx[4:7]].flip(-1)]
        src = split.train.images[idx[7:]].float()
        noisy = src + torch.randn(src.shape, generator=gen) * 0.01 * 255
        planted.append(noisy.round().clamp(0, 255).to(torch.uint8))
        classes += [cls] * 10
        kinds += ["exact"] * 4 + ["flip"] * 3 + ["noise"] * 3
    encoder = ClipEncoder(EncoderSpec(TINY_MODEL, None), device="cpu", allow_untrained=True)
    rep = audit_images(torch.cat(planted), classes, split, encoder, flips=True)
    flags = {
        k: [a.flagged for a, kk in zip(rep.images, kinds, strict=True) if kk == k]
        for k in ("exact", "flip", "noise")
    }
    assert all(flags["exact"]) and all(flags["flip"]), flags
    assert sum(flags["noise"]) >= 5, flags  # most of the 6 slightly perturbed copies
    expected = max(c.calibration.expected_false_flag_rate for c in rep.per_class)
    t = rep.totals
    assert t.n_check == 40 and t.check_flagged <= binom.ppf(0.999, t.n_check, expected), t
    for c in rep.per_class:
        assert c.calibration.n_calibration == 20 and c.dcr_ratio["pixel"] < 1.0
    print(
        name,
        {c.class_name: c.calibration.thresholds for c in rep.per_class},
        f"check flagged {t.check_flagged}/{t.n_check}",
    )
