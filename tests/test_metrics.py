"""CLIP-space distribution metrics: closed-form FD, hand-computed k-NN precision / recall,
prototype consistency on hand-made codebooks, the report's layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ml.evaluation.distribution as metrics
from ml.evaluation.distribution import (
    distribution_report,
    frechet_distance,
    knn_precision_recall,
    prototype_consistency,
    prototype_consistency_per_class,
)
from ml.prototypes.cpl import Codebook


def _exact(rng: np.random.Generator, n: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly ``mean`` and whose unbiased sample covariance is
    exactly diag(std^2): whitened noise, rescaled."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))
    z = z @ np.linalg.inv(chol).T  # sample covariance now I
    return z * std + mean


def _codebook(protos: list, head: dict | None = None) -> Codebook:
    p = torch.tensor(protos, dtype=torch.float32)  # (C, K, D)
    return Codebook(
        classes=[f"c{i}" for i in range(len(p))],
        prototypes=p,
        weights=torch.full(p.shape[:2], 1.0 / p.shape[1]),
        encoder="test-encoder",
        head="linear" if head else None,
        head_state=head,
    )


# ---------------------------------------------------------------- Fréchet distance


def test_fd_of_identical_sets_is_zero():
    a = np.random.default_rng(0).standard_normal((200, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_closed_form_1d():
    rng = np.random.default_rng(1)
    a = _exact(rng, 50, np.array([1.0]), np.array([2.0]))
    b = _exact(rng, 80, np.array([-3.0]), np.array([0.5]))
    # (mu_a - mu_b)^2 + (s_a - s_b)^2 = 16 + 2.25
    assert frechet_distance(a[:, 0], b[:, 0]) == pytest.approx(18.25, rel=1e-9)


def test_fd_matches_closed_form_diagonal_3d():
    rng = np.random.default_rng(2)
    a = _exact(rng, 60, np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    b = _exact(rng, 40, np.array([1.0, 1.0, 0.0]), np.array([3.0, 2.0, 1.0]))
    # sum over dims of dmu^2 + (s_a - s_b)^2 = (1 + 0 + 4) + (4 + 0 + 4)
    assert frechet_distance(a, b) == pytest.approx(13.0, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(13.0, rel=1e-9)


def test_fd_is_symmetric_with_non_commuting_covariances():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((90, 5)) @ rng.standard_normal((5, 5)) + 1.0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-7)
    assert frechet_distance(a, b) > 1.0


def test_fd_survives_singular_covariances():
    # 6 samples in 32 dims (as with few images per class in CLIP space): rank-deficient
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 32)), rng.standard_normal((6, 32)) + 0.5
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd >= 0.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)


def test_fd_rejects_bad_input():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((3, 2)))


# ---------------------------------------------------------------- precision / recall


def test_pr_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((30, 4))
    assert knn_precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_pr_of_identical_sets_is_one():
    real = np.random.default_rng(6).standard_normal((30, 4))
    assert knn_precision_recall(real, real.copy(), k=3) == (1.0, 1.0)


REAL_2D = np.array([[0, 0], [1, 0], [3, 0], [20, 20], [20, 21]], dtype=float)
FAKE_2D = np.array([[0, 1], [5, 0], [1, 2], [10, 0]], dtype=float)


def test_pr_hand_computed_k1():
    # Real radii (1st NN): (0,0)->1, (1,0)->1, (3,0)->2, (20,20)->1, (20,21)->1.
    # Fake in real balls: (0,1) at 1 from (0,0) (on the boundary: in); (5,0) at 2 from (3,0)
    # (boundary: in); (1,2) is sqrt5 / 2 / sqrt8 from the first three (out); (10,0) out.
    # Fake radii: (0,1)->sqrt2 [(1,2)], (5,0)->sqrt20 [(1,2)], (1,2)->sqrt2, (10,0)->5.
    # Real in fake balls: (0,0) at 1 from (0,1); (1,0) at sqrt2 from (0,1) (boundary);
    # (3,0) at 2 from (5,0); (20,20), (20,21) are > 22 from everything: out -> 3/5.
    # Closed balls as in the paper's reference code (prdc 0.2's strict < gives 0.0, 0.6).
    assert knn_precision_recall(REAL_2D, FAKE_2D, k=1) == pytest.approx((0.5, 0.6))


def test_pr_hand_computed_k2_outliers_inflate_precision():
    # k=2 real radii: (0,0)->3, (1,0)->2, (3,0)->3, (20,20)->sqrt689, (20,21)->sqrt730; the
    # outlier pair's huge balls swallow (10,0) (sqrt500 from (20,20)) and (1,2) is now
    # sqrt5 <= 3 from (0,0): precision 4/4. Fake radii: (0,1)->sqrt26, (5,0)->5,
    # (1,2)->sqrt20, (10,0)->sqrt85; the outliers stay out: recall 3/5.
    assert knn_precision_recall(REAL_2D, FAKE_2D, k=2) == pytest.approx((1.0, 0.6))


def test_pr_duplicates_count_as_neighbours():
    # Duplicates give radius 0 with k=1: only an exact copy lies in such a ball.
    real = np.array([[0, 0], [0, 0], [5, 5], [5, 5]], dtype=float)
    fake = np.array([[0, 0], [1, 0]], dtype=float)
    # fake radii 1 each: real (0,0) twice in, (5,5) twice out
    assert knn_precision_recall(real, fake, k=1) == pytest.approx((0.5, 0.5))


def test_pr_a_copy_of_a_duplicated_real_image_is_inside():
    # (0,0) is real twice: radius 0 at k=1. A generated exact copy lies in that closed ball
    # (the paper's <=; prdc's strict < would leave it out: precision 0.0); (20,20) is out.
    real = np.array([[0, 0], [0, 0], [5, 5], [9, 9]], dtype=float)
    fake = np.array([[0, 0], [20, 20]], dtype=float)
    assert knn_precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    def share(p, c, r):
        return float((np.linalg.norm(p[:, None] - c[None], axis=-1) <= r[None]).any(1).mean())

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_pr_blocks_agree_with_brute_force(monkeypatch):
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((53, 6)), rng.standard_normal((41, 6)) * 1.3 + 0.4
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # many blocks, ragged last one
    got = knn_precision_recall(real, fake, k=3)
    assert got == pytest.approx(_brute_pr(real, fake, 3))
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_pr_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="more than k"):
        knn_precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="k must be"):
        knn_precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), k=0)


# ---------------------------------------------------------------- prototype consistency

EMB = np.array([[1, 0], [9, 0], [2, 0], [6, 0], [4, 0]], dtype=np.float32)
LAB = np.array([0, 0, 0, 1, 1])


def test_consistency_hand_made_codebook():
    book = _codebook([[[0.0, 0.0]], [[10.0, 0.0]]])
    # nearest class: 0, 1, 0, 1, 0 -> hits: yes, no, yes, yes, no
    assert prototype_consistency(EMB, LAB, book) == pytest.approx(3 / 5)
    assert prototype_consistency_per_class(EMB, LAB, book) == pytest.approx(
        {"c0": 2 / 3, "c1": 1 / 2}
    )
    # classes without generated images are left out
    assert prototype_consistency_per_class(EMB[:3], LAB[:3], book) == pytest.approx({"c0": 2 / 3})


def test_consistency_k2_maps_prototypes_to_their_class():
    # class 0: (0,0) and (20,0); class 1: (10,0) and (30,0)
    book = _codebook([[[0.0, 0.0], [20.0, 0.0]], [[10.0, 0.0], [30.0, 0.0]]])
    emb = np.array([[19, 0], [21, 0], [29, 0], [11, 0]], dtype=np.float32)
    # nearest: (20,0) c0, (20,0) c0, (30,0) c1, (10,0) c1
    assert prototype_consistency(emb, [0, 1, 1, 1], book) == pytest.approx(3 / 4)


def test_consistency_applies_the_linear_head():
    # head x -> (10 - x0, x1): mirrors the line, so every nearest class flips
    head = {"weight": torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "bias": torch.tensor([10.0, 0.0])}
    book = _codebook([[[0.0, 0.0]], [[10.0, 0.0]]], head=head)
    # features: (9,0) c1, (1,0) c0, (8,0) c1, (4,0) c0, (6,0) c1 -> hits: no, yes, no, no, yes
    assert prototype_consistency(EMB, LAB, book) == pytest.approx(2 / 5)


def test_consistency_rejects_mismatched_input():
    book = _codebook([[[0.0, 0.0]], [[10.0, 0.0]]])
    with pytest.raises(ValueError, match="codebook expects 2"):
        prototype_consistency(np.zeros((3, 5)), [0, 1, 0], book)
    with pytest.raises(ValueError, match="index the codebook"):
        prototype_consistency(EMB, [0, 0, 0, 1, 2], book)


# ---------------------------------------------------------------- report


def test_distribution_report_layout_and_values():
    rng = np.random.default_rng(8)
    real = np.concatenate([rng.standard_normal((10, 4)), rng.standard_normal((10, 4)) + 5])
    real_y = np.repeat([0, 1], 10)
    fake = np.concatenate([rng.standard_normal((12, 4)) + 0.2, rng.standard_normal((2, 4)) + 5])
    fake_y = np.repeat([0, 1], [12, 2])
    book = _codebook([[[0.0] * 4], [[5.0] * 4]])
    book.classes = ["nevus", "melanoma"]
    rep = distribution_report(real, real_y, fake, fake_y, ["nevus", "melanoma"], book, k=3)

    assert set(rep) == {"classes", "k", "overall", "per_class"}
    keys = {"fd", "precision", "recall", "n_real", "n_fake", "consistency"}
    assert set(rep["overall"]) == keys and set(rep["per_class"]["melanoma"]) == keys
    assert (rep["overall"]["n_real"], rep["overall"]["n_fake"]) == (20, 14)
    assert [(e["n_real"], e["n_fake"]) for e in rep["per_class"].values()] == [(10, 12), (10, 2)]
    assert rep["overall"]["fd"] == pytest.approx(frechet_distance(real, fake))
    assert rep["per_class"]["nevus"]["fd"] == pytest.approx(frechet_distance(real[:10], fake[:12]))
    assert rep["per_class"]["nevus"]["precision"] == pytest.approx(
        knn_precision_recall(real[:10], fake[:12], 3)[0]
    )
    mel = rep["per_class"]["melanoma"]
    assert mel["fd"] is not None and mel["precision"] is None and mel["recall"] is None  # n <= k
    assert rep["overall"]["consistency"] == pytest.approx(1.0)  # well-separated clusters

    plain = distribution_report(real, real_y, fake, fake_y, ["nevus", "melanoma"])
    assert "consistency" not in plain["overall"]
    with pytest.raises(ValueError, match="codebook classes"):
        distribution_report(real, real_y, fake, fake_y, ["a", "b"], book)
    with pytest.raises(ValueError, match="index the 2 classes"):
        distribution_report(real, real_y + 1, fake, fake_y, ["nevus", "melanoma"])
