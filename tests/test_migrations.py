"""The Alembic migrations build (and remove) the ORM's schema on PostgreSQL and SQLite, and the
service modules import without torch.

PostgreSQL is expected at 127.0.0.1:5432 (user postgres, trust auth; override with
PROTOMED_TEST_POSTGRES_URL). Where it is unreachable the PostgreSQL cases skip, unless
PROTOMED_REQUIRE_SERVICES is set (CI), where they fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import alembic_config
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import Base, Dataset, Job, JobKind, JobStatus, Model, ModelMode, ModelStatus
from service.db.session import make_engine

REPO = Path(__file__).resolve().parents[1]
TABLES = {
    "datasets",
    "models",
    "jobs",
    "batches",
    "images",
    "api_keys",
    "criteria_sets",
    "scorers",
    "review_projects",
    "review_tasks",
    "reviews",
    "ui_sessions",
    "sweeps",
    "studies",
}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'protomed.db'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_single_head() -> None:
    """Concurrent branches must be merged before they land."""
    assert len(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()) == 1


def test_upgrade_insert_downgrade(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "head")
    assert table_names(db_url) == TABLES | {"alembic_version"}

    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            ds = Dataset(name="derm", root="/data/derm64", layout="folder", classes=["a", "b"])
            model = Model(dataset=ds, mode=ModelMode.prototype, preset="cpu-small")
            s.add(Job(kind=JobKind.train, model=model, params={"steps": 10}))
            s.commit()
        with Session(engine) as s:
            job = s.query(Job).one()
            assert (job.status, job.progress, job.params) == (JobStatus.queued, 0.0, {"steps": 10})
            assert job.model is not None and job.model.status is ModelStatus.pending
            assert job.model.dataset.classes == ["a", "b"]
            assert job.created_at is not None
        # The enumerations' CHECK constraints exist in the database, not only in Python.
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'bogus'"))
    finally:
        engine.dispose()

    command.downgrade(cfg, "base")
    assert table_names(db_url) == {"alembic_version"}


def test_head_matches_models(db_url: str) -> None:
    """No model change without its migration: autogenerate finds nothing left to do."""
    command.upgrade(alembic_config(db_url), "head")
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_service_imports_without_torch() -> None:
    """The API must start fast: its settings and models load neither torch nor ``ml``."""
    code = (
        "import sys, service.config, service.db.models, service.db.session\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m == 'ml' or m.startswith('ml.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
