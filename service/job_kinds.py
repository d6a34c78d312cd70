"""The registry of job kinds: for each, its Celery task and queue, the payload model its params
follow, and the function that runs it on a worker.

One table instead of four places (the producer's task names, the worker's runner lookup, its
per-kind tasks, the payload models): adding a kind is one entry here (and its enum value), and
a test checks every kind has one. Runners are import paths, loaded only on a worker, so the API
importing this module stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from service.db.models import Job, JobKind, Model
from service.payloads import (
    AuditPayload,
    EvaluatePayload,
    ReviewSyncPayload,
    SamplePayload,
    ScorePayload,
    TrainPayload,
)

GPU_QUEUE = "gpu"  # heavy work: GPU workers only
DEFAULT_QUEUE = "default"
# Kept in the enum only because removing a value changes the CHECK constraint (a migration);
# never created, and refused by the worker.
RETIRED = frozenset({JobKind.prototypes})


@dataclass(frozen=True)
class KindSpec:
    kind: JobKind
    task: str  # the Celery task name the producer publishes and the worker registers
    queue: str
    payload: type[BaseModel]  # what ``Job.params`` holds
    runner: str  # "module:function", called as f(job_id, ctx, settings, storage) -> result
    long: bool = False  # runs under the training time limit (else the sampling one)

    def load_runner(self) -> Callable[..., dict[str, Any]]:
        module, _, name = self.runner.partition(":")
        runner: Callable[..., dict[str, Any]] = getattr(importlib.import_module(module), name)
        return runner


KINDS: dict[JobKind, KindSpec] = {
    spec.kind: spec
    for spec in (
        KindSpec(
            JobKind.train,
            "protomed.train",
            GPU_QUEUE,
            TrainPayload,
            "workers.training:run_training",
            long=True,
        ),
        KindSpec(
            JobKind.sample,
            "protomed.sample",
            GPU_QUEUE,
            SamplePayload,
            "workers.sampling:run_sampling",
        ),
        KindSpec(
            JobKind.evaluate,
            "protomed.evaluate",
            GPU_QUEUE,
            EvaluatePayload,
            "workers.evaluation:run_evaluation",
            long=True,
        ),
        KindSpec(
            JobKind.review_sync,
            "protomed.review_sync",
            DEFAULT_QUEUE,
            ReviewSyncPayload,
            "workers.tasks:run_review_sync",
        ),
        # CLIP embeddings: where the ml stack is
        KindSpec(
            JobKind.audit, "protomed.audit", GPU_QUEUE, AuditPayload, "workers.audit:run_audit"
        ),
        KindSpec(
            JobKind.score, "protomed.score", GPU_QUEUE, ScorePayload, "workers.scoring:run_scoring"
        ),
    )
}


def spec_for(kind: str) -> KindSpec:
    """The entry of ``kind``; an unknown or retired kind is refused (the job fails, it never
    falls back to another kind's runner)."""
    try:
        return KINDS[JobKind(kind)]
    except (ValueError, KeyError):
        raise ValueError(f"no runner for job kind {kind!r}: the job fails instead") from None


def queue_kinds(kind: str) -> list[str]:
    """The job kinds that share ``kind``'s queue: a token of that queue may run any of them."""
    queue = spec_for(kind).queue
    return [str(k) for k, spec in KINDS.items() if spec.queue == queue]


def new_job(
    kind: JobKind,
    payload: BaseModel | None,
    *,
    requested_by: str,
    model: Model | None = None,
    model_id: int | None = None,
) -> Job:
    """The one place a job row is built: its params are ``payload``, which must be the kind's
    payload model (what the worker will read back). ``None`` only where the payload names a row
    that has no id yet (a sample job's batch): :func:`set_payload` after the flush."""
    job = Job(kind=kind, requested_by=requested_by)
    if model is not None:
        job.model = model
    elif model_id is not None:
        job.model_id = model_id
    if payload is not None:
        set_payload(job, payload)
    return job


def set_payload(job: Job, payload: BaseModel) -> None:
    """``job.params`` from a payload of the job kind's model (a TypeError names both, so a
    payload of another kind can never be stored for a worker to misread)."""
    expected = KINDS[JobKind(job.kind)].payload
    if type(payload) is not expected:
        raise TypeError(f"a {job.kind} job takes {expected.__name__}, not {type(payload).__name__}")
    params = payload.model_dump(mode="json")
    expected.model_validate(params)  # what the worker will read back must parse as stored
    job.params = params
