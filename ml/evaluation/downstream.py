"""Downstream utility of synthetic images: train a classifier on a training set (real, baseline
synthetic or prototype-guided synthetic), test it on held-out real images, over several seeds.

This is the seed paper's utility experiment (ResNeXt-50, macro precision / recall / F1 as
mean ± std, Tables 5-6). ImageNet weights are never downloaded: pass a local state-dict file.
Images are uint8 (N, 3, H, W) like ml.data.images.ImageSet; the trained model carries its own resize
and ImageNet normalisation, so training and evaluation cannot disagree on preprocessing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn

from ml.config import resolve_device
from ml.console import progress_bar
from ml.data.images import ImageSet
from ml.errors import Invalid, NotFound
from ml.evaluation.chance import chance_levels
from ml.schemas.evaluation import DownstreamConfig  # torch-free: the service reads it back

ImagesLabels = tuple[torch.Tensor, torch.Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EVAL_BATCH = 256


# ---------------------------------------------------------------- models


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def small_cnn(n_classes: int, width: int = 32) -> nn.Sequential:
    """Four conv-BN-ReLU-pool blocks, global average pooling and a linear head (~0.4M
    parameters): trains in seconds on a CPU at 32-64 px, unlike ResNeXt-50."""
    chans = [3, width, 2 * width, 4 * width, 8 * width]
    blocks = [_block(a, b) for a, b in itertools.pairwise(chans)]
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], n_classes)
    )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (optionally under "state_dict")."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise Invalid(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_backbone(net: nn.Module, path: Path) -> None:
    """Load everything but the classifier head; any other missing or unexpected key means the
    file is for another architecture, which strict=False alone would silently accept."""
    if not path.is_file():
        raise NotFound(f"backbone weights {path} not found")
    state = {k: v for k, v in _read_state(path).items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise Invalid(
            f"{path} does not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def make_classifier(backbone: str, n_classes: int, weights: Path | str | None = None) -> nn.Module:
    """A classifier taking normalised float images (N, 3, S, S) to logits (N, n_classes).

    "resnext50" (the seed's ResNeXt-50 32x4d) and "resnet18" come from torchvision without
    downloads; ``weights`` is a local ImageNet state dict whose fc is replaced. "small" is
    :func:`small_cnn`.
    """
    if n_classes < 2:
        raise Invalid(f"a classifier needs >= 2 classes, got {n_classes}")
    if backbone == "small":
        if weights is not None:
            raise Invalid("the 'small' backbone has no pretrained weights")
        return small_cnn(n_classes)
    import torchvision

    builders = {
        "resnext50": torchvision.models.resnext50_32x4d,
        "resnet18": torchvision.models.resnet18,
    }
    if backbone not in builders:
        raise Invalid(f"unknown backbone {backbone!r}; choose small, resnet18 or resnext50")
    net = builders[backbone](weights=None)
    if weights is not None:
        _load_backbone(net, Path(weights))
    net.fc = nn.Linear(net.fc.in_features, n_classes)
    return cast(nn.Module, net)  # torchvision is untyped


class ImageClassifier(nn.Module):
    """uint8 images of any size -> logits: resize to ``image_size``, ImageNet-normalise, ``net``."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, net: nn.Module, image_size: int) -> None:
        super().__init__()
        self.net = net
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(self.preprocess(images))
        return logits


# ---------------------------------------------------------------- training and evaluation


def _check_images(images: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{what}: images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle split into batches; a trailing batch of one joins the previous one
    (BatchNorm cannot train on a single sample)."""
    parts = list(torch.randperm(n, generator=gen).split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal and vertical flips per image: lesions and cells have no orientation."""
    n = len(x)
    h = torch.rand(n, generator=gen) < 0.5
    v = torch.rand(n, generator=gen) < 0.5
    x = torch.where(h.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return torch.where(v.to(x.device).view(-1, 1, 1, 1), x.flip(-2), x)


def train_classifier(
    train: ImageSet | ImagesLabels, cfg: DownstreamConfig, n_classes: int | None = None
) -> ImageClassifier:
    """Train ``cfg.backbone`` with AdamW and cross-entropy; deterministic given ``cfg.seed``
    on a CPU (initialisation, shuffling and flips are seeded; the caller's RNG is untouched).

    ``n_classes`` defaults to the ImageSet's class list, else to max(label) + 1.
    """
    images, labels, classes = _unpack(train)
    _check_images(images, labels, "train")
    if len(images) < 2:
        raise Invalid(f"train: need >= 2 images, got {len(images)}")
    labels = labels.long()
    n_classes = n_classes or (len(classes) if classes else int(labels.max()) + 1)
    device = resolve_device(cfg.device)
    seed = cfg.seed or 0
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = make_classifier(cfg.backbone, n_classes, cfg.weights)
        model = ImageClassifier(net, cfg.image_size).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        epochs = range(cfg.epochs)
        for _ in progress_bar(epochs, desc=f"train {cfg.backbone}", disable=not cfg.progress):
            for idx in _batches(len(images), cfg.batch_size, gen):
                x = model.preprocess(images[idx])
                if cfg.augment:
                    x = _flip(x, gen)
                loss = F.cross_entropy(model.net(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> npt.NDArray[np.int64]:
    """Arg-max class of each uint8 image, in eval mode and batches."""
    model.eval()
    out = [
        model(images[i : i + _EVAL_BATCH]).argmax(1).cpu()
        for i in range(0, len(images), _EVAL_BATCH)
    ]
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)


def classification_scores(
    y_true: Sequence[int] | npt.NDArray[np.integer[Any]],
    y_pred: Sequence[int] | npt.NDArray[np.integer[Any]],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Macro precision / recall / F1 (zero_division=0), accuracy, per-class scores, support and
    the confusion matrix (rows = true class, columns = predicted), all JSON-ready. Every class
    in ``classes`` counts in the macro mean, even one absent from the test set (scored 0)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average="macro", zero_division=0
    )
    return {
        "precision": float(mp),
        "recall": float(mr),
        "f1": float(mf),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "support": [int(v) for v in s],
        "confusion": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def evaluate_classifier(
    model: nn.Module,
    test_images: torch.Tensor,
    test_labels: torch.Tensor | Sequence[int],
    classes: Sequence[str],
) -> dict[str, Any]:
    """Scores of ``model`` (uint8 images -> logits, e.g. from train_classifier) on a test set;
    see :func:`classification_scores`."""
    labels = torch.as_tensor(test_labels, dtype=torch.long)
    _check_images(test_images, labels, "test")
    return classification_scores(labels.numpy(), predict(model, test_images), classes)


# ---------------------------------------------------------------- the experiment


def _unpack(data: ImageSet | ImagesLabels) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    if isinstance(data, ImageSet):
        return data.images, data.labels, list(data.classes)
    images, labels = data
    return images, torch.as_tensor(labels, dtype=torch.long), None


def _validate(
    train_sets: Mapping[str, ImageSet | ImagesLabels],
    test: ImageSet | ImagesLabels,
    classes: Sequence[str],
) -> None:
    """Every set must use ``classes`` and contain every class, or the scores mislead."""
    if not train_sets:
        raise Invalid("downstream_experiment needs at least one training set")
    named = {**{f"training set {n!r}": d for n, d in train_sets.items()}, "test set": test}
    for what, data in named.items():
        images, labels, own = _unpack(data)
        _check_images(images, labels, what)
        if own is not None and own != list(classes):
            raise Invalid(f"{what} has classes {own}, but the experiment uses {list(classes)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{what}: labels must index the {len(classes)} classes")
        counts = torch.bincount(labels, minlength=len(classes)).tolist()
        absent = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        if absent:
            kind = "test images" if what == "test set" else "training images"
            raise Invalid(f"{what} has no {kind} of class(es) {absent}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)


def _summarise(runs: list[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    keys = ("precision", "recall", "f1", "accuracy")
    stats = {k: _mean_std([r[k] for r in runs]) for k in keys}
    return {
        "mean": {k: m for k, (m, _) in stats.items()},
        "std": {k: s for k, (_, s) in stats.items()},
        "per_class_f1": {c: _mean_std([r["per_class"][c]["f1"] for r in runs])[0] for c in classes},
    }


def _runs(
    data: ImageSet | ImagesLabels,
    test: ImagesLabels,
    classes: Sequence[str],
    cfg: DownstreamConfig,
    seeds: Sequence[int],
) -> Iterator[dict[str, Any]]:
    images, labels, _ = _unpack(data)
    for seed in seeds:
        model = train_classifier(
            (images, labels), cfg.model_copy(update={"seed": seed}), len(classes)
        )
        yield {"seed": seed, **evaluate_classifier(model, *test, classes)}


def downstream_experiment(
    train_sets: Mapping[str, ImageSet | ImagesLabels],
    test: ImageSet | ImagesLabels,
    classes: Sequence[str],
    cfg: DownstreamConfig,
    seeds: Sequence[int] = (0, 1, 2),
) -> dict[str, Any]:
    """Train one classifier per (training set, seed) and test each on the same real images.

    Returns {"classes", "seeds", "n_test", "config", "sets": {name: {"n_train", "runs",
    "mean", "std", "per_class_f1"}}, "chance"}; each run holds :func:`evaluate_classifier`'s
    scores, ``chance`` what learning nothing scores on the same images (``ml.evaluation.chance``).
    Everything is checked before any training, so a bad set fails in seconds, not hours.
    """
    if not seeds:
        raise Invalid("downstream_experiment needs at least one seed")
    _validate(train_sets, test, classes)
    test_images, test_labels, _ = _unpack(test)
    sets: dict[str, Any] = {}
    for name, data in train_sets.items():
        runs = list(_runs(data, (test_images, test_labels), classes, cfg, seeds))
        sets[name] = {"n_train": len(_unpack(data)[1]), "runs": runs, **_summarise(runs, classes)}
    return {
        "classes": list(classes),
        "seeds": list(seeds),
        "n_test": len(test_labels),
        # the runs' seeds are ``seeds``: the config's own seed would name one that no run used
        "config": cfg.model_dump(mode="json") | {"seed": None},
        "sets": sets,
        "chance": chance_levels(
            np.bincount(test_labels.numpy(), minlength=len(classes)).tolist()
        ).model_dump(),
    }


__all__ = [
    "DownstreamConfig",
    "ImageClassifier",
    "classification_scores",
    "downstream_experiment",
    "evaluate_classifier",
    "make_classifier",
    "predict",
    "small_cnn",
    "train_classifier",
]
