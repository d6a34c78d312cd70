"""Convolutional prototype learning: hand-checked losses, fitting, codebook files."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch

from ml.errors import NotFound
from ml.prototypes.cpl import Codebook, CPLConfig, _kmeans, dce_loss, fit_prototypes, pl_loss

IDENTITY = "test-encoder|untrained-seed0|gelu|float32"


def test_losses_match_hand_computation_k1():
    # Class 0 prototype at (0,0), class 1 prototype at (1,0); gamma = 1.
    protos = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])
    feats = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0])
    # x1=(0,1): d0=1, d1=2 -> -log(e^-1 / (e^-1 + e^-2)) = log(1 + e^-1)
    # x2=(2,0): d0=4, d1=1 -> -log(e^-4 / (e^-4 + e^-1)) = log(1 + e^3)
    expected_dce = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 2
    assert expected_dce == pytest.approx(1.6809245195459825, abs=1e-12)
    assert dce_loss(feats, labels, protos, 1.0).item() == pytest.approx(expected_dce, abs=1e-6)
    # PL: squared distance to the own-class prototype: (1 + 4) / 2
    assert pl_loss(feats, labels, protos).item() == pytest.approx(2.5, abs=1e-6)
    # gamma scales the logits: with gamma=2, x1 -> log(1 + e^-2), x2 -> log(1 + e^6)
    expected_g2 = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(6))) / 2
    assert dce_loss(feats, labels, protos, 2.0).item() == pytest.approx(expected_g2, abs=1e-6)


def test_losses_match_hand_computation_k2():
    # Class 0: (0,0), (0,2); class 1: (1,0), (3,0); gamma = 0.5.
    protos = torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [3.0, 0.0]]])
    feats = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([0, 1])
    # x1=(0,1), y=0: d = (1, 1 | 2, 10): p(y) = 2e^-.5 / (2e^-.5 + e^-1 + e^-5)
    l1 = -math.log(2 * math.exp(-0.5) / (2 * math.exp(-0.5) + math.exp(-1) + math.exp(-5)))
    # x2=(3,1), y=1: d = (10, 10 | 5, 1): p(y) = (e^-2.5 + e^-.5) / (2e^-5 + e^-2.5 + e^-.5)
    own = math.exp(-2.5) + math.exp(-0.5)
    l2 = -math.log(own / (2 * math.exp(-5) + own))
    assert dce_loss(feats, labels, protos, 0.5).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    # PL takes the NEAREST own prototype: x1 -> min(1, 1) = 1, x2 -> min(5, 1) = 1
    assert pl_loss(feats, labels, protos).item() == pytest.approx(1.0, abs=1e-6)


def test_dce_is_stable_for_far_features():
    protos = torch.tensor([[[0.0, 0.0]], [[100.0, 0.0]]])
    feats = torch.tensor([[100.0, 0.0]])
    loss = dce_loss(feats, torch.tensor([0]), protos, 10.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(10.0 * 100.0**2, rel=1e-6)  # = gamma * (d_own - d_other)


def test_gradients():
    torch.manual_seed(0)
    protos = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda f, p: dce_loss(f, labels, p, 0.7), (feats, protos))
    assert torch.autograd.gradcheck(lambda f, p: pl_loss(f, labels, p), (feats, protos))
    # PL pulls only the nearest own prototype towards the feature: grad = -2 (x - m) / N
    p = torch.tensor([[[0.0, 0.0], [5.0, 5.0]], [[9.0, 9.0], [9.0, 8.0]]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0]])
    pl_loss(x, torch.tensor([0]), p).backward()
    assert torch.equal(p.grad[0, 0], torch.tensor([-2.0, -4.0]))
    assert p.grad[0, 1].abs().sum() == 0 and p.grad[1].abs().sum() == 0
    # DCE: a step of gradient descent moves the own prototype towards x, the other away
    p.grad = None
    dce_loss(x, torch.tensor([0]), p, 0.1).backward()
    assert torch.dot(p.grad[0, 0], x[0] - p[0, 0].detach()) < 0
    assert torch.dot(p.grad[1, 1], x[0] - p[1, 1].detach()) > 0


def _blobs(n_cls=4, per=40, held=20, dim=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_cls, dim, generator=g), dim=1)

    def draw(n):
        y = torch.arange(n_cls).repeat_interleave(n)
        x = centers[y] + noise * torch.randn(len(y), dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1), y

    return draw(per), draw(held), [f"class{c}" for c in range(n_cls)]


def test_cpl_config_validates():
    with pytest.raises(pydantic.ValidationError):
        CPLConfig(k=0)
    with pytest.raises(pydantic.ValidationError):
        CPLConfig(head="mlp")
    assert CPLConfig().model_dump()["gamma"] == 10.0


def test_fit_separable_blobs():
    (x, y), (hx, hy), classes = _blobs()
    cfg = CPLConfig(epochs=20, batch_size=64)
    book, rep = fit_prototypes(
        x, y, classes, cfg, heldout_emb=hx, heldout_labels=hy, encoder_identity=IDENTITY
    )
    assert rep.nearest_prototype_acc >= 0.95
    assert rep.majority_acc == pytest.approx(1 / len(classes))
    assert rep.logreg_acc >= 0.95 and rep.train_acc >= 0.95
    assert 0 < rep.intra_inter_ratio < 0.5
    assert (rep.n_train, rep.n_heldout) == (160, 80) and math.isfinite(rep.final_loss)
    assert book.prototypes.shape == (4, 1, 16) and book.table().shape == (4, 16)
    assert book.encoder == IDENTITY and book.report == rep.to_dict()
    assert torch.equal(book.weights, torch.ones(4, 1))
    c, j = book.nearest(hx)
    assert (c == hy).float().mean() >= 0.95 and (j == 0).all()


def test_fit_without_heldout_reports_none():
    (x, y), _, classes = _blobs(n_cls=2, per=10)
    _, rep = fit_prototypes(x, y, classes, CPLConfig(epochs=2), encoder_identity=IDENTITY)
    assert rep.nearest_prototype_acc is None and rep.logreg_acc is None
    assert rep.majority_acc is None and rep.intra_inter_ratio is None and rep.n_heldout == 0


def test_fit_rejects_bad_inputs():
    (x, y), _, classes = _blobs(n_cls=2, per=3)
    with pytest.raises(ValueError, match="k=4"):
        fit_prototypes(x, y, classes, CPLConfig(k=4, epochs=1), encoder_identity=IDENTITY)
    with pytest.raises(ValueError, match="labels"):
        fit_prototypes(x, y + 5, classes, CPLConfig(epochs=1), encoder_identity=IDENTITY)


def test_k2_bimodal_class():
    g = torch.Generator().manual_seed(1)
    modes = torch.tensor([[-2.0, 2.0], [-2.0, -2.0], [2.0, 2.0], [2.0, -2.0]])
    counts = [30, 20, 25, 25]  # class 0 = modes 0 (30 images) + 1 (20); class 1 = modes 2 + 3
    mode = torch.arange(4).repeat_interleave(torch.tensor(counts))
    x = modes[mode] + 0.2 * torch.randn(len(mode), 2, generator=g)
    y = mode // 2
    hashes = [f"img{i}" for i in range(len(y))]
    cfg = CPLConfig(k=2, gamma=1.0, epochs=15, batch_size=32)
    book, _ = fit_prototypes(x, y, ["a", "b"], cfg, encoder_identity=IDENTITY, hashes=hashes)
    for c in range(2):
        p = book.prototypes[c]
        assert (p[0] - p[1]).norm() > 3  # two distinct prototypes...
        for m in (2 * c, 2 * c + 1):  # ...one near each mode of the class
            assert (p - modes[m]).norm(dim=1).min() < 0.5
    # assignments: each mode's images share one prototype; weights are the shares
    for m in range(4):
        js = {book.assignments[h] for h, mm in zip(hashes, mode.tolist(), strict=True) if mm == m}
        assert len(js) == 1
        j = js.pop()
        assert (book.prototypes[m // 2, j] - modes[m]).norm() < 0.5
        assert book.weights[m // 2, j].item() == pytest.approx(counts[m] / 50)
    assert torch.allclose(book.weights.sum(1), torch.ones(2))
    c, j = book.nearest(modes)
    assert c.tolist() == [0, 0, 1, 1] and j[0] != j[1] and j[2] != j[3]


def test_kmeans_init_finds_the_cluster_means_and_follows_the_seed():
    """The k-means initialisation (scikit-learn's): on separated clusters each centre is one
    cluster's mean; K=1 is the class mean and draws nothing from the generator; a seed gives one
    result."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    which = torch.arange(3).repeat_interleave(torch.tensor([7, 12, 5]))
    x = centres[which] + 0.3 * torch.randn(len(which), 3, generator=g)
    means = torch.stack([x[which == j].mean(0) for j in range(3)])
    got = _kmeans(x, 3, torch.Generator().manual_seed(1))
    assert got.shape == (3, 3) and got.dtype == x.dtype
    order = torch.cdist(means, got).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(got[order], means, rtol=0, atol=1e-5)
    assert torch.equal(got, _kmeans(x, 3, torch.Generator().manual_seed(1)))
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()
    assert torch.equal(_kmeans(x, 1, gen), x.mean(0, keepdim=True))
    assert torch.equal(gen.get_state(), state)


def test_deterministic():
    (x, y), _, classes = _blobs(n_cls=3, per=12)
    cfg = CPLConfig(k=2, epochs=5, batch_size=8, seed=3)
    a, ra = fit_prototypes(x, y, classes, cfg, encoder_identity=IDENTITY)
    b, rb = fit_prototypes(x, y, classes, cfg, encoder_identity=IDENTITY)
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.weights, b.weights)
    assert ra.final_loss == rb.final_loss
    c, _ = fit_prototypes(x, y, classes, cfg.model_copy(update={"seed": 4}), encoder_identity="e")
    assert not torch.equal(a.prototypes, c.prototypes)


def test_linear_head_trains():
    (x, y), (hx, hy), classes = _blobs(n_cls=3, per=20, held=10)
    cfg = CPLConfig(head="linear", epochs=10, batch_size=16)
    book, rep = fit_prototypes(
        x, y, classes, cfg, heldout_emb=hx, heldout_labels=hy, encoder_identity=IDENTITY
    )
    assert book.head == "linear" and set(book.head_state) == {"weight", "bias"}
    assert not torch.equal(book.head_state["weight"], torch.eye(16))
    assert rep.nearest_prototype_acc >= 0.95
    expected = torch.nn.functional.linear(hx, book.head_state["weight"], book.head_state["bias"])
    assert torch.equal(book.features(hx), expected)


@pytest.mark.parametrize("head", [None, "linear"])
def test_codebook_round_trip(tmp_path, head):
    (x, y), (hx, hy), classes = _blobs(n_cls=3, per=10, held=4)
    cfg = CPLConfig(k=2, head=head, epochs=3)
    hashes = [f"h{i}" for i in range(len(y))]
    book, _ = fit_prototypes(
        x,
        y,
        classes,
        cfg,
        heldout_emb=hx,
        heldout_labels=hy,
        encoder_identity=IDENTITY,
        hashes=hashes,
    )
    book.selection = {"root": "/data/derm64", "n_per_class": 10, "seed": 0}
    out = book.save(tmp_path / "cb")
    assert sorted(p.name for p in out.iterdir()) == ["codebook.json", "codebook.safetensors"]
    back = Codebook.load(out)
    assert torch.equal(back.prototypes, book.prototypes) and back.prototypes.dtype == torch.float32
    assert torch.equal(back.weights, book.weights)
    if head is None:
        assert back.head_state is None
    else:
        assert all(torch.equal(back.head_state[n], book.head_state[n]) for n in book.head_state)
    for attr in (
        "classes",
        "encoder",
        "gamma",
        "lam",
        "head",
        "assignments",
        "selection",
        "report",
    ):
        assert getattr(back, attr) == getattr(book, attr), attr
    assert (back.k, back.dim) == (2, 16)
    assert torch.equal(back.nearest(hx)[0], book.nearest(hx)[0])
    # saving the loaded codebook again gives byte-identical files
    back.save(tmp_path / "again")
    for name in ("codebook.json", "codebook.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    assert json.loads((out / "codebook.json").read_text())["format_version"] == 1


def test_codebook_missing_or_corrupt(tmp_path):
    with pytest.raises(NotFound, match="no codebook"):
        Codebook.load(tmp_path / "nowhere")
    (x, y), _, classes = _blobs(n_cls=2, per=4)
    book, _ = fit_prototypes(x, y, classes, CPLConfig(epochs=1), encoder_identity=IDENTITY)
    out = book.save(tmp_path / "cb")
    tensors = (out / "codebook.safetensors").read_bytes()
    (out / "codebook.safetensors").write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(ValueError, match="corrupt codebook"):
        Codebook.load(out)
    (out / "codebook.safetensors").write_bytes(tensors)
    assert torch.equal(Codebook.load(out).prototypes, book.prototypes)
    (out / "codebook.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt codebook"):
        Codebook.load(out)
    (out / "codebook.safetensors").unlink()
    with pytest.raises(NotFound, match=r"codebook\.safetensors missing"):
        Codebook.load(out)
