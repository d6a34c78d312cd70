"""What produced a benchmark's result: the commit (and whether the tree had uncommitted
changes), the command and its arguments, the library versions and the machine.

Every benchmark that writes a result file puts ``run_info(args)`` in it: a top-level ``"run"``
key of a JSON file, or ``sidecar(path, info)`` beside a CSV or markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Arguments whose values stay out of result files (a Label Studio token, say): written as "***".
SECRET = re.compile(r"token|secret|password|passwd|api[-_]?key", re.IGNORECASE)
HIDDEN = "***"


def _git(*cmd: str) -> str | None:
    try:
        r = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-named options hidden."""
    out: list[str] = []
    hide_next = False
    for a in argv:
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
        elif a.startswith("-") and SECRET.search(a):
            name, eq, _ = a.partition("=")
            out.append(f"{name}={HIDDEN}" if eq else a)
            hide_next = not eq
        else:
            out.append(a)
    return out


def _torch() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "gpu": None}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu}


def run_info(args: argparse.Namespace | dict[str, Any] | None = None) -> dict[str, Any]:
    """The commit (``None`` outside a git checkout), ``dirty`` (``git status --porcelain`` lists
    anything), the command line and the parsed arguments (secret-named ones hidden, ``SECRET``),
    torch's version (``None`` where it is not
    installed), Python's, the platform, the CPU count, the first CUDA GPU's name (``None``
    without one) and the time in UTC."""
    status = _git("status", "--porcelain")
    parsed = vars(args) if isinstance(args, argparse.Namespace) else (args or {})
    parsed = {k: HIDDEN if SECRET.search(k) and v is not None else v for k, v in parsed.items()}
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "argv": _argv([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
        "args": _jsonable(parsed),
        **_torch(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def sidecar(path: Path, info: dict[str, Any]) -> Path:
    """``info`` beside a result with no place for it (a CSV, a markdown table): PATH.run.json."""
    side = path.with_name(path.name + ".run.json")
    side.write_text(json.dumps(info, indent=2) + "\n")
    return side
