"""Evaluation without experts: queue the comparison of a baseline and a prototype model, read
the latest result (the seed's Tables 5-6 and CLIP-space metrics)."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from api.db.models import Batch, Job, JobKind, JobStatus, Model, ModelMode, ModelStatus
from api.deps import MAX_ID, AdminKey, Reader, SessionDep, SettingsDep
from api.encoder import require_encoder_weights
from api.queue import submit
from api.routes.jobs import job_out
from api.schemas import JobOut

router = APIRouter(tags=["evaluation"])
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baseline_model_id: Id
    prototype_model_id: Id
    seeds: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field([0, 1, 2], min_length=1,
                                                                max_length=10)  # fmt: skip
    backbone: Literal["small", "resnet18", "resnext50"] = "small"
    epochs: int = Field(30, ge=1, le=1000)
    n_per_class: int | None = Field(None, ge=1, le=10_000, description="default: as real")
    steps: int = Field(50, ge=1, le=1000)
    guidance: float = Field(2.0, ge=0, le=20)
    baseline_batch_ids: list[Id] = Field(
        default_factory=list, max_length=500, description="use these images instead of generating"
    )
    prototype_batch_ids: list[Id] = Field(default_factory=list, max_length=500)


def _model(session: SessionDep, model_id: int, mode: ModelMode) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise HTTPException(404, f"no model with id {model_id}; see GET /models")
    if model.mode != mode:
        raise HTTPException(422, f"model {model_id} is a {model.mode} model, not {mode}")
    if model.status != ModelStatus.ready:
        raise HTTPException(409, f"model {model_id} is {model.status}, not ready")
    return model


def _batches(session: SessionDep, ids: list[int], model: Model, mode: str) -> list[int]:
    for batch_id in ids:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise HTTPException(404, f"no batch with id {batch_id}")
        if batch.model.dataset_id != model.dataset_id:
            raise HTTPException(
                422, f"batch {batch_id} is from dataset {batch.model.dataset_id}, "
                f"the models from dataset {model.dataset_id}",
            )  # fmt: skip
        if batch.model_id != model.id:
            raise HTTPException(
                422, f"batch {batch_id} was made by model {batch.model_id}, not the {mode} "
                f"model {model.id}",
            )  # fmt: skip
    return ids


@router.post("/jobs/evaluate", status_code=status.HTTP_202_ACCEPTED)
def submit_evaluation(
    body: EvaluateRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    key: AdminKey,
) -> JobOut:
    """A classifier trained on real, baseline and prototype images of equal size per class and
    tested on the held-out real images; CLIP-space FD, precision/recall, prototype
    consistency. Runs on a GPU worker; the result is the job's and ``GET /reports/evaluation``."""
    base = _model(session, body.baseline_model_id, ModelMode.baseline)
    proto = _model(session, body.prototype_model_id, ModelMode.prototype)
    if base.dataset_id != proto.dataset_id:
        raise HTTPException(422, f"the models are from different datasets "
                            f"({base.dataset_id} and {proto.dataset_id})")  # fmt: skip
    require_encoder_weights(settings)  # the CLIP-space metrics embed with it
    config = {
        "n_per_class": body.n_per_class, "steps": body.steps, "guidance": body.guidance,
        "seeds": body.seeds, "downstream": {"backbone": body.backbone, "epochs": body.epochs},
    }  # fmt: skip
    params = {
        "dataset_id": proto.dataset_id,
        "models": {"baseline": base.id, "prototype": proto.id},
        "batches": {
            "baseline": _batches(session, body.baseline_batch_ids, base, "baseline"),
            "prototype": _batches(session, body.prototype_batch_ids, proto, "prototype"),
        },
        "config": config,
    }
    job = Job(kind=JobKind.evaluate, model=proto, params=params, requested_by=key.name)
    session.add(job)
    submit(session, [job])
    return job_out(job, request)


def latest_evaluation(
    session: SessionDep, dataset_id: int | None = None, job_id: int | None = None
) -> Job | None:
    query = select(Job).where(Job.kind == JobKind.evaluate, Job.status == JobStatus.succeeded)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    jobs = session.scalars(query.order_by(Job.id.desc())).all()
    if dataset_id is not None:
        jobs = [j for j in jobs if j.params.get("dataset_id") == dataset_id]
    return jobs[0] if jobs else None


def evaluation_csv(result: dict[str, Any]) -> str:
    """Tables 5-6 (mean and std over seeds, %), then the CLIP-space overall metrics."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["training set", "precision", "precision sd", "recall", "recall sd", "F1",
                "F1 sd", "n train"])  # fmt: skip
    for name, s in result["downstream"]["sets"].items():
        m, sd = s["mean"], s["std"]
        w.writerow([name, *(f"{100 * x:.2f}" for k in ("precision", "recall", "f1")
                            for x in (m[k], sd[k])), s["n_train"]])  # fmt: skip
    w.writerow([])
    w.writerow(["set", "FD", "precision", "recall", "prototype consistency"])
    for name, rep in result["distribution"].items():
        o = rep["overall"]
        w.writerow([name, *(("" if o.get(k) is None else f"{o[k]:.4f}")
                            for k in ("fd", "precision", "recall", "consistency"))])  # fmt: skip
    return buf.getvalue()


@router.get(
    "/reports/evaluation",
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
)
def evaluation_report(
    session: SessionDep,
    _reader: Reader,
    dataset_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    job_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    """The latest finished evaluation (of a dataset, or a given job)."""
    job = latest_evaluation(session, dataset_id, job_id)
    if job is None:
        raise HTTPException(404, "no finished evaluation yet; POST /jobs/evaluate first")
    if format == "csv":
        return PlainTextResponse(evaluation_csv(job.result or {}), media_type="text/csv")
    return {"job_id": job.id, "params": job.params, "finished_at": job.finished_at,
            **(job.result or {})}  # fmt: skip
