"""The core on the real shared datasets (derm64: HAM10000, cells64: PBC blood cells).

Uses the untrained ``protomed-tiny-vit`` open_clip encoder (no weights exist offline, and the
real ViT-L-14 is too slow for CI on 2 cores): this checks the pipeline on real images, not the
quality of CLIP features.
"""

from __future__ import annotations

import pytest
import torch

from ml.config import SampleConfig, make_config
from ml.diffusion.sample import sample_to_folder
from ml.models.checkpoint import load_model, read_checkpoint
from ml.pipeline import learn_prototypes, train_model
from ml.prototypes.cpl import Codebook, CPLConfig
from ml.prototypes.encoder import TINY_MODEL, EncoderSpec

EXPECTED = {
    "derm64": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
    "cells64": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "ig",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
}


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


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluate_on_an_external_set_of_unseen_real_images(real_data, tmp_path):
    """An external test set built at test time from cells64 images the models never saw (not in
    their split, neither trained on nor held out): every score is measured on it, at its size."""
    import shutil

    from ml.data.images import scan
    from ml.evaluation.evaluate import evaluate
    from ml.prototypes.encoder import ClipEncoder
    from ml.schemas.evaluation import DownstreamConfig, EvalConfig

    classes = EXPECTED["cells64"]
    run = learn_prototypes(
        {"root": real_data / "cells64", "n_per_class": 12, "n_heldout": 3, "image_size": 64},
        tmp_path / "cb",
        encoder_spec=EncoderSpec(TINY_MODEL, None),
        cpl=CPLConfig(epochs=5),
        allow_untrained=True,
    )
    used = {str(p) for p in run.split.train.paths + run.split.heldout.paths}
    external = tmp_path / "external"
    per_class = 5
    for cls, files in scan(real_data / "cells64").items.items():
        unseen = [p for p in files if str(p) not in used][:per_class]
        (external / cls).mkdir(parents=True)
        for p in unseen:
            shutil.copy(p, external / cls / p.name)  # copies: nothing committed, nothing linked
    book = Codebook.load(tmp_path / "cb")
    over = {"image_size": 32, "max_steps": 2, "batch_size": 8, "class_dim": book.dim}
    models = {}
    for mode in ("baseline", "prototype"):
        cfg = make_config("tiny", {**over, "mode": mode})
        models[mode] = load_model(
            train_model(cfg, tmp_path / mode, codebook=book, show_progress=False)
        )
    cfg = EvalConfig(
        n_per_class=2,
        steps=2,
        seeds=(0,),
        batch_size=16,
        downstream=DownstreamConfig(epochs=1, batch_size=32),
    )
    encoder = ClipEncoder(EncoderSpec(TINY_MODEL, None), allow_untrained=True)
    result = evaluate(models, encoder, cfg, codebook=book, test_data=external)
    test = result.test_set
    assert test is not None and test.source == "external" and test.path == str(external.resolve())
    assert test.n_per_class == dict.fromkeys(classes, per_class) and test.ignored_classes == []
    assert result.downstream.n_test == per_class * len(classes) == test.total
    assert result.n_heldout == dict.fromkeys(classes, 3)  # not what was tested on
    assert all(
        sum(r.support) == test.total for s in result.downstream.sets.values() for r in s.runs
    )
    assert result.distribution["real train"].overall.n_real == test.total
    assert result.distribution["real train"].overall.n_fake == 12 * len(classes)
