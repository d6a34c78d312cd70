"""ORM models of the service's metadata (SQLAlchemy 2 declarative).

Portable on purpose: the same schema runs on SQLite (development, tests) and PostgreSQL
(production), so enumerations are VARCHAR + CHECK (``native_enum=False``) rather than PostgreSQL
ENUM types, JSON is the generic ``JSON`` type and times are ``DateTime(timezone=True)`` in UTC.
Images and artefacts live in storage; rows only hold their keys and paths.

Schema changes go through Alembic (``migrations/``): edit the models, then autogenerate a revision
and check it by hand.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names: Alembic can only drop or alter (batch mode on SQLite) what it
# can name, and names must match between the ORM and every migration.
MAX_ID = 2**31 - 1  # ids and seeds are PostgreSQL INTEGERs

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    """Timestamps are set in Python, timezone-aware, so SQLite and PostgreSQL agree."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware on every backend: SQLite stores no offset, so values read back from it are
    naive; they were written in UTC, so mark them so (PostgreSQL returns them aware already)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    """Declarative base; ``Base.metadata`` is Alembic's target."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - read once by SQLAlchemy
        dict[str, Any]: JSON,
        list[str]: JSON,
        datetime: UTCDateTime(),
    }


class ModelMode(enum.StrEnum):
    """``ml.config.Mode``'s values, written out: a migration fixes the column's CHECK
    constraint, so a new mode needs one as well as a member here."""

    prototype = "prototype"
    baseline = "baseline"


class ModelStatus(enum.StrEnum):
    """A model row exists from the moment its training job is queued."""

    pending = "pending"
    training = "training"
    ready = "ready"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(enum.StrEnum):
    train = "train"
    sample = "sample"
    # Never created (prototypes are learnt inside a train job); kept only because removing it
    # changes ck_jobs_kind (a migration). The worker refuses it: service.job_kinds.spec_for.
    prototypes = "prototypes"
    evaluate = "evaluate"
    review_sync = "review_sync"  # images to Label Studio, verdicts back
    audit = "audit"  # memorisation audit of one batch (params: batch_id, config)
    score = "score"  # train a review domain's plausibility scorer from its verdicts


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class DatasetSource(enum.StrEnum):
    folder = "folder"  # a server-side folder under one of Settings.data_roots
    upload = "upload"  # a zip uploaded through the API, kept in storage


class BatchSource(enum.StrEnum):
    """Where a batch's images come from. ``generated``: a model sampled them. ``control``: real
    images of one class, copied from a dataset's held-out part at the size of the synthetic
    images they are reviewed with (``service.controls``), so the review has a reference rate."""

    generated = "generated"
    control = "control"


class StudyStatus(enum.StrEnum):
    """Where an expert study stands: ``open`` while some image lacks its ``overlap`` counted
    reads from named readers, ``complete`` once every image has them (set by the sync's pull,
    ``service.studies.refresh_status``; a later change in Label Studio can reopen it)."""

    open = "open"
    complete = "complete"


class ReviewSample(enum.StrEnum):
    """Why an image was put before reviewers. ``random``: it belongs to a simple random sample
    of its batch (every image of a batch sent whole is one), so its verdicts estimate the
    batch's plausibility without bias. ``uncertain``: the scorer was least sure about it; its
    verdicts train the scorer but stay out of the plausibility rates (the choice depends on
    the image, so such images are not representative of the batch)."""

    random = "random"
    uncertain = "uncertain"


class ApiKeyRole(enum.StrEnum):
    """admin: everything; viewer: reads results (models, batches, reports), writes nothing;
    reviewer: judges images in Label Studio, so may read nothing that shows a mode, model,
    batch or image id (blinding), only the criteria and review projects."""

    admin = "admin"
    viewer = "viewer"
    reviewer = "reviewer"


def str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """VARCHAR + named CHECK constraint storing the values; portable, and a new value is a plain
    constraint change instead of ``ALTER TYPE``."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        validate_strings=True,
        values_callable=lambda e: [m.value for m in e],
    )


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(
        default=utc_now, server_default=func.now(), nullable=False
    )


class Dataset(TimestampMixin, Base):
    """A registered image folder (under one of ``Settings.data_roots``), scanned by
    ``ml.data.images``."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    root: Mapped[str] = mapped_column(String(1024))
    layout: Mapped[str] = mapped_column(String(32))  # folder | ham10000 | matek (ml.data.catalog)
    classes: Mapped[list[str]] = mapped_column(default=list)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # class name -> image count
    source: Mapped[DatasetSource] = mapped_column(
        str_enum(DatasetSource, "source"), default=DatasetSource.folder
    )
    # Uploads: the zip's storage key, so a worker on another machine can fetch and unpack it.
    archive_key: Mapped[str | None] = mapped_column(String(1024))
    # Review domain (its criteria set): e.g. toy, blood, bone-marrow, dermatoscopy.
    domain: Mapped[str | None] = mapped_column(String(64))
    # The licence the images were published under (e.g. "CC BY-NC-SA 4.0"); model cards carry
    # it to everything made from them. None: not recorded.
    licence: Mapped[str | None] = mapped_column(String(200))

    models: Mapped[list[Model]] = relationship(back_populates="dataset")


class Model(TimestampMixin, Base):
    """A trained (or training) diffusion model and its artefacts."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # RESTRICT: a dataset cannot vanish under the models trained on it.
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="RESTRICT"), index=True
    )
    mode: Mapped[ModelMode] = mapped_column(str_enum(ModelMode, "mode"))
    classes: Mapped[list[str]] = mapped_column(default=list)  # the class table's order
    preset: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Storage keys (not file paths): models/<id>/codebook/..., models/<id>/checkpoint.pt
    codebook_path: Mapped[str | None] = mapped_column(String(1024))  # prototype mode only
    checkpoint_path: Mapped[str | None] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[ModelStatus] = mapped_column(
        str_enum(ModelStatus, "status"), default=ModelStatus.pending, index=True
    )
    # Classifier-free guidance per class (class -> scale), set from a guidance sweep's
    # verdicts or by hand; POST /generate uses it when no guidance is given. None: not set.
    guidance_defaults: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    dataset: Mapped[Dataset] = relationship(back_populates="models")
    jobs: Mapped[list[Job]] = relationship(back_populates="model")
    batches: Mapped[list[Batch]] = relationship(back_populates="model")


class Job(TimestampMixin, Base):
    """One unit of worker work with its lifecycle; the API polls it for progress."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(str_enum(JobKind, "kind"))
    status: Mapped[JobStatus] = mapped_column(
        str_enum(JobStatus, "status"), default=JobStatus.queued, index=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # fraction in [0, 1]
    eta_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    requested_by: Mapped[str | None] = mapped_column(String(200))  # API key name, kept as text
    # None for jobs of no model (review_sync); SET NULL keeps a deleted model's job history.
    model_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="SET NULL"), index=True
    )
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Liveness: the running worker refreshes heartbeat_at; a job whose heartbeat goes stale
    # (worker killed) is re-queued until max attempts, then failed (service.job_state.reap).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    model: Mapped[Model | None] = relationship(back_populates="jobs")
    batches: Mapped[list[Batch]] = relationship(back_populates="job")


class Batch(TimestampMixin, Base):
    """One sampling request: ``n`` images of one class with the settings that reproduce them;
    or, with ``source`` ``control``, ``n`` real images of one class from ``dataset_id``'s
    held-out part (no model; the sampling settings are placeholders), sent to review beside
    synthetic ones."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint("n >= 1", name="n_positive"),
        CheckConstraint("steps >= 1", name="steps_positive"),
        CheckConstraint(
            "(source = 'control' AND model_id IS NULL AND dataset_id IS NOT NULL) OR "
            "(source = 'generated' AND model_id IS NOT NULL)",
            name="source_origin",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # None only for control batches (real images: ``source``).
    model_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="RESTRICT"), index=True
    )
    source: Mapped[BatchSource] = mapped_column(
        str_enum(BatchSource, "source"),
        default=BatchSource.generated,
        server_default=BatchSource.generated.value,
    )
    # Control batches: the dataset the real images come from, and how they were chosen
    # ({seed, per_class | share, files, excluded_models, leak}; ``service.controls``).
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="RESTRICT"), index=True
    )
    control: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    class_name: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    guidance: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(Integer)
    scheduler: Mapped[str] = mapped_column(String(32))  # ml.config.SchedulerName
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    # The scorer version that scored the batch's images (None: no scorer for the domain then),
    # the filter asked for (None: keep every image drawn) and how many images were drawn to
    # keep ``n`` (None until the job ran; ``n`` when nothing was filtered out).
    scorer_id: Mapped[int | None] = mapped_column(
        ForeignKey("scorers.id", ondelete="SET NULL"), index=True
    )
    filter: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    drawn: Mapped[int | None] = mapped_column(Integer)
    # The guidance sweep this batch is one (class, scale) cell of; None for plain batches.
    sweep_id: Mapped[int | None] = mapped_column(
        ForeignKey("sweeps.id", ondelete="SET NULL"), index=True
    )

    model: Mapped[Model | None] = relationship(back_populates="batches")
    dataset: Mapped[Dataset | None] = relationship()
    scorer: Mapped[Scorer | None] = relationship()
    job: Mapped[Job | None] = relationship(back_populates="batches")
    sweep: Mapped[Sweep | None] = relationship(back_populates="batches")
    images: Mapped[list[Image]] = relationship(
        back_populates="batch", cascade="all, delete-orphan", passive_deletes=True
    )


class Sweep(TimestampMixin, Base):
    """A guidance sweep: one batch per (class, scale) of one model, the same seed at every
    scale of a class (paired: only the guidance differs), reviewed blinded together so the
    verdicts say which scale each class looks most plausible at (``service.sweeps``)."""

    __tablename__ = "sweeps"
    __table_args__ = (
        CheckConstraint("n >= 1", name="n_positive"),
        CheckConstraint("steps >= 1", name="steps_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    classes: Mapped[list[str]] = mapped_column(JSON)
    scales: Mapped[list[float]] = mapped_column(JSON)  # ascending
    n: Mapped[int] = mapped_column(Integer)  # images per (class, scale)
    seed: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    scheduler: Mapped[str] = mapped_column(String(32))  # ml.config.SchedulerName
    requested_by: Mapped[str | None] = mapped_column(String(200))

    model: Mapped[Model] = relationship()
    batches: Mapped[list[Batch]] = relationship(back_populates="sweep")


class Image(TimestampMixin, Base):
    """One generated image; its bytes are in storage under ``storage_key``; review tasks
    (``ReviewTask``) refer to it, and reviewers' verdicts to those."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("batch_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    class_name: Mapped[str] = mapped_column(String(200))
    index: Mapped[int] = mapped_column(Integer)  # position within the batch
    storage_key: Mapped[str] = mapped_column(String(1024), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    # The batch's scorer's probability that an expert finds the image plausible (None: unscored).
    score: Mapped[float | None] = mapped_column(Float)

    batch: Mapped[Batch] = relationship(back_populates="images")


class ApiKey(TimestampMixin, Base):
    """An API key; only its hash is stored. Revoked keys are kept for the audit trail."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[ApiKeyRole] = mapped_column(str_enum(ApiKeyRole, "role"))
    revoked_at: Mapped[datetime | None] = mapped_column()


class UiSession(TimestampMixin, Base):
    """A dashboard login: the browser holds a random token in an HttpOnly cookie, only its hash
    is stored (like API keys), tied to the key it was opened with, so revoking the key or
    logging out ends it."""

    __tablename__ = "ui_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[datetime] = mapped_column()

    key: Mapped[ApiKey] = relationship()


class CriteriaSet(TimestampMixin, Base):
    """The criteria experts judge a domain's images by; editing makes a new version, so every
    review stays tied to the exact list it was given."""

    __tablename__ = "criteria_sets"
    __table_args__ = (UniqueConstraint("domain", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    # [{"key": "cell_size", "label": "Cell size", "help": "..."}, ...]
    criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


class Study(TimestampMixin, Base):
    """An expert study: named readers (Label Studio users, by e-mail) judge the images of some
    batches (and real controls) in a Label Studio project of the study's own, each image by
    ``overlap`` of them, under one criteria set version (``service.studies``)."""

    __tablename__ = "studies"
    __table_args__ = (CheckConstraint("overlap >= 1", name="overlap_positive"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(String(64), index=True)
    criteria_set_id: Mapped[int] = mapped_column(
        ForeignKey("criteria_sets.id", ondelete="RESTRICT"), index=True
    )
    # The readers' Label Studio e-mails, lower-cased: only their reads count in the study.
    readers: Mapped[list[str]] = mapped_column(JSON)
    overlap: Mapped[int] = mapped_column(Integer)  # counted reads each image needs
    # The synthetic batches sent; control batches are found through the project's tasks.
    batch_ids: Mapped[list[int]] = mapped_column(JSON)
    # Whether readers are also asked "real or synthetic?" (the review project's origin
    # question), and the equivalence margin around chance its answers are tested with.
    ask_origin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    margin: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[StudyStatus] = mapped_column(
        str_enum(StudyStatus, "status"), default=StudyStatus.open, server_default="open"
    )

    criteria_set: Mapped[CriteriaSet] = relationship()
    project: Mapped[ReviewProject | None] = relationship(back_populates="study")


class ReviewProject(TimestampMixin, Base):
    """The Label Studio project of one criteria set and labelling interface (shared: one per
    set and version without the "real or synthetic?" question, one with it, as Label Studio's
    interface is per project), or of one study (``study_id``: its own project, whatever other
    projects use the set)."""

    __tablename__ = "review_projects"
    __table_args__ = (
        # one shared project per criteria set and interface; study projects are outside this rule
        Index(
            "uq_review_projects_shared_criteria_set",
            "criteria_set_id",
            "origin_question",
            unique=True,
            sqlite_where=text("study_id IS NULL"),
            postgresql_where=text("study_id IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    criteria_set_id: Mapped[int] = mapped_column(
        ForeignKey("criteria_sets.id", ondelete="RESTRICT")
    )
    study_id: Mapped[int | None] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), unique=True
    )
    # The interface also asks "real or synthetic?" with a confidence (service.criteria).
    origin_question: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    ls_project_id: Mapped[int | None] = mapped_column(Integer)  # set by the first sync
    ls_webhook_id: Mapped[int | None] = mapped_column(Integer)
    last_pulled_at: Mapped[datetime | None] = mapped_column()
    # Label Studio tasks of the project's last pull that were not counted (a task protomed
    # did not create claiming one of its refs, or one of its own whose data was edited):
    # [{ls_task_id, claims, reason}], replaced by every pull (``service.reviews.reconcile``).
    odd_tasks: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=list)

    criteria_set: Mapped[CriteriaSet] = relationship()
    study: Mapped[Study | None] = relationship(back_populates="project")
    tasks: Mapped[list[ReviewTask]] = relationship(back_populates="project")


class ReviewTask(TimestampMixin, Base):
    """One image put before reviewers. ``token`` names the image to Label Studio without
    revealing its model, batch or mode (blinding); ``position`` is its shuffled place."""

    __tablename__ = "review_tasks"
    __table_args__ = (UniqueConstraint("project_id", "image_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("review_projects.id", ondelete="CASCADE"), index=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    position: Mapped[int] = mapped_column(Integer)
    ls_task_id: Mapped[int | None] = mapped_column(Integer, unique=True)
    # Set (and committed) just before the task is sent to Label Studio's import: the highest
    # task id the Label Studio project had then. A task whose id never came back was maybe
    # imported, and only then may an export adopt it, and only a task numbered above this
    # (``workers/review_sync.recover_imported``).
    import_after: Mapped[int | None] = mapped_column(Integer)
    # What of the task's data a member changed in Label Studio (ref, image, expected class), as
    # the last pull found it; None while it is as imported. A verdict given on an edited task may
    # be about another picture or class, so none of its verdicts counts while this is set (they
    # are kept, and count again once the task is restored).
    edited: Mapped[str | None] = mapped_column(String(200))
    sample: Mapped[ReviewSample] = mapped_column(
        str_enum(ReviewSample, "sample"), default=ReviewSample.random, server_default="random"
    )

    project: Mapped[ReviewProject] = relationship(back_populates="tasks")
    image: Mapped[Image] = relationship()
    reviews: Mapped[list[Review]] = relationship(
        back_populates="task", cascade="all, delete-orphan", passive_deletes=True
    )


class Review(TimestampMixin, Base):
    """One reviewer's verdict on one image (a Label Studio annotation). An update replaces it,
    a deletion removes it; several reviewers of one image are separate rows."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint("origin_confidence BETWEEN 1 AND 3", name="origin_confidence"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(
        ForeignKey("review_tasks.id", ondelete="CASCADE"), index=True
    )
    ls_annotation_id: Mapped[int] = mapped_column(Integer, unique=True)
    reviewer: Mapped[str] = mapped_column(String(200), index=True)  # Label Studio user id
    # ...and that user's e-mail, so the report's reviewer filter takes either.
    reviewer_email: Mapped[str | None] = mapped_column(String(254), index=True)
    # The seed's rule, applied here (``service.criteria.parse_result``): False if any
    # criterion failed or the overall verdict says implausible, True only with an overall
    # "plausible" and every criterion given, None (incomplete: stored, shown, never counted)
    # otherwise.
    plausible: Mapped[bool | None] = mapped_column(Boolean)
    overall: Mapped[str | None] = mapped_column(String(32))  # the reviewer's own overall choice
    criteria: Mapped[dict[str, Any]] = mapped_column(default=dict)  # key -> pass | fail | na
    comment: Mapped[str | None] = mapped_column(Text)
    # The answer to "real or synthetic?" (projects with ``origin_question``; None: not asked
    # or not answered) and how sure the reader was of it: 1 guessing, 2 fairly sure, 3 sure
    # (``service.criteria.ORIGIN_CONFIDENCE``). Neither enters ``plausible``.
    answered_synthetic: Mapped[bool | None] = mapped_column(Boolean)
    origin_confidence: Mapped[int | None] = mapped_column(Integer)
    # Who Label Studio says last wrote the annotation (its ``updated_by``: the user of the
    # token that sent it, whatever ``completed_by`` says); None when it records none.
    written_by: Mapped[str | None] = mapped_column(String(200))
    # Written by someone other than ``reviewer``, or by nobody Label Studio knows: Label
    # Studio Community lets any member write in another's name, so the report counts these.
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)

    task: Mapped[ReviewTask] = relationship(back_populates="reviews")


class Scorer(TimestampMixin, Base):
    """One version of a review domain's plausibility scorer: a small classifier on the images'
    CLIP embeddings, trained on the images experts reviewed (an image's label: most of its
    reviewers found it plausible). Its weights are in storage under ``artefact_key``; the
    newest version of a domain scores new batches."""

    __tablename__ = "scorers"
    __table_args__ = (UniqueConstraint("domain", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    encoder: Mapped[str] = mapped_column(String(300))  # open_clip name and weights identity
    artefact_key: Mapped[str] = mapped_column(String(1024))
    n_images: Mapped[int] = mapped_column(Integer)  # reviewed images it was trained on
    n_plausible: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)  # CV AUC, calibration, ...
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
