"""Each constant is stated once (the others import it), and dead code stays gone: a value
restated in a second module drifts from the first the day one of them changes."""

from __future__ import annotations

import ast
import re
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "service", "workers", "ml")  # service/: the shared core, where it exists
SOURCES = [p for d in PACKAGES for p in sorted((REPO / d).rglob("*.py"))]
ONCE = (
    "SECRET_HEADER",
    "VERDICTS",
    "CHUNK",
    "NAME_PATTERN",
    "Layout",
    "PresetName",
    "SchedulerName",
    "Backbone",
    "PRESETS",
    "DEFAULT_STEPS",
    "DEFAULT_SCHEDULER",
)


def module_constants() -> dict[str, list[str]]:
    """Name -> the modules that assign it at module level."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in SOURCES:
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    found[t.id].append(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("name", ONCE)
def test_constant_defined_once(name: str) -> None:
    assert len(module_constants()[name]) == 1, module_constants()[name]


@pytest.mark.parametrize(
    "pattern",
    [
        r'"X-Protomed-Secret"',  # SECRET_HEADER's value
        r'\(\s*"pass",\s*"fail",\s*"na"\s*\)',  # VERDICTS
        r"ddim\|dpm",  # the scheduler names as a regex beside SchedulerName
        r'Literal\[\s*"paper"',  # the preset names
        r'Literal\[\s*"auto",\s*"folder"',  # the dataset layouts
        r"1024 \* 1024\n",  # CHUNK (other megabytes carry their own comment)
        re.escape('"^[A-Za-z0-9][A-Za-z0-9._-]*$"'),  # NAME_PATTERN
    ],
)
def test_value_written_once(pattern: str) -> None:
    hits = [str(p.relative_to(REPO)) for p in SOURCES if re.search(pattern, p.read_text())]
    assert len(hits) <= 1, hits


def test_unknown_job_kinds_are_refused_not_sampled() -> None:
    """``JobKind.prototypes`` is never created (kept in the enum: removing it would change the
    CHECK constraint); a job of that or any unknown kind fails instead of sampling."""
    from service.db.models import JobKind
    from service.job_kinds import spec_for
    from workers.sampling import run_sampling

    assert spec_for(JobKind.sample).load_runner() is run_sampling
    for kind in (JobKind.prototypes, "bogus"):
        with pytest.raises(ValueError, match="no runner for job kind"):
            spec_for(kind)


def test_dead_code_is_gone() -> None:
    import api.deps
    import ml.cli

    assert not hasattr(api.deps, "AnyKey")
    assert not hasattr(ml.cli, "main")


# Formatter opt-outs allowed in the project's Python files (path -> count). Empty: every file
# takes ruff format's layout, so a newcomer's formatter never rewrites lines they did not touch.
# A layout worth keeping (an aligned table) may be added here with its reason; the list shrinks.
FORMAT_OPT_OUTS: dict[str, int] = {}


def test_formatter_opt_outs_are_capped() -> None:
    """``# fmt: skip`` / ``# fmt: off`` outside FORMAT_OPT_OUTS fails: hand layout drifts from
    the formatter's, and hundreds of exceptions make `ruff format` meaningless."""
    found: dict[str, int] = defaultdict(int)
    dirs = ("api", "service", "workers", "ml", "protomed_cli", "bench", "tests", "migrations")
    for path in sorted(p for d in dirs for p in (REPO / d).rglob("*.py")):
        with path.open("rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type == tokenize.COMMENT and re.search(r"fmt:\s*(skip|off)\b", tok.string):
                    found[str(path.relative_to(REPO))] += 1
    over = {f: n for f, n in found.items() if n > FORMAT_OPT_OUTS.get(f, 0)}
    assert not over, f"formatter opt-outs beyond tests/test_tidy.py FORMAT_OPT_OUTS: {over}"
