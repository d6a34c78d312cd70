"""Expert studies: named readers judge the images of some batches (and real controls) in a
Label Studio project of the study's own, each image by ``overlap`` of them, and one report
ties it together.

What Label Studio Community does and protomed relies on: the study's project is created with
``maximum_annotations = overlap`` (the label stream stops serving a task once it has that many
annotations) and *Uniform sampling* (each reader gets the next task at random among those left,
so readers see the images in different orders, never a task they already annotated), with
annotation history, collaborators' predictions and the skip button off
(``workers/review_sync.py``). What it cannot do: assign a task to a user or keep a project
from any member of the organisation (per-project membership and task assignment are
Enterprise features), and any member can open the data manager and see others' annotations.
So protomed counts a read only when it comes from a named reader (by Label Studio e-mail),
is complete, is not flagged (written by someone else in the reader's name) and is on a task as
imported; every other read is reported in ``not_counted``, and progress and agreement count
the named readers' reads alone.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ml.errors import Invalid, NotFound
from service.config import Settings
from service.db.models import (
    Batch,
    BatchSource,
    Image,
    Job,
    Review,
    ReviewProject,
    ReviewTask,
    Study,
    StudyStatus,
)
from service.report_schemas import RateEntry
from service.reports import COUNTED, Judgement, image_rate, pct, plausibility_report
from service.reviews import (
    SentForReview,
    checked_batches,
    judgements,
    request_batch_review,
    require_label_studio,
)
from service.study_schemas import (
    NotCounted,
    ReaderProgress,
    StudyClass,
    StudyCreated,
    StudyOut,
    StudyPooled,
    StudyProgress,
    StudyReport,
    StudyRequest,
)
from service.study_statistics import Agreement, agreement


class StudyError(Invalid):
    """A study that cannot be made as asked (the message says why)."""


class NoStudy(NotFound):
    """No study with that id."""


def readers_of(given: Iterable[str]) -> list[str]:
    """The readers as stored: e-mails trimmed and lower-cased (Label Studio compares e-mails
    case-insensitively), each once; :class:`StudyError` for an empty list, something that is
    not an e-mail, or a reader named twice."""
    readers = [r.strip().lower() for r in given]
    if not readers:
        raise StudyError("name at least one reader (a Label Studio e-mail)")
    bad = [r for r in readers if r.count("@") != 1 or not all(r.split("@")) or " " in r]
    if bad:
        raise StudyError(f"readers are Label Studio e-mails; not one: {', '.join(bad)}")
    twice = sorted(r for r, n in Counter(readers).items() if n > 1)
    if twice:
        raise StudyError(f"reader named more than once: {', '.join(twice)}")
    return readers


def create_study(
    session: Session, settings: Settings, request: StudyRequest, requested_by: str
) -> tuple[Study, SentForReview, Job]:
    """Make the study and its own review project, and send its batches (and ``controls``)
    there through the review path (:func:`service.reviews.request_batch_review`: blinded,
    shuffled, a queued sync job). Checked before anything is stored: Label Studio configured
    (:class:`~ml.errors.Conflict`), readers (:func:`readers_of`), ``1 <= overlap <=`` readers,
    the batches exist (:class:`~ml.errors.NotFound`), are generated, have their images and
    share one review domain."""
    require_label_studio(settings)
    readers = readers_of(request.readers)
    if not 1 <= request.overlap <= len(readers):
        raise StudyError(
            f"overlap must be 1 to the number of readers ({len(readers)}), not {request.overlap}"
        )
    found, criteria_set = checked_batches(session, request.batch_ids, request.domain)
    domains = {d for b in found if b.model is not None and (d := b.model.dataset.domain)}
    if len(domains) > 1 or (domains and domains != {criteria_set.domain}):
        raise StudyError(
            f"the batches must share one review domain (theirs: {', '.join(sorted(domains))}; "
            f"the study's: {criteria_set.domain})"
        )
    study = Study(
        name=request.name,
        domain=criteria_set.domain,
        criteria_set=criteria_set,
        readers=readers,
        overlap=request.overlap,
        batch_ids=[b.id for b in found],
        ask_origin=request.ask_origin,
        margin=request.margin,
        created_by=requested_by,
        status=StudyStatus.open,
    )
    session.add(study)
    session.flush()
    # the study's own Label Studio project asks "real or synthetic?" when the study does
    project = ReviewProject(
        criteria_set=criteria_set, study=study, origin_question=request.ask_origin
    )
    session.add(project)
    session.flush()
    controls = request.controls.controls() if request.controls else None
    sent, job = request_batch_review(
        session, settings, study.batch_ids, None, None, requested_by, controls, project=project
    )
    return study, sent, job


def study_created(study: Study, sent: SentForReview, job: Job, public: str | None) -> StudyCreated:
    leak = (sent.controls[0].control or {}).get("leak", {}) if sent.controls else {}
    return StudyCreated(
        study=study_out(study, public),
        job_id=job.id,
        added=len(sent.tasks),
        control_batch_ids=[b.id for b in sent.controls],
        png_size_auc=leak.get("png_size_auc"),
    )


def get_study(session: Session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise NoStudy(f"no study with id {study_id}")
    return study


def list_studies(session: Session) -> list[Study]:
    return list(session.scalars(select(Study).order_by(Study.id)))


def control_batch_ids(study: Study) -> list[int]:
    project = study.project
    if project is None:
        return []
    ids = {t.image.batch_id for t in project.tasks if t.image.batch.source == BatchSource.control}
    return sorted(ids)


def study_out(study: Study, public: str | None) -> StudyOut:
    """The study with its project and where readers find it in Label Studio (``public``: its
    address as their browsers reach it)."""
    project = study.project
    ls_id = project.ls_project_id if project is not None else None
    return StudyOut(
        id=study.id,
        name=study.name,
        domain=study.domain,
        criteria_set_id=study.criteria_set_id,
        criteria_version=study.criteria_set.version,
        readers=list(study.readers),
        overlap=study.overlap,
        ask_origin=study.ask_origin,
        margin=study.margin,
        status=str(study.status),
        created_by=study.created_by,
        created_at=study.created_at,
        batch_ids=list(study.batch_ids),
        control_batch_ids=control_batch_ids(study),
        project_id=project.id if project is not None else None,
        ls_project_id=ls_id,
        url=f"{public.rstrip('/')}/projects/{ls_id}/data" if public and ls_id else None,
    )


def studies_of_model(session: Session, model_id: int) -> list[int]:
    """The studies that put images of the model before their readers (the model card's
    links)."""
    rows = session.scalars(
        select(ReviewProject.study_id)
        .distinct()
        .join(ReviewTask, ReviewTask.project_id == ReviewProject.id)
        .join(Image, ReviewTask.image_id == Image.id)
        .join(Batch, Image.batch_id == Batch.id)
        .where(Batch.model_id == model_id, ReviewProject.study_id.is_not(None))
    )
    return sorted(i for i in rows if i is not None)


# --- progress ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Read:
    image_id: int
    reviewer: str
    email: str | None
    plausible: bool | None
    flagged: bool
    edited: bool


def _reads(session: Session, project_id: int) -> tuple[list[int], list[_Read]]:
    """The project's images (one per task) and every stored read of them."""
    images = list(
        session.scalars(select(ReviewTask.image_id).where(ReviewTask.project_id == project_id))
    )
    rows = session.execute(
        select(
            ReviewTask.image_id,
            Review.reviewer,
            Review.reviewer_email,
            Review.plausible,
            Review.flagged,
            ReviewTask.edited,
        )
        .join(ReviewTask, Review.task_id == ReviewTask.id)
        .where(ReviewTask.project_id == project_id)
        .order_by(Review.id)
    ).all()
    reads = [
        _Read(i, reviewer, email, plausible, bool(flagged), edited is not None)
        for i, reviewer, email, plausible, flagged, edited in rows
    ]
    return images, reads


def study_progress(session: Session, study: Study) -> StudyProgress:
    """How far the readers got: per image the named readers with a counted read (module
    docstring), the study complete once every image has ``overlap`` of them; per reader their
    reads, an even share and the images still open to them; every other read by reason."""
    project = study.project
    images, reads = _reads(session, project.id) if project is not None else ([], [])
    named = set(study.readers)
    by_image: dict[int, set[str]] = {i: set() for i in images}
    skipped: Counter[str] = Counter()
    others: set[str] = set()
    for r in reads:
        email = (r.email or "").lower()
        if r.edited:
            skipped["on_edited_tasks"] += 1
        elif email not in named:
            skipped["other_readers"] += 1
            others.add(r.email or r.reviewer)
        elif r.flagged:
            skipped["flagged"] += 1
        elif r.plausible is None:
            skipped["incomplete"] += 1
        else:
            by_image.setdefault(r.image_id, set()).add(email)
    k = study.overlap
    short = {i for i, who in by_image.items() if len(who) < k}
    expected = math.ceil(len(by_image) * k / len(study.readers)) if study.readers else 0
    readers = [
        ReaderProgress(
            reader=reader,
            reads=sum(reader in who for who in by_image.values()),
            expected=expected,
            open_to_reader=sum(reader not in by_image[i] for i in short),
        )
        for reader in study.readers
    ]
    return StudyProgress(
        images=len(by_image),
        complete_images=len(by_image) - len(short),
        reads_needed=len(by_image) * k,
        reads_counted=sum(min(len(who), k) for who in by_image.values()),
        complete=bool(by_image) and not short,
        readers=readers,
        not_counted=NotCounted(
            on_edited_tasks=skipped["on_edited_tasks"],
            other_readers=skipped["other_readers"],
            other_reader_ids=sorted(others),
            flagged=skipped["flagged"],
            incomplete=skipped["incomplete"],
        ),
    )


def refresh_status(session: Session, project: ReviewProject) -> None:
    """After a pull: the project's study ``complete`` when every image has its reads, ``open``
    again when a change in Label Studio took reads away."""
    study = project.study
    if study is None:
        return
    done = study_progress(session, study).complete
    study.status = StudyStatus.complete if done else StudyStatus.open


# --- the report ----------------------------------------------------------------------------------


def _agreement(js: Iterable[Judgement]) -> Agreement:
    """Fleiss' kappa and Krippendorff's alpha over the images (units) with reads from at
    least two readers; one read per reader and image (the later one)."""
    by_image: dict[int, dict[str, bool]] = defaultdict(dict)
    for j in js:
        if j.plausible is not None and j.sample == COUNTED:
            by_image[j.image_id][j.reviewer] = j.plausible
    return agreement({i: list(v.values()) for i, v in by_image.items()})


def _models_of(session: Session, study: Study) -> list[int]:
    rows = session.scalars(select(Batch.model_id).where(Batch.id.in_(study.batch_ids)))
    return sorted({m for m in rows if m is not None})


def study_report(session: Session, study: Study, public: str | None = None) -> StudyReport:
    """The study's report: the plausibility report (:func:`service.reports.plausibility_report`)
    over the study's project and its named readers' unflagged reads, per class the real images'
    and each model's rate with Wilson intervals and each model minus real, agreement per class
    and pooled, and progress."""
    project = study.project
    found = judgements(
        session,
        model_ids=_models_of(session, study) or None,
        flagged="exclude",
        project_id=project.id if project is not None else 0,  # ids start at 1
        readers=list(study.readers),
    )
    report = plausibility_report(
        found.judgements,
        found.columns,
        found.criteria,
        controls=found.controls,
        leaks=found.leaks,
        margin=study.margin,
    )
    every = [*found.judgements, *found.controls]
    classes = [
        StudyClass(
            class_name=c.class_name,
            real=c.real,
            models=c.models,
            versus_real=c.versus_real,
            agreement=_agreement(j for j in every if j.class_name == c.class_name),
        )
        for c in report.classes
    ]
    counted_real = [j for j in found.controls if j.sample == COUNTED]
    return StudyReport(
        study=study_out(study, public),
        progress=study_progress(session, study),
        models=report.models,
        classes=classes,
        pooled=StudyPooled(
            real=image_rate(counted_real) if found.controls else None,
            models=report.average.pooled,
            agreement=_agreement(every),
        ),
        plausibility=report,
    )


def _rate(entry: RateEntry | None) -> list[str]:
    """'% (n)' and its Wilson interval, as the CSV cells of one rate ('' without)."""
    if entry is None:
        return ["", ""]
    lo, hi = entry.ci
    return [f"{pct(entry.rate)} (n={entry.images})", f"[{100 * lo:.1f}; {100 * hi:.1f}]"]


def _kappa(a: Agreement) -> list[str]:
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.3f}"

    return [num(a.kappa), str(a.kappa_units), num(a.alpha), str(a.alpha_units)]


def study_csv(report: StudyReport) -> str:
    """The report for a spreadsheet or a paper's table: per class (and pooled) the real images'
    and each model's % plausible with n and Wilson 95% interval, each model minus real in
    points with Newcombe's interval, Fleiss' kappa and Krippendorff's alpha with their images;
    then per reader the counted reads, and the reads not counted by reason."""
    s, p = report.study, report.progress
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["study", f"#{s.id} {s.name}"])
    w.writerow(["domain", f"{s.domain} (criteria v{s.criteria_version})"])
    w.writerow(["readers", "; ".join(s.readers)])
    w.writerow(["overlap", s.overlap])
    w.writerow(["status", "complete" if p.complete else "open"])
    w.writerow([])
    header = ["class", "real (%)", "real 95% CI"]
    for m in report.models:
        header += [f"{m.label} (%)", "95% CI", f"{m.label} minus real (pp)", "95% CI"]
    header += ["Fleiss kappa", "kappa images", "Krippendorff alpha", "alpha images"]
    w.writerow(header)
    rows: Sequence[tuple[str, StudyClass | StudyPooled]] = [
        *((c.class_name, c) for c in report.classes),
        ("pooled", report.pooled),
    ]
    for name, row in rows:
        cells = [name, *_rate(row.real)]
        for m in report.models:
            cells += _rate(row.models.get(str(m.id)))
            d = row.versus_real.get(str(m.id)) if isinstance(row, StudyClass) else None
            cells += (
                ["", ""]
                if d is None
                else [f"{100 * d.value:.2f}", f"[{100 * d.ci[0]:.1f}; {100 * d.ci[1]:.1f}]"]
            )
        w.writerow([*cells, *_kappa(row.agreement)])
    w.writerow([])
    w.writerow(["reader", "counted reads", "even share", "open to reader"])
    for r in p.readers:
        w.writerow([r.reader, r.reads, r.expected, r.open_to_reader])
    w.writerow(["images", p.images, "complete", p.complete_images])
    n = p.not_counted
    w.writerow([])
    w.writerow(["not counted", "reads"])
    w.writerow(["by readers the study does not name", n.other_readers])
    w.writerow(["flagged (written in another's name)", n.flagged])
    w.writerow(["incomplete", n.incomplete])
    w.writerow(["on edited tasks", n.on_edited_tasks])
    return out.getvalue()
