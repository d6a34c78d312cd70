"""What an evaluation asks for and what it returns, as pydantic models, and its tables.

Torch-free on purpose: the worker writes an :class:`EvaluationResult` into the job's row, and the
API and the dashboard (which must not load torch) read it back with the same model; the CLI, the
CSV endpoint and the dashboard all lay it out with :func:`evaluation_tables`, so the three show
the same cells. ``ml.evaluation.evaluate`` and ``ml.evaluation.downstream`` re-export the configs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml.config import MAX_PER_CLASS, MAX_SEED, Backbone, SchedulerName
from ml.prototypes.weights import UNTRAINED

# --- what is asked ------------------------------------------------------------------------------


class DownstreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: Backbone = "small"
    epochs: int = Field(30, ge=1, le=1000)  # bounds: sizes that protect the machine
    batch_size: int = Field(64, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, le=10.0)
    image_size: int = Field(64, ge=16, le=512, description="images are resized to this side")
    augment: bool = Field(True, description="random horizontal and vertical flips")
    seed: int | None = Field(
        0,
        ge=0,
        description="the classifier's seed; a result's config holds none, its "
        "``seeds`` list the classifiers run",
    )
    device: str | None = None
    weights: Path | None = Field(None, description="local ImageNet state dict for a ResNet")
    progress: bool = False


class EvalConfig(BaseModel):
    """What the evaluation generates and trains; defaults follow the seed (3 seeds)."""

    model_config = ConfigDict(extra="forbid")

    # Upper bounds as the CLI's and the API's (EvaluateRequest in service/evaluations.py): sizes
    # that protect the machine, the same wherever the config comes from.
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


# --- what is returned ---------------------------------------------------------------------------


class Scores(BaseModel):
    """Macro scores (fractions) of one classifier, or their mean or sd over seeds."""

    precision: float
    recall: float
    f1: float
    accuracy: float


class ClassScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class DownstreamRun(Scores):
    """One classifier (one training set, one seed) on the test set (ml.evaluation.downstream's
    scores)."""

    seed: int
    per_class: dict[str, ClassScores]
    support: list[int]
    confusion: list[list[int]] = Field(description="rows: true class, columns: predicted")


class SetScores(BaseModel):
    """A training set's classifiers over the seeds; ``std`` is the sample sd (ddof=1)."""

    n_train: int
    runs: list[DownstreamRun]
    mean: Scores
    std: Scores
    per_class_f1: dict[str, float] = Field(description="each class's F1, mean over seeds")


class ChanceLevel(BaseModel):
    """Macro scores (fractions) of a classifier that learnt nothing; for the uniform guess the
    mean over simulated guessers and the central 95% range of their macro F1."""

    precision: float
    recall: float
    f1: float
    f1_low: float | None = None
    f1_high: float | None = None


class ChanceLevels(BaseModel):
    """The levels every macro F1 on this test set is read against (``ml.evaluation.chance``)."""

    uniform: ChanceLevel = Field(description="each image given a uniformly random class")
    majority: ChanceLevel = Field(description="every image given the most frequent class")
    draws: int = Field(description="simulated uniform guessers")


class DownstreamResult(BaseModel):
    """The seed's Tables 5-6: a classifier per (training set, seed), all on one test set."""

    classes: list[str]
    seeds: list[int]
    n_test: int
    config: DownstreamConfig
    sets: dict[str, SetScores]
    chance: ChanceLevels | None = Field(
        None, description="absent only in results stored before chance levels were recorded"
    )


class Distances(BaseModel):
    """CLIP-space statistics of one set against the reference images; None where the set is
    too small for the statistic (FD: n < 2; precision/recall: n <= k) or, for consistency,
    without a codebook."""

    fd: float | None
    precision: float | None
    recall: float | None
    n_real: int = Field(description="reference images")
    n_fake: int = Field(description="images compared with them")
    consistency: float | None = None


class DistributionReport(BaseModel):
    classes: list[str]
    k: int
    overall: Distances
    per_class: dict[str, Distances]


class ModelInfo(BaseModel):
    path: str
    step: int
    mode: str


class TestSetInfo(BaseModel):
    """The real images every score is measured on: the held-out part of the models' own split,
    or an external folder (another site or scanner) whose classes were matched by name."""

    source: Literal["held-out", "external"]
    name: str
    path: str = Field(description="the folder the images were read from")
    dataset_id: int | None = Field(None, description="the registered dataset, via the API")
    layout: str
    n_per_class: dict[str, int]
    total: int
    ignored_classes: list[str] = Field(
        default_factory=list, description="classes of the folder the models do not know"
    )


class EvaluationResult(BaseModel):
    """What :func:`ml.evaluation.evaluate.evaluate` returns and an evaluate job stores as its
    result."""

    classes: list[str]
    selection: dict[str, Any] = Field(
        description="the models' split (ml.data.images.load_selection)"
    )
    n_train: dict[str, int]
    n_heldout: dict[str, int]
    test_set: TestSetInfo | None = Field(
        None, description="absent only in results stored before test sets were recorded"
    )
    reference: str = Field(
        "real training images", description="what the CLIP-space metrics compare against"
    )
    encoder: str
    config: EvalConfig
    models: dict[str, ModelInfo]
    downstream: DownstreamResult
    distribution: dict[str, DistributionReport]
    toy_plausibility: dict[str, dict[str, float]] | None = None
    seconds: float


# --- its tables ---------------------------------------------------------------------------------

SET_ORDER = ("real", "baseline", "prototype")  # the seed's Tables 5-6 rows, others after them
SCORES = ("precision", "recall", "f1")
DISTANCES = ("fd", "precision", "recall", "consistency")
DISTANCE_HEADERS = ["FD", "precision", "recall", "prototype consistency", "n real", "n compared"]


class Table(BaseModel):
    """Headers and rows of formatted cells; an empty cell is a statistic that does not exist."""

    key: str = Field(description="a stable name (the HTML table's id)")
    title: str
    headers: list[str]
    rows: list[list[str]]
    labels: int = Field(1, description="leading columns that name the row; numbers follow")


def ordered(names: Any) -> list[str]:
    names = list(names)
    return [n for n in SET_ORDER if n in names] + [n for n in names if n not in SET_ORDER]


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def test_set_label(result: EvaluationResult) -> str:
    """'20 held-out real images' or '35 real images of external set X'."""
    info, n = result.test_set, result.downstream.n_test
    if info is None or info.source == "held-out":
        return f"{n} held-out real images"
    return f"{n} real images of the external test set {info.name}"


def downstream_table(down: DownstreamResult, test: str | None = None) -> Table:
    """Tables 5-6: macro precision, recall and F1 in %, mean and sd over seeds, per set."""
    heads = [h for k in ("precision", "recall", "F1") for h in (f"{k} (%)", f"{k} sd")]
    rows = []
    for name in ordered(down.sets):
        s = down.sets[name]
        mean, sd = s.mean.model_dump(), s.std.model_dump()
        rows.append([name, *(_pct(x[k]) for k in SCORES for x in (mean, sd)), str(s.n_train)])
    rows += chance_rows(down.chance)
    seeds = ", ".join(map(str, down.seeds))
    return Table(
        key="downstream",
        title=f"Downstream classifier tested on {test or f'{down.n_test} real images'}, "
        f"mean and sd over {len(down.seeds)} seed(s) ({seeds})",
        headers=["training set", *heads, "n train"],
        rows=rows,
    )


def chance_rows(chance: ChanceLevels | None) -> list[list[str]]:
    """The two rows that say what learning nothing scores on the same test set, laid out as
    the sets' rows (no sd, no training images)."""
    if chance is None:
        return []
    u, m = chance.uniform, chance.majority
    label = f"chance: uniform guess (F1 95% range {_pct(u.f1_low)}-{_pct(u.f1_high)})"
    return [
        [name, *(c for k in SCORES for c in (_pct(getattr(lvl, k)), "")), ""]
        for name, lvl in ((label, u), ("chance: majority class", m))
    ]


def _distance_cells(d: Distances) -> list[str]:
    return [*(_num(getattr(d, k)) for k in DISTANCES), str(d.n_real), str(d.n_fake)]


def feature_space(encoder: str) -> str:
    """How a table of feature-space statistics names its space, with the caveat an untrained
    encoder needs: its features are random projections, so the distances say nothing about how
    CLIP (or any trained encoder) would see the images."""
    if f"|{UNTRAINED}|" in encoder:
        name = encoder.split("|", 1)[0]
        return f"UNTRAINED {name} space (random features: not CLIP's view of the images)"
    if encoder.startswith("learned:"):
        return "learned encoder space"
    return "CLIP space"


def evaluation_tables(result: EvaluationResult) -> list[Table]:
    """Every table of an evaluation, in order: Tables 5-6, CLIP space overall and per class,
    then the toy checker where there is one. Text, CSV and HTML all render these."""
    dist, space = result.distribution, feature_space(result.encoder)
    tables = [
        downstream_table(result.downstream, test_set_label(result)),
        Table(
            key="distribution",
            title=f"{space} against the {result.reference}",
            headers=["set", *DISTANCE_HEADERS],
            rows=[[name, *_distance_cells(rep.overall)] for name, rep in dist.items()],
        ),
        Table(
            key="distribution-per-class",
            title=f"{space} per class against the {result.reference}",
            headers=["class", "set", *DISTANCE_HEADERS],
            labels=2,
            rows=[
                [cls, name, *_distance_cells(rep.per_class[cls])]
                for cls in result.classes
                for name, rep in dist.items()
                if cls in rep.per_class
            ],
        ),
    ]
    toy = result.toy_plausibility
    if toy:
        rows = []
        for name in ordered(toy):
            per = toy[name]
            mean = sum(per.values()) / len(per) if per else None
            rows.append([name, *(_pct(per.get(c)) for c in result.classes), _pct(mean)])
        tables.append(
            Table(
                key="toy",
                title="Toy checker plausibility (%)",
                headers=["set", *result.classes, "mean"],
                rows=rows,
            )
        )
    return tables


def tables_text(tables: list[Table], empty: str = "-") -> str:
    """Fixed-width text (the CLI's): label columns left-aligned, numbers right-aligned."""
    blocks = []
    for t in tables:
        grid = [t.headers, *([c or empty for c in row] for row in t.rows)]
        widths = [max(len(r[i]) for r in grid) for i in range(len(t.headers))]
        lines = [t.title + ":"]
        for n, row in enumerate(grid):
            cells = [
                c.ljust(w) if i < t.labels else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("-" * len(lines[-1]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def tables_csv(tables: list[Table]) -> str:
    """The tables one after another, each as its header row and rows, a blank row between."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for n, t in enumerate(tables):
        if n:
            w.writerow([])
        w.writerow(t.headers)
        w.writerows(t.rows)
    return buf.getvalue()
