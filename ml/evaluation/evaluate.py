"""Evaluation without experts: the seed's utility experiment and CLIP-space distribution metrics.

For each model (baseline, prototype) a synthetic training set is generated with as many images
per class as the real training split has (or ``n_per_class``), so the three training sets of
the downstream classifier (real, baseline, prototype) are the same size per class; all three
are tested on the same held-out real images (those the diffusion models never saw). The same
synthetic images are embedded with the CLIP encoder and compared with the real training images
(Frechet distance, k-NN precision and recall, prototype consistency); the real held-out images
against the real training images give the floor those numbers should be read against. On the
toy domain the rule-based checker's plausibility is added.

With an external test set (another site or scanner; :func:`external_test_set`) every score is
measured on it instead: the classifiers are tested on it, and the CLIP-space metrics compare
each set with it, the real training images giving the floor. The result
(:class:`ml.schemas.evaluation.EvaluationResult`) records which test set it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ml.config import SampleConfig
from ml.data.images import DataError, DatasetSplit, ImageSet, load_selection, load_split, nfc, scan
from ml.diffusion.sample import generate
from ml.errors import Invalid
from ml.evaluation.distribution import distribution_report
from ml.evaluation.downstream import downstream_experiment
from ml.models.checkpoint import LoadedModel
from ml.prototypes.cpl import Codebook
from ml.prototypes.encoder import EmbeddingCache, ImageEncoder, embed
from ml.prototypes.learned_encoder import refuse_same_space
from ml.schemas.evaluation import (
    DistributionReport,
    DownstreamResult,
    EvalConfig,
    EvaluationResult,
    ModelInfo,
    TestSetInfo,
    evaluation_tables,
    tables_text,
)

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]  # (stage, fraction of the whole evaluation)


def real_split(
    models: Mapping[str, LoadedModel],
    root: str | None = None,
    roots: Sequence[Path | str] | None = None,
    need_heldout: bool = True,
) -> DatasetSplit:
    """The split both models were trained on, at their image size, with its held-out part
    (``root``: where the dataset is on this machine, if not where it was at training;
    ``roots``: the folders its files must resolve inside, as for :func:`ml.data.images.load_split`;
    ``need_heldout``: False when an external test set replaces the held-out part)."""
    selections: dict[str, dict[str, Any]] = {
        name: m.cond.extra.get("selection") or {} for name, m in models.items()
    }
    if any(not s for s in selections.values()):
        raise Invalid("a model does not record its data selection (trained without a codebook)")
    first = next(iter(selections.values()))
    drop = ("image_size",)
    if any(
        {k: v for k, v in s.items() if k not in drop}
        != {k: v for k, v in first.items() if k not in drop}
        for s in selections.values()
    ):
        raise Invalid(f"the models were trained on different data selections: {selections}")
    sizes = {m.cfg.image_size for m in models.values()}
    if len(sizes) != 1:
        raise Invalid(f"the models generate different image sizes: {sorted(sizes)}")
    if "layout" not in first:
        raise Invalid("the recorded selection has no held-out part; train with a codebook")
    selection = {**first, "image_size": sizes.pop(), **({"root": root} if root else {})}
    split = load_selection(selection, roots)
    counts = split.heldout.per_class_counts() if len(split.heldout) else {}
    empty = [c for c in split.classes if not counts.get(c)]
    if empty and need_heldout:
        raise Invalid(
            f"no held-out real images for {', '.join(empty)}: train with n_heldout >= 1 "
            "(the seed tests on 50 per class) so the classifier is tested on unseen images, "
            "or give an external test set"
        )
    return split


def _in_model_order(data: ImageSet, classes: Sequence[str]) -> ImageSet:
    """The same images with labels indexing ``classes`` (a folder's order may differ)."""
    if list(data.classes) == list(classes):
        return data
    remap = torch.tensor([list(classes).index(c) for c in data.classes], dtype=torch.long)
    return ImageSet(data.images, remap[data.labels], list(classes), data.paths, data.hashes)


def external_test_set(
    path: Path | str,
    classes: Sequence[str],
    image_size: int,
    roots: Sequence[Path | str] | None = None,
    name: str | None = None,
) -> tuple[ImageSet, TestSetInfo]:
    """Every image of the models' classes in a folder the models never saw (class folders,
    manifest.csv, MATEK or HAM10000 layouts, as ``ml.data.images`` reads them), matched by class
    name.

    Every model class must have images there: a classifier cannot be scored on a class it is
    never shown, and scores over fewer classes are not the same measure. Extra classes of the
    folder are ignored (a lab's external set often has more classes than were trained) and
    listed in ``ignored_classes``. ``roots``: as for :func:`ml.data.images.load_split`. Names are
    matched in NFC, as :func:`ml.data.catalog.scan` registers them."""
    classes = [nfc(c) for c in classes]
    cat = scan(Path(path), "auto", roots)
    present = {c for c, files in cat.items.items() if files}
    missing = sorted(set(classes) - present)
    if missing:
        raise DataError(
            f"the test set {cat.root} has no images of the models' class(es) {missing}: it must "
            f"have every one of {sorted(classes)} (it has {sorted(present) or 'none'}; classes "
            "the models do not know are ignored)"
        )
    split = load_split(
        cat.root,
        layout=cat.layout,
        n_per_class=None,
        n_heldout=0,
        image_size=image_size,
        classes=list(classes),
        roots=roots,
    )
    test = _in_model_order(split.train, classes)
    counts = test.per_class_counts()
    info = TestSetInfo(
        source="external",
        name=name or cat.root.name,
        path=str(cat.root.resolve()),
        layout=cat.layout,
        n_per_class=counts,
        total=len(test),
        ignored_classes=sorted(set(cat.items) - set(classes)),
    )
    return test, info


def _check_unseen(test: ImageSet, split: DatasetSplit) -> None:
    """An external test set must not hold the models' own images (same pixels, any name)."""
    seen = set(split.train.hashes) | set(split.heldout.hashes)
    shared = [p for p, h in zip(test.paths, test.hashes, strict=True) if h in seen]
    if shared:
        raise DataError(
            f"{len(shared)} image(s) of the test set are pixel-identical to images of the "
            f"models' own split (e.g. {shared[0]}): an external test set must be images the "
            "models never saw"
        )


def synthetic_set(
    model: LoadedModel,
    counts: Mapping[str, int],
    cfg: EvalConfig,
    on_class: Callable[[], None],
    on_step: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """``on_step(done, total)``: denoising steps within the class being generated."""
    scfg = SampleConfig(
        steps=cfg.steps,
        guidance=cfg.guidance,
        scheduler=cfg.scheduler,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    classes = list(model.cond.classes)
    images, labels = [], []
    for label, name in enumerate(classes):
        n = cfg.n_per_class or counts[name]
        images.append(generate(model, name, n, scfg, on_step=on_step))
        labels += [label] * n
        on_class()
    return ImageSet(
        images=torch.cat(images),
        labels=torch.tensor(labels),
        classes=classes,
        paths=[""] * len(labels),
        hashes=[],
    )


def _hashes(images: torch.Tensor) -> list[str]:
    from ml.data.images import pixel_hash

    return [pixel_hash(img) for img in images]


def _embed(
    encoder: ImageEncoder, data: ImageSet, cache: EmbeddingCache | None
) -> npt.NDArray[np.float32]:
    return embed(encoder, data.images, _hashes(data.images), cache).numpy()


def _toy_plausibility(data: ImageSet) -> dict[str, float] | None:
    from ml.data.toy import SPECS, plausibility

    if not set(data.classes) <= set(SPECS):
        return None
    out = {}
    for label, name in enumerate(data.classes):
        imgs = data.images[data.labels == label].permute(0, 2, 3, 1).numpy()
        out[name] = plausibility(imgs, name)
    return out


def _test_set(
    split: DatasetSplit,
    test_data: Path | str | None,
    image_size: int,
    roots: Sequence[Path | str] | None,
    test_name: str | None,
) -> tuple[ImageSet, TestSetInfo]:
    """The images every score is measured on: the split's held-out part or an external set."""
    if test_data is None:
        held = split.heldout
        root = Path(split.selection.get("root") or split.root)
        info = TestSetInfo(
            source="held-out",
            name=f"{test_name or root.name} (held-out)",
            path=str(root),
            layout=split.layout,
            n_per_class=held.per_class_counts(),
            total=len(held),
        )
        return held, info
    test, info = external_test_set(test_data, split.classes, image_size, roots, test_name)
    _check_unseen(test, split)
    return test, info


def evaluate(
    models: Mapping[str, LoadedModel],
    encoder: ImageEncoder,
    cfg: EvalConfig,
    *,
    codebook: Codebook | None = None,
    cache: EmbeddingCache | None = None,
    progress: Progress | None = None,
    synthetic: Mapping[str, ImageSet] | None = None,
    root: str | None = None,
    roots: Sequence[Path | str] | None = None,
    test_data: Path | str | None = None,
    test_name: str | None = None,
) -> EvaluationResult:
    """The whole comparison for named models (e.g. {"baseline": ..., "prototype": ...}).

    ``synthetic``: images already generated (e.g. reviewed batches) to use for some models
    instead of generating new ones; they must cover every class. ``test_data``: a folder of
    real images the models never saw (see :func:`external_test_set`; its files must resolve
    inside ``roots`` too) to test on instead of the split's held-out part: the classifiers are
    scored on it and the CLIP-space metrics compare every set with it (the real training
    images then give the floor, as the held-out images do against the training images)."""
    t0 = time.perf_counter()
    for name, m in models.items():
        refuse_same_space(encoder.identity, m.cond.encoder, f"evaluating model {name}")
    split = real_split(models, root, roots, need_heldout=test_data is None)
    counts = split.train.per_class_counts()
    classes = list(split.classes)
    for name, m in models.items():
        if list(m.cond.classes) != classes:
            raise Invalid(f"model {name} has classes {m.cond.classes}, the data {classes}")
    image_size = next(iter(models.values())).cfg.image_size
    test, test_info = _test_set(split, test_data, image_size, roots, test_name)
    steps_total = len(models) * len(classes) + len(models) + 2
    done = [0]

    def tick(stage: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(stage, done[0] / steps_total)

    def within(stage: str, part: int, whole: int) -> None:
        """Progress inside the current unit (denoising steps of one class)."""
        if progress is not None:
            progress(stage, (done[0] + part / max(whole, 1)) / steps_total)

    given = dict(synthetic or {})
    synthetic = {}
    for name, m in models.items():
        if name in given:
            synthetic[name] = given[name]
            for _ in classes:
                tick(f"given {name}")
            continue
        synthetic[name] = synthetic_set(
            m,
            counts,
            cfg,
            partial(tick, f"generate {name}"),
            on_step=partial(within, f"generate {name}"),
        )
    # The reference the CLIP-space metrics measure against, and the real set giving the floor.
    if test_info.source == "held-out":
        ref, floor_name, floor = split.train, "real held-out", test
        reference = "real training images"
    else:
        ref, floor_name, floor = test, "real train", split.train
        reference = f"external test set {test_info.name}"
    within("embed real and synthetic images", 0, 1)  # stages announce themselves as they start
    ref_emb, ref_labels = _embed(encoder, ref, cache), ref.labels.numpy()

    def report(data: ImageSet) -> DistributionReport:
        rep = distribution_report(
            ref_emb,
            ref_labels,
            _embed(encoder, data, cache),
            data.labels.numpy(),
            classes,
            codebook,
            cfg.k,
        )
        return DistributionReport.model_validate(rep)

    distribution = {floor_name: report(floor)}
    tick("embed real")
    for name, data in synthetic.items():
        distribution[name] = report(data)
        tick(f"embed {name}")
    train_sets = {"real": split.train, **synthetic}
    within(f"train classifiers ({', '.join(train_sets)} x {len(cfg.seeds)} seeds)", 0, 1)
    down = downstream_experiment(train_sets, test, classes, cfg.downstream, cfg.seeds)
    tick("downstream")
    toy = {n: _toy_plausibility(d) for n, d in {"real": split.train, **synthetic}.items()}
    return EvaluationResult(
        classes=classes,
        selection=dict(split.selection),
        n_train=counts,
        n_heldout=split.heldout.per_class_counts(),
        test_set=test_info,
        reference=reference,
        encoder=encoder.identity,
        config=cfg,
        models={
            n: ModelInfo(path=str(m.path), step=m.step, mode=m.cond.mode) for n, m in models.items()
        },
        downstream=DownstreamResult.model_validate(down),
        distribution=distribution,
        toy_plausibility=(
            {n: v for n, v in toy.items() if v is not None}
            if all(v is not None for v in toy.values())
            else None
        ),
        seconds=round(time.perf_counter() - t0, 1),
    )


def evaluation_table(result: EvaluationResult) -> str:
    """Every table of the result as fixed-width text (the CLI's output)."""
    return tables_text(evaluation_tables(result))
