"""The core on the real shared datasets (derm64: HAM10000, cells64: PBC blood cells).

Uses the untrained ``protomed-tiny-vit`` open_clip encoder (no weights exist offline, and the
real ViT-L-14 is too slow for CI on 2 cores): this checks the pipeline on real images, not the
quality of CLIP features.
"""

from __future__ import annotations

import pytest
import torch

from ml.checkpoint import load_model, read_checkpoint
from ml.config import SampleConfig, make_config
from ml.encoder import TINY_MODEL, EncoderSpec
from ml.pipeline import learn_prototypes, train_model
from ml.prototypes import Codebook, CPLConfig
from ml.sample import sample_to_folder

EXPECTED = {
    "derm64": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "cells64": [
        "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
        "platelet",
    ],
}  # fmt: skip


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["derm64", "cells64"])
def test_real_dataset_through_the_core(name, real_data, tmp_path):
    run = learn_prototypes(
        {"root": real_data / name, "n_per_class": 12, "n_heldout": 6, "image_size": 64},
        tmp_path / "cb",
        encoder_spec=EncoderSpec(TINY_MODEL, None),
        cpl=CPLConfig(k=2, epochs=30),
        allow_untrained=True,
    )
    classes = EXPECTED[name]
    assert run.split.classes == classes
    assert run.split.train.per_class_counts() == dict.fromkeys(classes, 12)
    assert run.split.skipped == []
    rep = run.report.to_dict()
    assert rep["n_train"] == 12 * len(classes) and rep["n_heldout"] == 6 * len(classes)
    assert rep["majority_acc"] == pytest.approx(1 / len(classes), abs=1e-6)
    book = Codebook.load(tmp_path / "cb")
    assert book.prototypes.shape == (len(classes), 2, book.dim)

    over = {"image_size": 32, "max_steps": 2, "batch_size": 8, "class_dim": book.dim}
    for mode in ("prototype", "baseline"):
        cfg = make_config("tiny", {**over, "mode": mode})
        ckpt = train_model(cfg, tmp_path / mode, codebook=book, show_progress=False)
        state = read_checkpoint(ckpt)["model"]["class_embed.weight"]
        if mode == "prototype":
            assert torch.equal(state, book.table()), "frozen table must equal the codebook"
        else:
            assert state.shape == (len(classes), book.dim)
        loaded = load_model(ckpt)
        res = sample_to_folder(loaded, tmp_path / f"s_{mode}", 2, SampleConfig(steps=3))
        assert sorted(res.images) == classes
        assert all(v.shape == (2, 3, 32, 32) for v in res.images.values())
