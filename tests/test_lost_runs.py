"""A run that lost its job (reaped while it was silent, then claimed by another worker) writes
none of the job's rows when it reaches its end: each runner's writes besides the job row go
through ``JobContext.owned_session``. The sampling runner is run for real on a tiny trained
model; the other party's move (reap and re-claim) is made from the runner's own storage call
between its first and last database write, so nothing waits or depends on timing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Service, make_service
from factories import add_batch, add_dataset, add_model
from sqlalchemy import func, select
from test_train import random_set

from ml.config import make_config
from ml.diffusion.train import train
from service.config import get_settings
from service.db.models import Image, Job, JobKind, JobStatus
from service.db.session import get_sessionmaker
from service.job_state import Run, claim, reap
from service.payloads import SamplePayload
from service.storage import Storage, get_storage
from workers.lifecycle import JobContext, JobStopped
from workers.sampling import run_sampling


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1, "batch_size": 4})
    train(cfg, random_set(), out, show_progress=False)
    return out / "last.pt"


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    with make_service(tmp_path, monkeypatch) as service:
        yield service


class ReclaimedMidRun:
    """The runner's real storage; the first time the runner clears the batch's old files (right
    after its first database write), the job is reaped and claimed by worker ``w:2``."""

    def __init__(self, storage: Storage, job_id: int) -> None:
        self._storage, self._job_id, self.new_run = storage, job_id, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def delete_prefix(self, prefix: str) -> Any:
        out = self._storage.delete_prefix(prefix)
        if self.new_run is None:
            settings = get_settings()
            with get_sessionmaker()() as session:  # the old worker fell silent long ago
                job = session.get(Job, self._job_id)
                assert job is not None and job.heartbeat_at is not None
                job.heartbeat_at = job.heartbeat_at.replace(year=2000)
                session.commit()
            assert reap(settings, lambda _job: None)["requeued"] == [self._job_id]
            with get_sessionmaker()() as session:
                self.new_run = claim(session, self._job_id, "w:2", settings)
            assert self.new_run is not None
        return out


def test_a_sampling_run_that_lost_its_job_stores_no_images(svc: Service, checkpoint: Path) -> None:
    storage = get_storage()
    storage.put_bytes("models/lost/checkpoint.pt", checkpoint.read_bytes())
    with get_sessionmaker()() as session:
        ds = add_dataset(session, classes=["c0", "c1", "c2"])
        model = add_model(session, ds, mode="baseline", checkpoint_path="models/lost/checkpoint.pt")
        batch = add_batch(session, model, n=2, steps=2)
        job = Job(kind=JobKind.sample, params=SamplePayload(batch_id=batch.id).model_dump())
        session.add(job)
        session.commit()
        job_id, batch_id = job.id, batch.id
    with get_sessionmaker()() as session:
        old: Run | None = claim(session, job_id, "w:1", get_settings())
    assert old is not None
    hook = ReclaimedMidRun(storage, job_id)
    ctx = JobContext(old, get_settings(), time_limit_s=3600)  # not entered: no heartbeat thread
    with pytest.raises(JobStopped, match="lost ownership"):
        run_sampling(job_id, ctx, get_settings(), hook)  # type: ignore[arg-type]
    assert hook.new_run is not None  # the other party did move mid-run
    with get_sessionmaker()() as session:
        count = session.scalar(select(func.count(Image.id)).where(Image.batch_id == batch_id))
        job = session.get(Job, job_id)
        assert job is not None
        assert count == 0  # the lost run wrote no image rows over the new run's batch
        assert (job.status, job.worker) == (JobStatus.running, "w:2")  # the new run holds it
