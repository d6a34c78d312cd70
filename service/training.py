"""Requesting training: one ``train`` job per mode (``both``: a prototype and a baseline run on
the same split), each with the pending model it will fill. The request's rules (the classes,
the configuration's overrides, whether the split fits the dataset, the encoder the runs learn
prototypes with) live here once, so ``POST /jobs/train`` and any other caller check the same
things and store the same rows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from sqlalchemy.orm import Session

from ml.config import MAX_PER_CLASS, PresetName, allowed_range  # torch-free
from ml.errors import Invalid
from service.config import Settings
from service.db.models import MAX_ID, Dataset, Job, JobKind, Model, ModelMode, ModelStatus
from service.encoder import require_prototype_encoder
from service.inputs import ClassName, RequestModel
from service.job_kinds import new_job
from service.payloads import Selection, TrainPayload
from service.queue import submit
from service.rows import get_row
from service.splits import check_split


class TrainRequest(RequestModel):
    """What ``POST /jobs/train`` asks for: the dataset and classes, the split, the preset and
    its overrides."""

    dataset_id: int = Field(ge=1, le=MAX_ID)
    mode: Literal["prototype", "baseline", "both"] = "both"
    preset: PresetName = "paper"
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='TrainConfig fields on top of the preset, e.g. {"max_steps": 2000}.',
        examples=[{"max_steps": 2000}],
    )
    n_per_class: int | None = Field(
        default=100,
        ge=1,
        le=MAX_PER_CLASS,
        description=f"Training images per class, 1 to {MAX_PER_CLASS} (null: all).",
    )
    n_heldout: int = Field(
        default=20,
        ge=0,
        le=MAX_PER_CLASS,
        description=f"Held-out images per class, 0 to {MAX_PER_CLASS}.",
    )
    classes: list[ClassName] | None = Field(
        default=None, max_length=1000, description="Subset of the dataset's classes."
    )
    seed: int = Field(default=0, ge=0, le=MAX_ID)
    k: int = Field(default=1, ge=1, le=64, description="Prototypes per class.")

    @field_validator("n_per_class", "n_heldout", "seed", "k", mode="wrap")
    @classmethod
    def _name_the_range(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        """Out-of-range sizes say the whole allowed range, not just the bound they crossed."""
        try:
            return handler(value)
        except ValidationError as exc:
            allowed = allowed_range(cls, str(info.field_name))
            raise ValueError(f"{exc.errors()[0]['msg']} (allowed: {allowed})") from None


def train_config(request: TrainRequest, mode: str) -> dict[str, Any]:
    """The validated TrainConfig of one mode as JSON; :class:`Invalid` naming the override
    that does not fit (ml.config is torch-free at import)."""
    from ml.config import describe_validation_error, make_config

    try:
        cfg = make_config(request.preset, {**request.overrides, "mode": mode})
    except ValidationError as exc:
        raise Invalid(f"overrides: {describe_validation_error(exc)}") from exc
    except ValueError as exc:
        raise Invalid(f"overrides: {exc}") from exc
    return cfg.model_dump(mode="json")


def request_training(
    session: Session, settings: Settings, request: TrainRequest, requested_by: str
) -> list[Job]:
    """Check the request, store one pending model and its ``train`` job per mode, and queue the
    jobs (committed by :func:`service.queue.submit`; nothing is stored when the broker does not
    answer). Each job's ``model`` is the model it trains. :class:`Invalid` if fewer than two
    known classes are chosen, an override does not fit, a class holds fewer images than the
    split asks (``service.splits``) or the CLIP encoder's weights are not on this machine
    (none are needed with ``prototype_encoder="learned"``)."""
    dataset = get_row(session, Dataset, request.dataset_id, hint="; see GET /datasets")
    classes = request.classes or list(dataset.classes)
    unknown = sorted(set(classes) - set(dataset.classes))
    if unknown or len(classes) < 2:
        raise Invalid(
            f"classes {unknown or classes} not usable: choose at least two of {dataset.classes}"
        )
    modes: list[Literal["prototype", "baseline"]] = (
        ["prototype", "baseline"] if request.mode == "both" else [request.mode]
    )
    configs = {m: train_config(request, m) for m in modes}
    check_split(dataset.counts, classes, request.n_per_class, request.n_heldout, request.k)
    require_prototype_encoder(settings)
    selection = Selection(
        root=dataset.root,
        layout=dataset.layout,
        n_per_class=request.n_per_class,
        n_heldout=request.n_heldout,
        seed=request.seed,
        classes=classes,
    )
    jobs = []
    for mode in modes:
        model = Model(
            dataset=dataset,
            mode=ModelMode(mode),
            preset=request.preset,
            config=configs[mode],
            classes=classes,
            status=ModelStatus.pending,
        )
        payload = TrainPayload(dataset_id=dataset.id, selection=selection, k=request.k, mode=mode)
        jobs.append(new_job(JobKind.train, payload, model=model, requested_by=requested_by))
    session.add_all(jobs)
    submit(session, jobs)
    return jobs
