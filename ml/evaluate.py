"""Evaluation without experts: the seed's utility experiment and CLIP-space distribution metrics.

For each model (baseline, prototype) a synthetic training set is generated with as many images
per class as the real training split has (or ``n_per_class``), so the three training sets of
the downstream classifier (real, baseline, prototype) are the same size per class; all three
are tested on the same held-out real images (those the diffusion models never saw). The same
synthetic images are embedded with the CLIP encoder and compared with the real training images
(Frechet distance, k-NN precision and recall, prototype consistency); the real held-out images
against the real training images give the floor those numbers should be read against. On the
toy domain the rule-based checker's plausibility is added.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ml.checkpoint import LoadedModel
from ml.config import MAX_PER_CLASS, MAX_SEED, SampleConfig, SchedulerName
from ml.data import DatasetSplit, ImageSet, load_selection
from ml.downstream import DownstreamConfig, downstream_experiment, tables_5_6
from ml.encoder import ClipEncoder, EmbeddingCache, embed
from ml.metrics import distribution_report
from ml.prototypes import Codebook
from ml.sample import generate

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]  # (stage, fraction of the whole evaluation)


class EvalConfig(BaseModel):
    """What the evaluation generates and trains; defaults follow the seed (3 seeds)."""

    model_config = ConfigDict(extra="forbid")

    # Upper bounds as the CLI's and the API's (EvaluateRequest in api/schemas.py): sizes that
    # protect the machine, the same wherever the config comes from.
    n_per_class: int | None = Field(
        None, ge=1, le=MAX_PER_CLASS, description="synthetic images per class"
    )
    # The seed's protocol (DDIM-50) by default, so results stay comparable with its Tables 5-6
    # and with earlier runs; scheduler="dpm++sde", steps=20 samples 2.5x faster.
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0, le=50.0)
    scheduler: SchedulerName = "ddim"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(64, ge=1, le=1024)
    k: int = Field(3, ge=1, le=100, description="neighbours for precision/recall")
    seeds: tuple[int, ...] = Field((0, 1, 2), min_length=1)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)


def real_split(
    models: Mapping[str, LoadedModel],
    root: str | None = None,
    roots: Sequence[Path | str] | None = None,
) -> DatasetSplit:
    """The split both models were trained on, at their image size, with its held-out part
    (``root``: where the dataset is on this machine, if not where it was at training;
    ``roots``: the folders its files must resolve inside, as for :func:`ml.data.load_split`)."""
    selections = {name: m.cond.extra.get("selection") for name, m in models.items()}
    if any(not s for s in selections.values()):
        raise ValueError("a model does not record its data selection (trained without a codebook)")
    first = next(iter(selections.values()))
    drop = ("image_size",)
    if any({k: v for k, v in s.items() if k not in drop} != {k: v for k, v in first.items()
           if k not in drop} for s in selections.values()):  # fmt: skip
        raise ValueError(f"the models were trained on different data selections: {selections}")
    sizes = {m.cfg.image_size for m in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"the models generate different image sizes: {sorted(sizes)}")
    if "layout" not in first:
        raise ValueError("the recorded selection has no held-out part; train with a codebook")
    selection = {**first, "image_size": sizes.pop(), **({"root": root} if root else {})}
    split = load_selection(selection, roots)
    counts = split.heldout.per_class_counts() if len(split.heldout) else {}
    empty = [c for c in split.classes if not counts.get(c)]
    if empty:
        raise ValueError(
            f"no held-out real images for {', '.join(empty)}: train with n_heldout >= 1 "
            "(the seed tests on 50 per class) so the classifier is tested on unseen images"
        )
    return split


def synthetic_set(
    model: LoadedModel,
    counts: Mapping[str, int],
    cfg: EvalConfig,
    on_class: Callable[[], None],
    on_step: Callable[[int, int], None] | None = None,
) -> ImageSet:
    """``on_step(done, total)``: denoising steps within the class being generated."""
    scfg = SampleConfig(
        steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler, seed=cfg.seed,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    classes = list(model.cond.classes)
    images, labels = [], []
    for label, name in enumerate(classes):
        n = cfg.n_per_class or counts[name]
        images.append(generate(model, name, n, scfg, on_step=on_step))
        labels += [label] * n
        on_class()
    return ImageSet(images=torch.cat(images), labels=torch.tensor(labels), classes=classes,
                    paths=[""] * len(labels), hashes=[])  # fmt: skip


def _hashes(images: torch.Tensor) -> list[str]:
    from ml.data import pixel_hash

    return [pixel_hash(img) for img in images]


def _embed(encoder: ClipEncoder, data: ImageSet, cache: EmbeddingCache | None) -> np.ndarray:
    return embed(encoder, data.images, _hashes(data.images), cache).numpy()


def _toy_plausibility(data: ImageSet) -> dict[str, float] | None:
    from ml.toy import SPECS, plausibility

    if not set(data.classes) <= set(SPECS):
        return None
    out = {}
    for label, name in enumerate(data.classes):
        imgs = data.images[data.labels == label].permute(0, 2, 3, 1).numpy()
        out[name] = plausibility(imgs, name)
    return out


def evaluate(
    models: Mapping[str, LoadedModel],
    encoder: ClipEncoder,
    cfg: EvalConfig,
    *,
    codebook: Codebook | None = None,
    cache: EmbeddingCache | None = None,
    progress: Progress | None = None,
    synthetic: Mapping[str, ImageSet] | None = None,
    root: str | None = None,
    roots: Sequence[Path | str] | None = None,
) -> dict[str, Any]:
    """The whole comparison for named models (e.g. {"baseline": ..., "prototype": ...}).

    ``synthetic``: images already generated (e.g. reviewed batches) to use for some models
    instead of generating new ones; they must cover every class."""
    t0 = time.perf_counter()
    split = real_split(models, root, roots)
    counts = split.train.per_class_counts()
    classes = list(split.classes)
    for name, m in models.items():
        if list(m.cond.classes) != classes:
            raise ValueError(f"model {name} has classes {m.cond.classes}, the data {classes}")
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
            m, counts, cfg, lambda n=name: tick(f"generate {n}"),
            on_step=lambda d, t, n=name: within(f"generate {n}", d, t),
        )  # fmt: skip
    real_emb = _embed(encoder, split.train, cache)
    held_emb = _embed(encoder, split.heldout, cache)
    distribution = {"real held-out": distribution_report(
        real_emb, split.train.labels.numpy(), held_emb, split.heldout.labels.numpy(), classes,
        codebook, cfg.k)}  # fmt: skip
    tick("embed real")
    for name, data in synthetic.items():
        emb = _embed(encoder, data, cache)
        distribution[name] = distribution_report(
            real_emb, split.train.labels.numpy(), emb, data.labels.numpy(), classes, codebook, cfg.k
        )
        tick(f"embed {name}")
    train_sets = {"real": split.train, **synthetic}
    down = downstream_experiment(train_sets, split.heldout, classes, cfg.downstream, cfg.seeds)
    tick("downstream")
    toy = {n: _toy_plausibility(d) for n, d in {"real": split.train, **synthetic}.items()}
    return {
        "classes": classes,
        "selection": dict(split.selection),
        "n_train": counts,
        "n_heldout": split.heldout.per_class_counts(),
        "encoder": encoder.identity,
        "config": cfg.model_dump(mode="json"),
        "models": {
            n: {"path": str(m.path), "step": m.step, "mode": m.cond.mode} for n, m in models.items()
        },
        "downstream": down,
        "distribution": distribution,
        "toy_plausibility": toy if all(v is not None for v in toy.values()) else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return format(v, spec) if v is not None else "-"


def evaluation_table(result: Mapping[str, Any]) -> str:
    """Tables 5-6 (downstream), then the CLIP-space table (overall FD, P, R, consistency)."""
    lines = [tables_5_6(result["downstream"]), "", "CLIP space vs real training images:"]
    lines.append(f"{'set':<16}{'FD':>10}{'precision':>11}{'recall':>9}{'consistency':>13}")
    f = _fmt
    for name, rep in result["distribution"].items():
        o = rep["overall"]
        lines.append(
            f"{name:<16}{f(o['fd'], '.2f'):>10}{f(o['precision']):>11}{f(o['recall']):>9}"
            f"{f(o.get('consistency')):>13}"
        )
    if result.get("toy_plausibility"):
        lines += ["", "toy checker plausibility (%):"]
        for name, per in result["toy_plausibility"].items():
            mean = 100 * sum(per.values()) / len(per)
            per_class = "  ".join(f"{c} {100 * v:.0f}" for c, v in per.items())
            lines.append(f"{name:<16}{mean:6.1f}  {per_class}")
    return "\n".join(lines)
