"""mypy's configuration only gets stricter: every package is checked, and no first-party module
is relaxed from strict checking but for Celery's untyped decorators. (CI runs mypy itself.)"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHECKED = frozenset({"api", "service", "workers", "ml", "protomed_cli", "bench", "migrations"})
# Celery's decorators are untyped: the one other relaxation of a first-party module.
CELERY = {"module": "workers.tasks", "disallow_untyped_decorators": False}


def mypy_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    return config


def exempting_overrides() -> list[dict[str, Any]]:
    """The overrides for first-party modules (any setting there relaxes strict), but Celery's."""
    return [
        o
        for o in mypy_config().get("overrides", [])
        if any(m.split(".")[0] in CHECKED for m in _modules(o))
        and {**o, "module": "".join(_modules(o))} != CELERY
    ]


def _modules(override: dict[str, Any]) -> list[str]:
    module = override["module"]
    return [module] if isinstance(module, str) else list(module)


def test_strict_on_every_package() -> None:
    config = mypy_config()
    assert config["strict"] is True
    assert set(config["files"]) >= CHECKED
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= set(config["files"]), packages - set(config["files"])


def test_no_exemptions() -> None:
    exempt = sorted(m for o in exempting_overrides() for m in _modules(o))
    assert not exempt, f"first-party modules relaxed from strict: {exempt}"
