"""How protomed installs: extras that keep torch out of the service, migrations shipped inside
the wheel, and an API that runs where the ML stack is not installed at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "torchvision", "open_clip", "diffusers", "sklearn", "timm")
ML_DISTS = {"torch", "torchvision", "open-clip-torch", "diffusers", "timm", "triton"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def entry_point() -> tuple[str, str]:
    """The ``protomed`` console script's module and object (wherever the CLI lives)."""
    module, _, attr = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][
        "protomed"
    ].partition(":")
    return module, attr


def names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower().replace("_", "-") for r in requirements}


def test_extras_split_the_ml_stack_from_the_service() -> None:
    """Base and ``service`` name no ML package; ``worker`` is both halves, ``dev`` all of it."""
    proj = project()
    extras = proj["optional-dependencies"]
    assert {"ml", "service", "worker", "dev"} <= set(extras)
    assert not names(proj["dependencies"]) & ML_DISTS, proj["dependencies"]
    assert not names(extras["service"]) & ML_DISTS, extras["service"]
    assert {"torch", "torchvision", "open-clip-torch", "diffusers"} <= names(extras["ml"])
    assert extras["worker"] == ["protomed[ml,service]"]
    assert "protomed[worker,bench]" in extras["dev"]  # everything, the benchmarks' plots too
    assert names(extras["bench"]) == {"matplotlib"}


@pytest.mark.slow
def test_service_extra_resolves_without_torch(tmp_path: Path) -> None:
    """What ``pip install '.[service]'`` would install, resolved by pip itself (nothing is
    installed: --dry-run, --ignore-installed so the shared environment does not hide anything)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "-q",
            "--report",
            str(report),
            f"{REPO}[service]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"fastapi", "sqlalchemy", "celery", "protomed"} <= installed
    assert not installed & ML_DISTS, sorted(installed & ML_DISTS)
    assert not [n for n in installed if n.startswith("nvidia-")]


# Found (open_clip's source is in the API image, read as data by ml/prototypes/weights.py) but never
# executed: importing any of these raises, as it would where torch is not installed.
BLOCK_ML = """
import importlib.abc, importlib.machinery, sys
BLOCKED = {blocked!r}
class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} may not be imported by the service (the test blocks it)")
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = Refuse()
        return spec
sys.meta_path.insert(0, Block())
"""


def test_service_runs_without_the_ml_stack(tmp_path: Path) -> None:
    """As in the API image (``.[service]``): with torch, open_clip, diffusers, scikit-learn and
    timm impossible to import, the API, the CLI, the CPU worker's tasks and the API's encoder
    check (which reads open_clip's tables from its source) still import and work."""
    code = BLOCK_ML.format(blocked=ML_STACK) + (
        f"import api.main, {entry_point()[0]}, workers.tasks, workers.review_sync\n"
        "from ml.prototypes.weights import find_weights\n"
        "assert api.main.app.openapi()['paths']\n"
        "assert find_weights('ViT-B-32', 'untrained').kind == 'untrained'\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {ML_STACK!r})\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PROTOMED_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the sources, so no build/ folder left by an earlier build (pip builds
    in the tree) can supply files the sources lack."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    junk = shutil.ignore_patterns(
        ".*",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        "tests",
        "bench",
        "docs",
        "runs",
        "storage",
        "work",
        "*.db",
    )
    shutil.copytree(REPO, src, ignore=junk)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("protomed-*.whl")
    return path


def test_wheel_ships_the_migrations(wheel: Path) -> None:
    files = set(zipfile.ZipFile(wheel).namelist())
    assert {"migrations/__init__.py", "migrations/env.py", "migrations/script.py.mako"} <= files
    shipped = {f for f in files if f.startswith("migrations/versions/") and f.endswith(".py")}
    in_repo = {f"migrations/versions/{p.name}" for p in (REPO / "migrations/versions").glob("*.py")}
    assert shipped == in_repo and shipped
    assert "api/templates/base.html" in files


def test_migrate_works_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """``protomed migrate`` from the unpacked wheel, run in an empty folder far from the
    checkout (no alembic.ini there): the schema reaches the head revision."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    db = tmp_path / "fresh.db"
    env = {**os.environ, "PYTHONPATH": str(site), "PROTOMED_DATABASE_URL": f"sqlite:///{db}"}
    module, attr = entry_point()
    code = (
        f"import importlib, sys, migrations\ncli = importlib.import_module({module!r})\n"
        f"assert migrations.__file__.startswith({str(site)!r}), migrations.__file__\n"
        f"assert cli.__file__.startswith({str(site)!r}), cli.__file__\n"
        "sys.argv = ['protomed', 'migrate']\n"
        f"cli.{attr}()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=run_dir,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "database schema is up to date" in proc.stdout
    assert "Running upgrade" in proc.stderr  # Alembic says which revisions it applied

    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text

    from migrations import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    finally:
        engine.dispose()


def test_git_ignores_what_the_embedded_service_writes_in_a_checkout() -> None:
    """``protomed serve`` run from a checkout (as the README does) keeps its state in the
    current folder, and the README's datasets go under ``data/``: git must not list any of it."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    from protomed_cli.main import KEY_FILE
    from service.config import Settings

    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    paths = [
        str(defaults["database_url"]).split(":///./", 1)[1],
        str(defaults["broker_url"]).split(":///./", 1)[1],
        f"{defaults['storage_dir']}/models/1/checkpoint.pt",
        f"{defaults['work_dir']}/models/1/last.pt",
        KEY_FILE,
        "data/toy/basophil/0000.png",
    ]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True
    )
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stdout + proc.stderr
