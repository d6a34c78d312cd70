"""The learned domain encoder: a CNN trained jointly with the prototypes, saved beside the
codebook, loaded through the encoder interface, and kept out of the evaluation's feature space."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from ml.data.toy import write_toy_dataset
from ml.errors import NotFound
from ml.pipeline import learn_prototypes
from ml.prototypes.cpl import Codebook, CPLConfig
from ml.prototypes.encoder import TINY_MODEL, EmbeddingCache, EncoderSpec, embed
from ml.prototypes.learned_encoder import (
    LEARNED,
    DomainEncoderConfig,
    LearnedEncoder,
    augment,
    load_codebook_encoder,
    refuse_same_space,
    train_domain_encoder,
)

SMALL = DomainEncoderConfig(width=8, dim=16, input_size=16, epochs=3, batch_size=16)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "data", n_per_class=10, size=32)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _learn(toy, out, cfg=SMALL, **kw):
    return learn_prototypes(
        {"root": toy, "n_per_class": 6, "n_heldout": 4, "image_size": 32},
        out,
        encoder_spec=EncoderSpec(LEARNED, None),
        cpl=CPLConfig(epochs=20),
        domain=cfg,
        **kw,
    )


def test_artifact_round_trips_bit_identically(toy, tmp_path, one_thread):
    run = _learn(toy, tmp_path / "cb", cache=EmbeddingCache(tmp_path / "emb.sqlite"))
    tensors = (tmp_path / "cb" / "encoder.safetensors").read_bytes()
    identity = "learned:" + hashlib.sha256(tensors).hexdigest()
    assert run.codebook.encoder == identity == Codebook.load(tmp_path / "cb").encoder

    loaded = load_codebook_encoder(tmp_path / "cb", identity)
    assert loaded.identity == identity
    images = run.split.heldout.images
    fresh = LearnedEncoder.load(tmp_path / "cb").encode(images)
    assert torch.equal(loaded.encode(images), fresh), "load -> the same embeddings bit for bit"
    # Saved again, the same weights make the same file: the identity names the weights.
    assert loaded.save(tmp_path / "again") == identity
    assert (tmp_path / "again" / "encoder.safetensors").read_bytes() == tensors
    # The embeddings the codebook was fitted on were cached under that identity.
    with EmbeddingCache(tmp_path / "emb.sqlite") as cache:
        hit = cache.get_many(identity, run.split.heldout.hashes)
        assert len(hit) == len(set(run.split.heldout.hashes))
        assert torch.equal(embed(loaded, images, run.split.heldout.hashes, cache), fresh)

    meta = json.loads((tmp_path / "cb" / "encoder.json").read_text())
    assert meta["arch"] == "convnet4" and meta["config"]["seed"] == 0
    assert meta["config"]["epochs"] == SMALL.epochs and meta["training"]["kept_epoch"] >= 1
    assert meta["data"]["train_images"] == len(run.split.train)
    assert (
        meta["data"]["train_sha256"]
        == hashlib.sha256("\n".join(run.split.train.hashes).encode()).hexdigest()
    )


def test_training_is_deterministic_for_a_seed(toy, tmp_path, one_thread):
    a, b = _learn(toy, tmp_path / "a"), _learn(toy, tmp_path / "b")
    assert a.codebook.encoder == b.codebook.encoder
    assert torch.equal(a.codebook.prototypes, b.codebook.prototypes)
    c = _learn(toy, tmp_path / "c", cfg=SMALL.model_copy(update={"seed": 1}))
    assert c.codebook.encoder != a.codebook.encoder


def test_report_compares_with_the_untrained_network_and_a_probe(toy, tmp_path, one_thread):
    rep = _learn(toy, tmp_path / "cb").report.to_dict()
    assert rep["encoder_kind"] == LEARNED
    for key in (
        "nearest_prototype_acc",
        "untrained_nearest_prototype_acc",
        "logreg_acc",
        "untrained_logreg_acc",
    ):
        assert 0.0 <= rep[key] <= 1.0, key
    assert rep["encoder_training"]["selected_on"] == "budget (last epoch)"


def test_a_changed_artifact_is_refused(toy, tmp_path, one_thread):
    run = _learn(toy, tmp_path / "cb")
    path = tmp_path / "cb" / "encoder.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"corrupt learned encoder.*checksum"):
        LearnedEncoder.load(tmp_path / "cb")
    with pytest.raises(NotFound, match=r"encoder\.json missing"):
        LearnedEncoder.load(tmp_path)
    other = _learn(toy, tmp_path / "other", cfg=SMALL.model_copy(update={"seed": 2}))
    with pytest.raises(ValueError, match="was learned with"):
        load_codebook_encoder(tmp_path / "other", run.codebook.encoder)
    assert other.codebook.encoder != run.codebook.encoder


def test_augment_keeps_shape_and_range_and_follows_its_generator():
    x = torch.rand(5, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0), 0.1)
    b = augment(x, torch.Generator().manual_seed(0), 0.1)
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not torch.equal(a, x)


def test_evaluation_refuses_the_prototypes_learned_space():
    learned = "learned:" + "0" * 64
    with pytest.raises(ValueError, match="favours prototype mode by construction"):
        refuse_same_space(learned, learned, "evaluating model prototype")
    refuse_same_space(learned, "learned:" + "1" * 64, "x")  # a disjoint split's encoder
    refuse_same_space("ViT-L-14|openai|quickgelu|float32", learned, "x")  # CLIP space
    refuse_same_space(learned, None, "x")  # a baseline without a codebook


def test_evaluate_refuses_before_any_work(toy, tmp_path, one_thread):
    """ml.evaluation.evaluate.evaluate, given the learned encoder a prototype model's codebook came
    from,
    refuses at once (before loading data or generating), naming the model."""
    from types import SimpleNamespace

    from ml.evaluation.evaluate import evaluate
    from ml.schemas.evaluation import EvalConfig

    run = _learn(toy, tmp_path / "cb")
    enc = load_codebook_encoder(tmp_path / "cb", run.codebook.encoder)
    models = {
        "baseline": SimpleNamespace(cond=SimpleNamespace(encoder=None)),
        "prototype": SimpleNamespace(cond=SimpleNamespace(encoder=run.codebook.encoder)),
    }
    with pytest.raises(ValueError, match="evaluating model prototype would use the learned"):
        evaluate(models, enc, EvalConfig(), root=str(tmp_path / "nowhere"))  # type: ignore[arg-type]


def test_train_rejects_labels_that_do_not_fit():
    images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"k=2 .*b=1"):
        train_domain_encoder(
            images,
            torch.tensor([0, 0, 0, 1]),
            ["a", "b"],
            CPLConfig(k=2),
            SMALL.model_copy(update={"batch_size": 2}),
        )


@pytest.mark.realdata
@pytest.mark.slow
def test_learned_encoder_beats_the_untrained_ones_on_cells64(real_data, tmp_path, one_thread):
    """The point of the learned encoder: on real blood-cell images its held-out nearest-prototype
    accuracy beats the untrained network's (same architecture, prototypes fitted on its fixed
    features) and the untrained open_clip encoder's that CI would otherwise use."""
    selection = {"root": real_data / "cells64", "n_per_class": 60, "n_heldout": 20, "seed": 0}
    cfg = DomainEncoderConfig(epochs=15)
    run = learn_prototypes(
        selection,
        tmp_path / "learned",
        encoder_spec=EncoderSpec(LEARNED, None),
        cpl=CPLConfig(),
        domain=cfg,
    )
    clip = learn_prototypes(
        selection,
        tmp_path / "tiny",
        encoder_spec=EncoderSpec(TINY_MODEL, None),
        cpl=CPLConfig(),
        allow_untrained=True,
    )
    rep = run.report
    assert rep.nearest_prototype_acc is not None and clip.report.nearest_prototype_acc is not None
    assert rep.untrained_nearest_prototype_acc is not None
    assert rep.nearest_prototype_acc > rep.untrained_nearest_prototype_acc + 0.1
    assert rep.nearest_prototype_acc > clip.report.nearest_prototype_acc + 0.1


def test_early_stopping_keeps_the_best_heldout_epoch(toy, tmp_path, one_thread):
    cfg = SMALL.model_copy(update={"epochs": 6, "patience": 2})
    training = _learn(toy, tmp_path / "cb", cfg=cfg).report.encoder_training
    assert training is not None and training["selected_on"] == "heldout (early stopping)"
    assert 1 <= training["kept_epoch"] <= training["epochs_run"] <= 6
    assert training["epochs_run"] == 6 or training["epochs_run"] - training["kept_epoch"] == 2


def test_the_untrained_encoder_is_where_training_starts_and_saves_whole(toy, tmp_path, one_thread):
    """``untrained_encoder`` (the ablation's frozen-untrained arm) is the network
    ``train_domain_encoder`` starts from, and saved it loads back as an untrained artifact."""
    from ml.data.images import load_split
    from ml.prototypes.learned_encoder import untrained_encoder

    split = load_split(toy, n_per_class=6, n_heldout=4, image_size=32)
    cpl = CPLConfig(epochs=20)
    trained = train_domain_encoder(
        split.train.images, split.train.labels, split.classes, cpl, SMALL
    )
    fresh = untrained_encoder(split.train.images, split.classes, cpl, SMALL)
    x = split.heldout.images
    assert torch.equal(fresh.encode(x), trained.untrained.encode(x))
    assert not torch.equal(fresh.encode(x), trained.encoder.encode(x))
    identity = fresh.save(tmp_path / "enc")
    back = LearnedEncoder.load(tmp_path / "enc")
    assert back.identity == identity and back.meta["trained"] is False
    assert torch.equal(back.encode(x), fresh.encode(x))
