"""What each kind of job asks its worker to do, as stored in ``Job.params``.

The API's request bodies (``api/schemas.py``) are what a caller may send; these are what the
API resolved them to (ids checked, configs validated) and the workers read back, with the same
models on both sides, so a field renamed on one side cannot silently go missing on the other.
Torch-free: ``EvalConfig`` comes from ``ml.schemas.evaluation``, ``AuditConfig`` from
``ml.schemas.audit``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml.schemas.audit import AuditConfig
from ml.schemas.evaluation import EvalConfig


class Selection(BaseModel):
    """The split a training job draws (``ml.data.images.load_split``'s arguments but the image size,
    which the model's config decides); the worker replaces ``root`` with the local folder."""

    root: str
    layout: str
    n_per_class: int | None
    n_heldout: int
    seed: int
    classes: list[str]

    def for_ml(self, root: str) -> dict[str, Any]:
        """As ``ml.pipeline.learn_prototypes`` takes it, read from ``root`` on this machine."""
        return {**self.model_dump(), "root": root}


class TrainPayload(BaseModel):
    dataset_id: int
    selection: Selection
    k: int = Field(1, description="prototypes per class")
    mode: Literal["prototype", "baseline"]


class SamplePayload(BaseModel):
    batch_id: int = Field(description="the batch row the job fills with images")


class BatchFilter(BaseModel):
    """``Batch.filter``: keep the images the domain's scorer rates most plausible. The job
    draws ``n * oversample`` and keeps the ``n`` highest-scored, or with ``threshold`` those
    scored at least that (the highest first, at most ``n``; fewer when not enough reach it)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["plausible"] = "plausible"
    oversample: int = Field(ge=1, description="images drawn per image kept")
    threshold: float | None = Field(None, ge=0.0, le=1.0)


class AuditPayload(BaseModel):
    batch_id: int = Field(description="the generated batch to audit")
    config: AuditConfig = Field(default_factory=AuditConfig)


class ReviewSyncPayload(BaseModel):
    project_id: int = Field(description="the review project to push to / pull from Label Studio")


class ScorePayload(BaseModel):
    """Train the next version of a review domain's plausibility scorer from its verdicts."""

    domain: str = Field(min_length=1, max_length=64)


class ModelPair(BaseModel):
    baseline: int
    prototype: int


class GivenBatches(BaseModel):
    """Batches to use instead of generating, per mode (empty: generate)."""

    baseline: list[int] = Field(default_factory=list)
    prototype: list[int] = Field(default_factory=list)


class EvaluatePayload(BaseModel):
    dataset_id: int = Field(description="the dataset both models were trained on")
    models: ModelPair
    batches: GivenBatches = Field(default_factory=GivenBatches)
    config: EvalConfig
    test_dataset_id: int | None = Field(
        None, description="an external test set (another registered dataset); None: held-out"
    )
