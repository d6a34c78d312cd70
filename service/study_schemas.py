"""An expert study's request, progress and report as typed models: built by
:mod:`service.studies`, returned by ``/studies`` (so OpenAPI publishes them) and shown by the
dashboard. Torch-free and web-free. Rates and interval limits are fractions in [0, 1]; dict keys
naming models are ``str(model_id)``, as in :mod:`service.report_schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.controls import ControlsIn
from service.db.models import MAX_ID
from service.inputs import RequestModel
from service.report_schemas import ModelColumn, PlausibilityReport, RateEntry, VersusReal
from service.study_statistics import DEFAULT_MARGIN, Agreement

MAX_READERS = 50


class StudyRequest(RequestModel):
    """A study: the batches (and real controls) its readers judge, who they are and how many of
    them judge each image. Everything goes into a Label Studio project of the study's own."""

    name: str = Field(min_length=1, max_length=200)
    batch_ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1, max_length=200)
    domain: str | None = Field(
        default=None,
        max_length=64,
        description="the review domain; default: the one domain of the batches' datasets",
    )
    readers: list[str] = Field(
        min_length=1,
        max_length=MAX_READERS,
        description="the readers' Label Studio e-mails (unique): only their reads count",
    )
    overlap: int = Field(
        ge=1,
        le=MAX_READERS,
        description="how many readers judge each image (1 to the number of readers); Label "
        "Studio stops serving an image once it has this many annotations",
    )
    controls: ControlsIn | None = Field(
        default=None, description="real held-out images judged blinded beside the synthetic ones"
    )
    ask_origin: bool = Field(
        default=False,
        description="also ask readers whether each image is real or synthetic (the review "
        "project's origin question)",
    )
    margin: float = Field(
        default=DEFAULT_MARGIN,
        gt=0,
        lt=0.5,
        description="with ask_origin: the equivalence margin around chance (0.5) that the "
        "readers' real-or-synthetic accuracy is tested against",
    )


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class StudyOut(_Model):
    """A study as stored, with its Label Studio project."""

    id: int
    name: str
    domain: str
    criteria_set_id: int
    criteria_version: int
    readers: list[str]
    overlap: int
    ask_origin: bool
    margin: float
    status: str = Field(description="open, or complete once every image has its reads")
    created_by: str
    created_at: datetime
    batch_ids: list[int]
    control_batch_ids: list[int]
    project_id: int | None = Field(description="the study's review project")
    ls_project_id: int | None = Field(description="its Label Studio project (after the sync)")
    url: str | None = Field(description="where readers judge in Label Studio")


class ReaderProgress(_Model):
    """One named reader's counted reads. Label Studio Community hands each reader the next
    image at random among those that still lack reads and that the reader has not judged, so
    no image is assigned ahead: ``expected`` is an even share, not a quota."""

    reader: str
    reads: int = Field(description="images this reader judged (counted reads)")
    expected: int = Field(description="an even share: ceil(images x overlap / readers)")
    open_to_reader: int = Field(
        description="images still short of reads that this reader has not judged"
    )


class NotCounted(_Model):
    """Reads on the study's images that count nowhere in the study, by reason (each read in
    the first that applies)."""

    on_edited_tasks: int = Field(description="the task's data was edited in Label Studio")
    other_readers: int = Field(description="by Label Studio users the study does not name")
    other_reader_ids: list[str] = Field(description="those users (Label Studio id or e-mail)")
    flagged: int = Field(description="written by someone other than their named reader")
    incomplete: int = Field(description="no overall verdict, or a criterion left unjudged")


class StudyProgress(_Model):
    images: int = Field(description="images in the study (synthetic and real controls)")
    complete_images: int = Field(description="images with overlap counted reads")
    reads_needed: int = Field(description="images x overlap")
    reads_counted: int = Field(description="counted reads towards that (at most overlap each)")
    complete: bool = Field(description="every image has its overlap counted reads")
    readers: list[ReaderProgress]
    not_counted: NotCounted


class StudyClass(_Model):
    """One class: the plausible rate of the real controls and of each model (image as unit,
    Wilson 95%), each model minus real (Newcombe 95%), and the readers' agreement."""

    class_name: str = Field(alias="class")
    real: RateEntry | None
    models: dict[str, RateEntry]
    versus_real: dict[str, VersusReal]
    agreement: Agreement


class StudyPooled(_Model):
    real: RateEntry | None
    models: dict[str, RateEntry]
    agreement: Agreement


class StudyMethods(_Model):
    counted: str = (
        "only complete, unflagged reads by the study's named readers (matched by Label Studio "
        "e-mail) on tasks whose data is as protomed imported it"
    )
    rates: str = (
        "image as unit (its readers' majority, a tie implausible), Wilson 95% per rate, "
        "Newcombe 95% per difference from the real images; the full plausibility report "
        "(tests, criteria) is in 'plausibility'"
    )
    agreement: str = (
        "over the images judged by at least two named readers: Fleiss' kappa over the images "
        "with the most common number of reads, Krippendorff's nominal alpha over all of them; "
        "per class (synthetic and real images together) and pooled"
    )


class StudyReport(_Model):
    """What a lab puts in a paper: the study, its progress, per class the rates of real images
    and each model with intervals, and agreement; ``plausibility`` is the full plausibility
    report restricted to the study's project and readers."""

    study: StudyOut
    progress: StudyProgress
    models: list[ModelColumn]
    classes: list[StudyClass]
    pooled: StudyPooled
    methods: StudyMethods = Field(default_factory=StudyMethods)
    plausibility: PlausibilityReport


class StudyCreated(_Model):
    study: StudyOut
    job_id: int = Field(description="the review_sync job that creates the Label Studio project")
    added: int = Field(description="images put before the readers")
    control_batch_ids: list[int]
    png_size_auc: float | None = Field(
        description="with controls: how well PNG byte size alone separates real from synthetic"
    )
