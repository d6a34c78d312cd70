"""Reading finished evaluations back: the latest one (of a dataset, or a given job) and its
CSV, shared by ``GET /reports/evaluation`` and the dashboard's evaluation page."""

from __future__ import annotations

import csv
import io
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Job, JobKind, JobStatus


def latest_evaluation(
    session: Session, dataset_id: int | None = None, job_id: int | None = None
) -> Job | None:
    """The newest succeeded evaluate job matching the filters, if any."""
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
