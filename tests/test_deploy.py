"""The compose file agrees with the code: every service the deployment needs is there, every
``PROTOMED_*`` variable it sets is a real setting, commands name modules that exist, the GPU
worker reserves GPUs, and the API waits for the migration. (No Docker engine runs here, so
the images are not built in CI; this keeps the file from drifting away from the code.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_complete(compose: dict) -> None:
    services = compose["services"]
    needed = {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "label-studio",
        "migrate",
        "api",
        "worker",
    }
    assert needed <= set(services), needed - set(services)
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_environment_names_real_settings(compose: dict) -> None:
    fields = {f"PROTOMED_{name.upper()}" for name in Settings.model_fields}
    used: set[str] = set()
    for service in compose["services"].values():
        env = service.get("environment") or {}
        used |= {k for k in (env if isinstance(env, dict) else []) if k.startswith("PROTOMED_")}
    assert used, "no PROTOMED_ settings in the compose file"
    unknown = used - fields - {"PROTOMED_DATA_HOST_DIR"}
    assert not unknown, f"compose sets variables no setting reads: {sorted(unknown)}"
    for required in (
        "PROTOMED_DATABASE_URL",
        "PROTOMED_BROKER_URL",
        "PROTOMED_STORAGE_BACKEND",
        "PROTOMED_S3_BUCKET",
        "PROTOMED_ADMIN_KEY",
    ):
        assert required in used


def test_commands_name_real_modules(compose: dict) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    text += "".join(p.read_text() for p in (REPO / "docker").glob("*Dockerfile"))
    modules = set(re.findall(r"-A\W+([\w.]+)", text)) | {
        m.split(":")[0] for m in re.findall(r"\b(api\.main:app)\b", text)
    }
    assert {"workers.celery_app", "api.main"} <= modules
    for module in modules:
        importlib.import_module(module)
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        assert (REPO / "docker" / dockerfile).is_file()
        assert "USER" in (REPO / "docker" / dockerfile).read_text()  # not root


def test_images_install_their_extras() -> None:
    """The API image installs the base and ``service`` dependencies only (no torch: the API
    never imports it, tests/test_packaging.py) and checks that none came in; the worker image
    installs ``ml`` and ``service``. The requirement lists are read from pyproject.toml."""
    api = (REPO / "docker" / "api.Dockerfile").read_text()
    worker = (REPO / "docker" / "worker.Dockerfile").read_text()
    code = "\n".join(ln for ln in api.splitlines() if not ln.lstrip().startswith("#"))
    runs = [ln[4:] for ln in code.replace("\\\n", " ").splitlines() if ln.startswith("RUN ")]
    commands = [" ".join(c.split()) for run in runs for c in run.split("&&")]
    pip = [c for c in commands if "pip install" in c]
    assert pip and not [c for c in pip if "torch" in c], pip
    (listing,) = [c for c in commands if "tomllib" in c]
    assert "p['dependencies'] + extras['service']" in listing and "+ extras['ml']" not in listing
    # open_clip's source only (the encoder check reads its tables), none of its dependencies
    assert "pip install --no-deps -r /tmp/open_clip.txt" in pip
    assert "find_spec('torch') is None" in " ".join(commands)
    assert "p['dependencies'] + extras['ml'] + extras['service']" in worker
    assert "torch.version.cuda" in worker  # the worker keeps its CUDA build
    assert "pip install '.[ml]'" in (REPO / "docker" / "Dockerfile").read_text()  # the core CLI
