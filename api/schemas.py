"""Request and response bodies of the public API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from ml.config import MAX_PER_CLASS  # torch-free
from ml.data.catalog import Layout
from ml.schemas.audit import AuditReport  # torch-free
from ml.schemas.evaluation import EvaluationResult  # torch-free
from ml.schemas.scorer import ScorerMetrics  # torch-free
from service.controls import ControlsIn
from service.db.models import MAX_ID  # ids and seeds are PostgreSQL INTEGERs
from service.generation import GenerateRequest
from service.inputs import ClassName, RequestModel
from service.payloads import EvaluatePayload
from service.selection import DEFAULT_RANDOM_SHARE, Selection

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # dataset names (JSON body and upload form)
LICENCE_HELP = (
    "The licence the images were published under, e.g. 'CC BY-NC-SA 4.0' (HAM10000): model "
    "cards and everything generated from the dataset carry it."
)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DatasetIn(RequestModel):
    """Register a server-side folder (under one of the configured data roots)."""

    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)
    path: str = Field(min_length=1, max_length=1024, description="Folder under a data root.")
    layout: Layout = "auto"
    domain: str | None = Field(
        default=None,
        max_length=64,
        description="Review domain (GET /criteria): toy, blood, bone-marrow, dermatoscopy, ...",
    )
    licence: str | None = Field(default=None, max_length=200, description=LICENCE_HELP)


class DatasetOut(Out):
    id: int
    name: str
    root: str
    layout: str
    source: str
    domain: str | None
    licence: str | None
    classes: list[str]
    counts: dict[str, int]
    created_at: datetime


class SkippedFile(BaseModel):
    path: str = Field(description="Relative to the dataset folder.")
    reason: str


class DatasetRegistered(DatasetOut):
    """The registered dataset, plus the files its scan left out (reported once, not stored)."""

    skipped: list[SkippedFile] = Field(default_factory=list)


class JobOut(Out):
    id: int
    kind: str
    status: str
    progress: float
    eta_s: float | None
    error: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    requested_by: str | None
    model_id: int | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: dict[str, str] = Field(default_factory=dict)


class TrainAccepted(BaseModel):
    jobs: list[JobOut]
    models: list[ModelOut]


class ModelOut(Out):
    id: int
    dataset_id: int
    mode: str
    preset: str
    classes: list[str]
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    created_at: datetime


class ImageOut(Out):
    id: int
    index: int
    class_name: str
    sha256: str
    score: float | None = None  # the batch's scorer's probability that experts accept it
    url: str = ""


class BatchOut(Out):
    id: int
    model_id: int | None  # None: a control batch (real held-out images, ``source``)
    source: str = "generated"  # generated | control
    dataset_id: int | None = None  # a control batch's dataset
    class_name: str
    n: int
    guidance: float
    steps: int
    seed: int | None
    scheduler: str
    job_id: int | None
    sweep_id: int | None = None
    created_at: datetime
    filter: dict[str, Any] | None = None  # {"kind": "plausible", "oversample", "threshold"}
    drawn: int | None = None  # images drawn to keep n (None until generated)
    scorer_id: int | None = None  # the scorer version its images were scored with
    images: list[ImageOut] = Field(default_factory=list)
    zip_url: str = ""


class GenerateQuery(GenerateRequest):
    """``POST /generate``'s query-string form: the fields of :class:`GenerateRequest`, read from
    the query (unknown parameters ignored, as query strings often carry others). ``class`` is
    optional here only because the JSON-body form leaves the query empty; without a body,
    :meth:`as_request` requires it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    class_name: ClassName | None = Field(  # type: ignore[assignment]
        None, alias="class", description="The class to generate (required without a body)."
    )

    def as_request(self) -> GenerateRequest:
        """The request these parameters make, validated by the body's model: a missing
        ``class`` is the 422 FastAPI gives for a missing required parameter."""
        if self.class_name is None:
            raise RequestValidationError(
                [
                    {
                        "type": "missing",
                        "loc": ("query", "class"),
                        "msg": "Field required",
                        "input": None,
                    }
                ]
            )
        return GenerateRequest.model_validate(self.model_dump(by_alias=True, exclude_unset=True))


class GenerateAccepted(BaseModel):
    job: JobOut
    batch: BatchOut
    guidance_source: Literal["query", "model default", "global default"] = Field(
        description="where the batch's guidance came from: the request's ``guidance``, the "
        "model's default for the class (GET /models/{id}/guidance), or the global default"
    )


class KeyIn(RequestModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "viewer", "reviewer"] = "reviewer"


class KeyOut(Out):
    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    key: str | None = Field(default=None, description="The token; returned once, at creation.")


# --- evaluation ----------------------------------------------------------------------------------

Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class EvaluationReport(EvaluationResult):
    """``GET /reports/evaluation``: the finished evaluate job (its id, what it was asked, when it
    finished), then its whole result at the top level."""

    job_id: int
    params: EvaluatePayload
    finished_at: datetime | None


# --- reviews -------------------------------------------------------------------------------------


class Criterion(RequestModel):
    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    label: str = Field(min_length=1, max_length=120)
    help: str = Field(default="", max_length=500)


class CriteriaIn(RequestModel):
    title: str = Field(min_length=1, max_length=200)
    criteria: list[Criterion] = Field(min_length=1, max_length=20)


class CriteriaOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    domain: str
    version: int
    title: str
    criteria: list[dict[str, Any]]


class ReviewRequest(RequestModel):
    """Batches to review, whole (``select: all``) or a budget per batch that puts the images
    the domain's scorer is least sure about before the others (``select: uncertain``): see
    ``service/selection.py`` for how the report's rates stay unbiased."""

    batch_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1, max_length=200)
    domain: str | None = Field(default=None, max_length=64)
    select: Literal["all", "uncertain"] = Field(
        default="all",
        description="all: every image of each batch (all count in the plausibility rates). "
        "uncertain: per_batch images of each batch, a simple random sample of "
        "round(per_batch x random_share) (at least 1; they count in the rates) and the rest "
        "the images whose scorer probability is closest to 0.5 (their verdicts train the "
        "scorer and are kept out of the rates); needs scored batches. Either way all chosen "
        "images are shuffled together and nothing tells a reviewer which is which.",
    )
    per_batch: int | None = Field(
        default=None,
        ge=1,
        le=MAX_PER_CLASS,
        description="select 'uncertain' only (required there): images to send per batch.",
    )
    random_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=f"select 'uncertain' only: the random sample's share of per_batch, in "
        f"(0, 1] (default {DEFAULT_RANDOM_SHARE}; 1: a random subset, no scorer needed).",
    )
    controls: ControlsIn | None = Field(
        default=None, description="real held-out images to review beside the synthetic ones"
    )
    ask_origin: bool = Field(
        default=False,
        description="also ask reviewers 'real or synthetic?' with their confidence, after the "
        "plausibility criteria (which stay as they are): the images go to the domain's project "
        "with that question, a Label Studio project of its own; useful with controls",
    )

    @model_validator(mode="after")
    def _selection_fields(self) -> ReviewRequest:
        if self.select == "uncertain" and self.per_batch is None:
            raise ValueError("select 'uncertain' needs per_batch (images to send per batch)")
        if self.select == "all" and (self.per_batch is not None or self.random_share is not None):
            raise ValueError(
                "per_batch and random_share apply to select 'uncertain' only (select 'all' "
                "sends every image)"
            )
        return self

    def selection(self) -> Selection:
        share = DEFAULT_RANDOM_SHARE if self.random_share is None else self.random_share
        return Selection(self.select, self.per_batch, share)


class OddTask(BaseModel):
    """A Label Studio task of the project that the last pull did not count."""

    ls_task_id: int | None = Field(description="the task in Label Studio")
    claims: int | None = Field(
        description="the Label Studio id of protomed's task whose ref it carries (itself for a "
        "task of protomed's whose data was edited)"
    )
    reason: str


class ProjectOut(BaseModel):
    id: int
    domain: str
    criteria_set_id: int
    version: int
    origin_question: bool = Field(
        False, description="the labelling interface also asks 'real or synthetic?'"
    )
    ls_project_id: int | None
    url: str | None
    tasks: int
    reviews: int
    incomplete: int = Field(0, description="verdicts stored as incomplete (counted nowhere)")
    flagged: int = Field(
        0, description="verdicts Label Studio says someone other than their reviewer wrote"
    )
    odd_tasks: list[OddTask] = Field(
        default_factory=list,
        description="tasks the last pull did not count: a task protomed did not create that "
        "claims one of its refs, or one of protomed's whose data was edited in Label Studio",
    )


class BatchSelected(BaseModel):
    """What one batch sent to review: images newly in its random sample (new tasks, or earlier
    uncertain picks that the draw moved into it) and new uncertain picks."""

    batch_id: int
    random: int
    uncertain: int


class ReviewAccepted(BaseModel):
    job: JobOut
    project: ProjectOut
    added: int = Field(description="new tasks (images not in the project before)")
    selected: list[BatchSelected] = Field(
        default_factory=list, description="per batch: what the selection chose"
    )
    controls: list[int] = Field(
        default_factory=list, description="the control batches made (real held-out images)"
    )
    png_size_auc: float | None = Field(
        default=None,
        description="with controls: how well the review copies' PNG byte size alone separates "
        "real from synthetic images in the project (0.5: not at all)",
    )
    warning: str | None = Field(
        default=None,
        description="Set when every image waiting for import comes from one mode: reviewers "
        "could then tell them apart by Label Studio's task order (send both modes together).",
    )


# --- the Label Studio webhook: a notification, never a source of verdicts ------------------------

LsId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID, description="A Label Studio id.")]


class AnnotationRef(BaseModel):
    """An annotation as a webhook names it. Label Studio sends the whole annotation; only its
    id is read, the rest of the body is never trusted."""

    id: LsId


class AnnotationEvent(BaseModel):
    action: Literal["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    annotation: AnnotationRef


class AnnotationsDeletedEvent(BaseModel):
    action: Literal["ANNOTATIONS_DELETED"]
    annotations: list[AnnotationRef] = Field(min_length=1, max_length=100_000)


WebhookEvent = Annotated[AnnotationEvent | AnnotationsDeletedEvent, Field(discriminator="action")]


class WebhookOut(BaseModel):
    action: str
    applied: int = Field(description="Verdicts stored or updated, equal to Label Studio's.")
    removed: int = Field(description="Verdicts removed: Label Studio has no such annotation.")
    ignored: int = Field(description="Annotations that are not protomed's, or not in Label Studio.")
    queued: list[int] = Field(
        default_factory=list,
        description="review_sync jobs that will pull the verdicts instead (Label Studio could "
        "not be read now, or the event names too many annotations).",
    )
    detail: str | None = None


class AuditImageLinks(BaseModel):
    """Where to see an audited image and the training image nearest to it (kept for flagged
    images and the closest few)."""

    index: int
    image_id: int
    image_url: str
    nearest_url: str | None


class AuditOut(BaseModel):
    """A batch's newest finished memorisation audit (``ml.audit``): per image the nearest
    training image in pixel and CLIP space, per class the thresholds calibrated on held-out
    real images, the flag rates and the check on other held-out images. A nearest-neighbour
    audit, not a formal privacy guarantee."""

    batch_id: int
    job_id: int
    finished_at: datetime | None
    report: AuditReport
    links: list[AuditImageLinks]


class ScorerIn(RequestModel):
    domain: str = Field(min_length=1, max_length=64, description="the review domain")


class ScorerOut(Out):
    """A scorer version: on how many reviewed images it was trained and how well it separates
    verdicts it did not see (nested cross-validation; ``metrics``: AUC with its interval,
    Brier score, calibration bins)."""

    id: int
    domain: str
    version: int
    encoder: str
    n_images: int
    n_plausible: int
    job_id: int | None
    created_at: datetime
    metrics: ScorerMetrics
    latest: bool = False  # the domain's newest version: the one new batches are scored with


# --- guidance sweeps ------------------------------------------------------------------------------


class SweepBatchOut(BaseModel):
    """One (class, scale) cell of a sweep: its batch and how far its sample job got."""

    class_name: str
    scale: float
    batch_id: int
    job_id: int | None
    status: str | None
    images: int


class SweepOut(BaseModel):
    id: int
    model_id: int
    classes: list[str]
    scales: list[float]
    n: int
    seed: int
    steps: int
    scheduler: str
    requested_by: str | None
    created_at: datetime
    batches: list[SweepBatchOut]
    report_url: str
    page_url: str


class SweepAccepted(BaseModel):
    sweep: SweepOut
    jobs: list[JobOut]


class SweepReviewAccepted(BaseModel):
    job: JobOut = Field(description="the review_sync job importing the tasks into Label Studio")
    project: ProjectOut
    added: int


class GuidanceDefaults(RequestModel):
    """Per-class guidance defaults (class -> scale); PUT replaces them all ({} clears them)."""

    defaults: dict[ClassName, Annotated[float, Field(ge=0.0, le=20.0)]] = Field(max_length=1000)


class GuidanceOut(BaseModel):
    model_id: int
    defaults: dict[str, float] = Field(description="class -> scale POST /generate uses")
    fallback: float = Field(description="the global default, for classes without one")


class ApplyRequest(RequestModel):
    """Explicit scales instead of the sweep's recommendations (omit for the recommendations)."""

    scales: dict[ClassName, Annotated[float, Field(ge=0.0, le=20.0)]] | None = Field(
        None, max_length=1000
    )


class ApplyOut(BaseModel):
    model_id: int
    set: dict[str, float] = Field(description="the classes written, with their scales")
    unchanged: dict[str, str] = Field(description="classes left as they were, and why")
    defaults: dict[str, float] = Field(description="the model's defaults after")
