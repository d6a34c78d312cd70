"""Model cards: one page per trained model saying what it was trained on (and under which
licence), with which encoder and settings, how it scored (evaluation without experts, expert
plausibility with intervals, memorisation audits), and what it is for and not for.

Why: synthetic medical images travel (papers, shared folders, other labs' training sets); the
card is what travels with the model, in the spirit of Mitchell et al., "Model Cards for Model
Reporting" (FAT* 2019). Every figure comes from what the service stored (the model row, its
dataset, its jobs, reviews and audits); nothing is estimated here. The checkpoint's sha256 is
the one each generated PNG names in its provenance (``ml.diffusion.provenance``), which links an
image
found elsewhere back to this card. JSON (:class:`ModelCard`) and Markdown
(:func:`card_markdown`) say the same things. Torch-free.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audits import AuditUnavailable, latest_audit
from service.db.models import Batch, Job, JobKind, JobStatus, Model
from service.reviews import plausibility
from service.studies import studies_of_model
from service.sweeps import sweeps_of

NON_COMMERCIAL = ("NC", "NON-COMMERCIAL", "NONCOMMERCIAL")
INTENDED_USE = (
    "Research on synthetic training data for medical image classifiers, and expert review "
    "studies of such images. Every image it generates is synthetic: it shows no patient, and "
    "must be labelled as generated wherever it is used (its PNG says so in XMP metadata)."
)
LIMITS = [
    "Not for diagnosis, and not a substitute for real images in clinical validation.",
    "Trained on a small labelled set: classes, sites, scanners and populations absent from "
    "the training data are not represented; the images inherit the training data's biases.",
    "Plausibility figures hold for the reviewers and criteria that produced them.",
    "A memorisation audit flags near-copies of training images by nearest-neighbour distance; "
    "it is a check, not a formal privacy guarantee.",
]


class TrainingData(BaseModel):
    dataset_id: int
    name: str
    layout: str
    domain: str | None
    licence: str | None = Field(description="as recorded at registration; None: not recorded")
    classes: list[str]
    counts: dict[str, int] = Field(description="images per class in the registered folder")
    n_per_class: int | None = Field(None, description="training images per class used")
    n_heldout: int | None = Field(None, description="held-out images per class, never trained on")
    split_seed: int | None = None


class Training(BaseModel):
    preset: str
    mode: str
    class_table: str
    config: dict[str, Any]
    steps: int | None
    final_loss: float | None
    encoder: str | None = Field(
        description="the codebook's encoder: CLIP (and weights), or learned:<sha256>"
    )
    checkpoint_sha256: str | None
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None


class EvaluationEntry(BaseModel):
    job_id: int
    role: str = Field(description="the column this model was evaluated as")
    f1: float | None = Field(description="downstream macro F1, mean over classifier seeds")
    fd: float | None = Field(description="CLIP-space Frechet distance to the real training set")


class PlausibilityEntry(BaseModel):
    class_name: str
    images: int
    plausible: int
    rate: float | None
    ci: tuple[float, float]


class AuditEntry(BaseModel):
    batch_id: int
    class_name: str
    n_images: int
    n_flagged: int
    expected_false_flag_rate: float = Field(description="on real images, by calibration")


class ModelCard(BaseModel):
    model_id: int
    status: str
    created_at: datetime
    training_data: TrainingData
    training: Training
    evaluations: list[EvaluationEntry]
    plausibility: list[PlausibilityEntry] = Field(description="image as unit, Wilson 95%")
    plausibility_method: str
    audits: list[AuditEntry]
    guidance: dict[str, float] = Field(
        default_factory=dict,
        description="per-class guidance defaults POST /generate uses (from a sweep or set by "
        "hand); classes absent use the service's default",
    )
    sweeps: list[int] = Field(default_factory=list, description="the model's guidance sweeps")
    studies: list[int] = Field(
        default_factory=list,
        description="the expert studies that judged the model's images (GET /studies/{id}/report)",
    )
    intended_use: str = INTENDED_USE
    licence_notice: str
    limits: list[str]


def licence_notice(licence: str | None) -> str:
    """What the dataset's licence means for the images made from it (not legal advice)."""
    if not licence:
        return (
            "The training data's licence was not recorded; find it before sharing the model "
            "or its images (register the dataset with `licence`)."
        )
    text = (
        f"Trained on data published under {licence}; generated images derive from it and "
        "carry its terms (attribution"
    )
    if any(tag in licence.upper().replace("_", "-") for tag in NON_COMMERCIAL):
        text += ", non-commercial use only"
    if "SA" in licence.upper().replace("-", " ").split():
        text += ", shared under the same licence"
    return text + ")."


def _train_job(session: Session, model_id: int) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.model_id == model_id, Job.kind == JobKind.train)
        .where(Job.status == JobStatus.succeeded)
        .order_by(Job.id.desc())
    ).first()


def _audits(session: Session, model_id: int) -> list[AuditEntry]:
    out = []
    for batch_id in session.scalars(select(Batch.id).where(Batch.model_id == model_id)):
        try:
            _, stored = latest_audit(session, batch_id)
        except AuditUnavailable:
            continue
        out += [
            AuditEntry(
                batch_id=batch_id,
                class_name=c.class_name,
                n_images=c.n_images,
                n_flagged=c.n_flagged,
                expected_false_flag_rate=c.calibration.expected_false_flag_rate,
            )
            for c in stored.report.per_class
        ]
    return out


def build_card(session: Session, model: Model) -> ModelCard:
    """The card of ``model`` from what the service stored about it."""
    metrics: dict[str, Any] = dict(model.metrics or {})
    selection: dict[str, Any] = dict(metrics.get("selection") or {})
    ds = model.dataset
    job = _train_job(session, model.id)
    seconds = None
    if job is not None and job.started_at is not None and job.finished_at is not None:
        seconds = (job.finished_at - job.started_at).total_seconds()
    report = plausibility(session, models=str(model.id))
    key = str(model.id)
    rates = [
        PlausibilityEntry(
            class_name=row.class_name,
            images=row.models[key].images,
            plausible=row.models[key].plausible,
            rate=row.models[key].rate,
            ci=(row.models[key].ci[0], row.models[key].ci[1]),
        )
        for row in report.classes
    ]
    k = (metrics.get("prototypes") or {}).get("k")
    encoder = metrics.get("encoder")
    learned = str(encoder or "").startswith("learned:")
    source = "a domain encoder learned from the training images" if learned else "CLIP"
    table = (
        f"class prototypes from the codebook of {source} (frozen)"
        if str(model.mode) == "prototype"
        else "randomly initialised, learned class embeddings (baseline)"
    )
    limits = list(LIMITS)
    if encoder and "untrained" in str(encoder).lower():
        limits.insert(
            0,
            "Its prototypes come from an UNTRAINED encoder (random features): "
            "they test nothing about CLIP.",
        )
    if learned:
        limits.insert(
            0,
            "Its prototypes come from a small CNN trained jointly with them on this "
            "dataset's training images (no CLIP): images are measured with the CLIP "
            "encoder, never in that learned space.",
        )
    return ModelCard(
        model_id=model.id,
        status=str(model.status),
        created_at=model.created_at,
        training_data=TrainingData(
            dataset_id=ds.id,
            name=ds.name,
            layout=ds.layout,
            domain=ds.domain,
            licence=ds.licence,
            classes=list(model.classes),
            counts=dict(ds.counts or {}),
            n_per_class=selection.get("n_per_class"),
            n_heldout=selection.get("n_heldout"),
            split_seed=selection.get("seed"),
        ),
        training=Training(
            preset=model.preset,
            mode=str(model.mode),
            class_table=table + (f", K={k} per class" if k else ""),
            config=dict(model.config or {}),
            steps=metrics.get("steps"),
            final_loss=metrics.get("final_loss"),
            encoder=encoder,
            checkpoint_sha256=metrics.get("checkpoint_sha256"),
            started_at=job.started_at if job else None,
            finished_at=job.finished_at if job else None,
            seconds=seconds,
        ),
        evaluations=[
            EvaluationEntry(
                job_id=e["job_id"],
                role=e.get("as", str(model.mode)),
                f1=e.get("f1"),
                fd=e.get("fd"),
            )
            for e in metrics.get("evaluations", [])
        ],
        plausibility=rates,
        plausibility_method=report.methods.consensus,
        audits=_audits(session, model.id),
        guidance={c: float(v) for c, v in (model.guidance_defaults or {}).items()},
        sweeps=[sw.id for sw in sweeps_of(session, model.id)],
        studies=studies_of_model(session, model.id),
        licence_notice=licence_notice(ds.licence),
        limits=limits,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _section(
    title: str, header: list[str], rows: list[list[str]], empty: str, note: str | None = None
) -> list[str]:
    """A card section: a Markdown table of ``rows``, or ``empty`` when there are none."""
    lines = ["", f"## {title}", ""]
    if not rows:
        return [*lines, empty]
    lines += [note, ""] if note else []
    table = [header, ["---"] * len(header), *rows]
    return lines + ["| " + " | ".join(cells) + " |" for cells in table]


def card_markdown(card: ModelCard) -> str:
    """The card as Markdown, for a model's repository or a paper's supplement."""
    d, t = card.training_data, card.training
    lines = [
        f"# Model card: protomed model {card.model_id} ({t.mode})",
        "",
        f"Status: {card.status}. Created {card.created_at:%Y-%m-%d %H:%M} UTC.",
        "",
        "## Intended use",
        "",
        card.intended_use,
        "",
        "## Licence",
        "",
        card.licence_notice,
        "",
        "## Training data",
        "",
        f"- Dataset: {d.name} (id {d.dataset_id}, layout {d.layout}, domain {d.domain or 'n/a'})",
        f"- Licence: {d.licence or 'not recorded'}",
        f"- Classes: {', '.join(d.classes)}",
        "- Images per class in the folder: "
        + ", ".join(f"{c} {d.counts.get(c, 0)}" for c in d.classes),
        f"- Used per class: {d.n_per_class if d.n_per_class is not None else 'all'} for "
        f"training, {d.n_heldout if d.n_heldout is not None else 'none'} held out "
        f"(split seed {d.split_seed if d.split_seed is not None else 'n/a'})",
        "",
        "## Training",
        "",
        f"- Preset: {t.preset}; class table: {t.class_table}",
        f"- Encoder: {t.encoder or 'not recorded'}",
        f"- Steps: {t.steps if t.steps is not None else 'n/a'}; final loss: "
        f"{'n/a' if t.final_loss is None else f'{t.final_loss:.4f}'}",
        f"- Training time: {'n/a' if t.seconds is None else f'{t.seconds / 60:.1f} min'}",
        f"- Checkpoint sha256: {t.checkpoint_sha256 or 'not recorded'}",
        "- Configuration: "
        + ", ".join(f"{k}={v}" for k, v in sorted(t.config.items()) if k != "preset"),
    ]
    fd = [("n/a" if e.fd is None else f"{e.fd:.4f}") for e in card.evaluations]
    lines += _section(
        "Evaluation without experts",
        ["job", "as", "downstream F1", "CLIP FD"],
        [[str(e.job_id), e.role, _pct(e.f1), d] for e, d in zip(card.evaluations, fd, strict=True)],
        "No evaluation yet (POST /jobs/evaluate).",
    )
    lines += _section(
        "Expert plausibility",
        ["class", "images", "plausible", "rate", "95% CI"],
        [
            [
                p.class_name,
                str(p.images),
                str(p.plausible),
                _pct(p.rate),
                f"{_pct(p.ci[0])} - {_pct(p.ci[1])}",
            ]
            for p in card.plausibility
        ],
        "No expert verdicts yet.",
        note=f"Unit: the image ({card.plausibility_method}); Wilson 95% intervals.",
    )
    lines += _section(
        "Memorisation audits",
        ["batch", "class", "images", "flagged", "expected on real images"],
        [
            [
                str(a.batch_id),
                a.class_name,
                str(a.n_images),
                str(a.n_flagged),
                _pct(a.expected_false_flag_rate),
            ]
            for a in card.audits
        ],
        "No audit yet (POST /batches/{id}/audit).",
    )
    chosen = ", ".join(f"{c} {v:g}" for c, v in sorted(card.guidance.items()))
    swept = ", ".join(f"#{i}" for i in card.sweeps) or "none"
    lines += [
        "",
        "## Guidance",
        "",
        f"- Per-class defaults: {chosen or 'none'} (other classes: the service default)",
        f"- Guidance sweeps: {swept}",
        "",
        "## Expert studies",
        "",
        *(
            [f"- Study #{i}: `GET /studies/{i}/report`, page /ui/studies/{i}" for i in card.studies]
            or ["No expert study yet (POST /studies)."]
        ),
    ]
    lines += ["", "## Limits", "", *(f"- {x}" for x in card.limits), ""]
    return "\n".join(lines)
