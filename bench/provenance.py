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
        return {"torch": None, "gpu": None, "threads": None}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "gpu": gpu, "threads": torch.get_num_threads()}


def run_info(args: argparse.Namespace | dict[str, Any] | None = None) -> dict[str, Any]:
    """The commit (``None`` outside a git checkout), ``dirty`` (``git status --porcelain`` lists
    anything), the command line and the parsed arguments (secret-named ones hidden, ``SECRET``),
    torch's version (``None`` where it is not installed) and the intra-op threads it runs with
    (``threads_chosen`` among the arguments says why: :func:`use_threads`), Python's, the
    platform, the CPU count, the first CUDA GPU's name (``None`` without one) and the time in
    UTC."""
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


def threads_arg(value: str) -> str | int:
    """``--threads``: ``auto`` or a whole number >= 1 (argparse's type)."""
    from ml.runtime import AUTO

    if value.strip().lower() == AUTO:
        return AUTO
    if value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use auto or a whole number of threads >= 1")


def add_threads_option(ap: argparse.ArgumentParser, per: str = "") -> None:
    """The benches' ``--threads``, default ``auto`` as ``protomed`` itself chooses."""
    ap.add_argument(
        "--threads",
        type=threads_arg,
        default="auto",
        help=f"torch intra-op threads{per}: auto (the usable cores less the load of the "
        "machine's other processes, as protomed chooses: ml.runtime) or N",
    )


def use_threads(args: argparse.Namespace, processes: int = 1) -> int:
    """Choose ``--threads`` (``auto`` shares the free cores among ``processes`` measuring at
    once), apply it in this process, print the line on stderr and keep it in the arguments as
    ``threads_chosen``, so :func:`run_info` records what ran and why. Returns the count."""
    from ml.runtime import AUTO, ThreadChoice, apply_threads, choose_threads

    choice = choose_threads(args.threads, source="--threads")
    if args.threads == AUTO and processes > 1:
        per = max(1, choice.threads // processes)
        choice = ThreadChoice(per, f"{choice.reason}, shared by {processes} processes")
    apply_threads(choice, lambda line: print(line, file=sys.stderr, flush=True))
    args.threads_chosen = choice.line()
    return choice.threads
