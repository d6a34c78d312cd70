"""The tests' helpers that the whole-service benchmarks share with them: the service's settings
and migrations, seed rows, the API server and worker as real processes, Chromium screenshots.

tests/ is a folder of top-level modules (pytest puts it on the path; they import each other as
``from conftest import ...``), not a package, so ``tests_module`` imports them the same way.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[1] / "tests"


def tests_module(name: str) -> ModuleType:
    """``tests/<name>.py``, imported as pytest imports it (``conftest``, ``service_procs``...)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)
