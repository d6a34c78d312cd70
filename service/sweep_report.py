"""The guidance sweep's report, pure: per class and guidance scale, plausibility with the image
as unit (its reviewers' majority, a tie implausible, Wilson 95% interval: the plausibility
report's own counting, :func:`service.reports.image_rate`), a diversity figure per batch, and the
scale recommended per class by a rule the report states.

Guidance trades plausibility for diversity: a higher scale pulls each image towards what the
model thinks the class looks like (more plausible, less varied), a lower one leaves more
variety and more failures. The rule picks the scale whose plausibility is most surely high
(the highest Wilson lower bound), so a scale judged on few images cannot win on a lucky
streak, and breaks ties towards the smaller scale, which keeps more diversity. Torch-free and
web-free: the API, the CLI and the dashboard share it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field

from service.report_schemas import RateEntry
from service.reports import Judgement, image_rate, pct

TIE = 1e-9  # lower bounds closer than this count as equal


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class SweepMethods(_Model):
    """What the numbers mean, stated in the report itself."""

    unit: str = "image"
    consensus: str = (
        "plausible iff more of the image's reviewers said plausible than not; a tie counts as "
        "implausible"
    )
    intervals: str = "Wilson score 95% per rate"
    rule: str
    diversity: str = (
        "mean pairwise RMS distance between the batch's images, RGB in [0, 1] (0: identical "
        "images); higher means more varied"
    )
    design: str = (
        "paired: every scale of a class starts from the same seeds, so only the guidance differs"
    )


class ScaleEntry(_Model):
    """One (class, scale) cell: its batch, the images judged and how many were plausible."""

    scale: float
    batch_id: int
    generated: int = Field(description="images the batch holds")
    plausibility: RateEntry
    diversity: float | None = Field(description="mean pairwise RMS pixel distance; null < 2")


class ClassSweep(_Model):
    class_name: str = Field(alias="class")
    scales: list[ScaleEntry]
    recommended: float | None = Field(description="the rule's scale; null: none (see reason)")
    reason: str
    separated: bool | None = Field(
        description="the recommended scale's interval lies wholly above every other judged "
        "scale's: a clear winner, not one within the noise; null without a recommendation"
    )


class SweepReport(_Model):
    sweep_id: int
    model_id: int
    scales: list[float]
    n: int = Field(description="images generated per (class, scale)")
    seed: int
    steps: int
    scheduler: str
    min_images: int = Field(description="reviewed images a scale needs to be considered")
    methods: SweepMethods
    classes: list[ClassSweep]
    defaults: dict[str, float] = Field(description="the model's per-class defaults now")


def rule_text(min_images: int) -> str:
    return (
        "per class, the scale with the highest Wilson 95% lower bound on plausibility among the "
        f"scales with at least {min_images} reviewed images; ties go to the smaller scale (more "
        f"diverse images); no recommendation when fewer than two scales have {min_images} "
        "reviewed images, or when no image of the class was judged plausible"
    )


@dataclass(frozen=True)
class Cell:
    """A sweep batch as the report needs it (read from the database by ``service.sweeps``)."""

    class_name: str
    scale: float
    batch_id: int
    generated: int
    diversity: float | None


def recommend(
    entries: Sequence[ScaleEntry], min_images: int
) -> tuple[float | None, str, bool | None]:
    """(scale, reason, separated) by :func:`rule_text`'s rule."""
    judged = [e for e in entries if e.plausibility.images >= min_images]
    if len(judged) < 2:
        return (
            None,
            f"{len(judged)} of {len(entries)} scales have {min_images} or more reviewed images; "
            "the rule needs two",
            None,
        )
    if not any(e.plausibility.plausible for e in judged):
        return None, "no image of this class was judged plausible at any scale", None
    best = judged[0]
    for e in judged[1:]:  # ascending scales: a later one must beat the bound, not tie it
        if e.plausibility.ci[0] > best.plausibility.ci[0] + TIE:
            best = e
    others = [e for e in judged if e is not best]
    separated = all(best.plausibility.ci[0] > e.plausibility.ci[1] for e in others)
    lo, hi = best.plausibility.ci
    reason = (
        f"highest Wilson lower bound: {best.plausibility.plausible}/{best.plausibility.images} "
        f"plausible at {best.scale:g}, 95% CI {100 * lo:.0f}-{100 * hi:.0f}%"
    )
    if not separated:
        reason += "; its interval overlaps another scale's (not a clear winner)"
    return best.scale, reason, separated


def sweep_report(
    *,
    sweep_id: int,
    model_id: int,
    classes: Sequence[str],
    scales: Sequence[float],
    n: int,
    seed: int,
    steps: int,
    scheduler: str,
    cells: Iterable[Cell],
    judgements: Mapping[int, Sequence[Judgement]],
    min_images: int,
    defaults: Mapping[str, float] | None = None,
) -> SweepReport:
    """The report from the sweep's batches (``cells``) and the verdicts on each batch's images
    (``judgements``: batch id -> verdicts)."""
    by_class: dict[str, list[Cell]] = {c: [] for c in classes}
    for cell in cells:
        by_class.setdefault(cell.class_name, []).append(cell)
    rows = []
    for name, found in by_class.items():
        entries = [
            ScaleEntry(
                scale=c.scale,
                batch_id=c.batch_id,
                generated=c.generated,
                plausibility=image_rate(judgements.get(c.batch_id, ())),
                diversity=c.diversity,
            )
            for c in sorted(found, key=lambda c: c.scale)
        ]
        scale, reason, separated = recommend(entries, min_images)
        rows.append(
            ClassSweep(
                class_name=name,
                scales=entries,
                recommended=scale,
                reason=reason,
                separated=separated,
            )
        )
    return SweepReport(
        sweep_id=sweep_id,
        model_id=model_id,
        scales=sorted(scales),
        n=n,
        seed=seed,
        steps=steps,
        scheduler=scheduler,
        min_images=min_images,
        methods=SweepMethods(rule=rule_text(min_images)),
        classes=rows,
        defaults=dict(defaults or {}),
    )


def recommendations(report: SweepReport) -> dict[str, float]:
    """Class -> recommended scale, for the classes that have one."""
    return {c.class_name: c.recommended for c in report.classes if c.recommended is not None}


# --- diversity -----------------------------------------------------------------------------------


def pixels(png: bytes) -> npt.NDArray[np.float64]:
    """An image's RGB values in [0, 1], flattened."""
    with PILImage.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1) / 255.0


def mean_pairwise_distance(images: Sequence[npt.NDArray[np.float64]]) -> float | None:
    """Mean RMS distance over all pairs of equally sized images (flattened, in [0, 1]); None
    with fewer than two. A cheap, torch-free stand-in for a feature-space diversity measure:
    it sees colour and layout, not semantics, so compare it between scales of one class only."""
    if len(images) < 2:
        return None
    sizes = {x.size for x in images}
    if len(sizes) != 1:
        raise ValueError(f"images differ in size: {sorted(sizes)}")
    x = np.stack(images)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0) / x.shape[1]
    i, j = np.triu_indices(len(images), k=1)
    return float(np.mean(np.sqrt(d2[i, j])))


# --- CSV -----------------------------------------------------------------------------------------


def sweep_csv(report: SweepReport) -> str:
    """One row per (class, scale): images judged, plausible, rate and interval in %, diversity,
    whether it is the recommended scale; then the rule."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "class",
            "guidance",
            "batch",
            "generated",
            "images reviewed",
            "reviews",
            "plausible",
            "ties",
            "rate (%)",
            "95% CI (%)",
            "diversity",
            "recommended",
        ]
    )
    for c in report.classes:
        for e in c.scales:
            p = e.plausibility
            lo, hi = p.ci
            w.writerow(
                [
                    c.class_name,
                    f"{e.scale:g}",
                    e.batch_id,
                    e.generated,
                    p.images,
                    p.reviews,
                    p.plausible,
                    p.ties,
                    pct(p.rate),
                    f"[{100 * lo:.1f}; {100 * hi:.1f}]",
                    "" if e.diversity is None else f"{e.diversity:.4f}",
                    "yes" if c.recommended == e.scale else "",
                ]
            )
    w.writerow([])
    w.writerow(["class", "recommended", "reason"])
    for c in report.classes:
        w.writerow([c.class_name, "" if c.recommended is None else f"{c.recommended:g}", c.reason])
    w.writerow(["rule", report.methods.rule])
    return out.getvalue()


def sweep_text(report: SweepReport) -> str:
    """The report as the CLI prints it."""
    lines = [
        f"guidance sweep #{report.sweep_id} of model #{report.model_id}: "
        f"{report.n} images per class and scale, seed {report.seed}, "
        f"{report.scheduler} {report.steps} steps"
    ]
    for c in report.classes:
        lines.append(f"\n{c.class_name}")
        head = f"  {'guidance':>8}  {'plausible':>11}  {'rate':>6}  {'95% CI':>11}  diversity"
        lines.append(head)
        for e in c.scales:
            p = e.plausibility
            mark = "  <- recommended" if c.recommended == e.scale else ""
            div = "-" if e.diversity is None else f"{e.diversity:.3f}"
            ci = f"{100 * p.ci[0]:.0f}-{100 * p.ci[1]:.0f}%"
            rate = "n/a" if p.rate is None else f"{100 * p.rate:.0f}%"
            lines.append(
                f"  {e.scale:>8g}  {p.plausible:>4}/{p.images:<6}  {rate:>6}  {ci:>11}  {div}{mark}"
            )
        lines.append(f"  {c.reason}")
    lines.append(f"\nrule: {report.methods.rule}")
    return "\n".join(lines)
