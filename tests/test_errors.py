"""Domain errors are typed (ml/errors.py) and translated once: the API answers each kind's status
with its message, the CLI prints one ``error:`` line for them and nothing else, so a bug keeps
its traceback instead of passing for a user's mistake."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import ml.demo
from api.errors import install_handlers
from ml.cli import app as cli
from ml.errors import Conflict, Invalid, NotFound, UserError
from service.archive import ArchiveError
from service.encoder import EncoderUnavailable
from service.reviews import FilterError, ReviewError
from service.selection import NotScored, SelectionError
from service.splits import SplitTooLarge
from service.sweeps import SweepError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [Invalid("bad k"), NotFound("no folder x"), Conflict("busy")])
def test_cli_user_error_is_one_line_exit_2(
    error: UserError, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(_folder: Path) -> None:
        raise error

    monkeypatch.setattr(ml.demo, "check_folder", fail)
    monkeypatch.delenv("PROTOMED_DEBUG", raising=False)
    result = runner.invoke(cli, ["check", str(tmp_path)])
    assert result.exit_code == 2, result.output
    said = [ln for ln in result.output.strip().splitlines() if not ln.startswith("threads: ")]
    assert said == [f"error: {error}"]  # after the line saying how many threads check runs with
    assert "Traceback" not in result.output


def test_cli_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["check", str(tmp_path / "absent")])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"error: no folder {tmp_path / 'absent'}")


@pytest.mark.parametrize(
    "bug", [ValueError("shape mismatch"), KeyError("k"), FileNotFoundError("/tmp/x")]
)
def test_cli_bug_is_not_swallowed(
    bug: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ValueError, KeyError or OSError from the core is a bug: it propagates (typer's
    runner hands it back; the console script prints its traceback), never ``error:`` exit 2."""

    def fail(_folder: Path) -> None:
        raise bug

    monkeypatch.setattr(ml.demo, "check_folder", fail)
    result = runner.invoke(cli, ["check", str(tmp_path)])
    assert result.exception is bug
    assert result.exit_code == 1 and "error:" not in result.output


# --- the API ----------------------------------------------------------------------------------


RAISED: list[tuple[Exception, int]] = [
    (Invalid("k must be >= 1"), 422),
    (NotFound("no batch with id 7"), 404),
    (Conflict("model 3 is training, not ready"), 409),
    (SplitTooLarge("class 'a' has 3 images, 5 asked"), 422),
    (EncoderUnavailable("cannot train: set PROTOMED_ENCODER_WEIGHTS"), 422),
    (ReviewError("batch 4 has no images yet"), 422),
    (FilterError("model ids must be between 1 and 9"), 422),
    (SelectionError("random_count needs per_batch"), 422),
    (NotScored("batch 2 is not scored"), 409),
    (SweepError("unknown class 'x'"), 422),
    (ArchiveError("not a zip archive"), 422),
]


def api_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    install_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("exc,status", RAISED, ids=[type(e).__name__ for e, _ in RAISED])
def test_route_error_answers_its_status_with_the_message(exc: Exception, status: int) -> None:
    r = api_raising(exc).get("/boom")
    assert (r.status_code, r.json()) == (status, {"detail": str(exc)})


def test_not_found_message_has_no_quotes() -> None:
    """Unlike KeyError's, NotFound's message is the text as given."""
    assert api_raising(NotFound("no batch with id 7")).get("/boom").json() == {
        "detail": "no batch with id 7"
    }


@pytest.mark.parametrize("bug", [ValueError("internal"), KeyError("k"), LookupError("x")])
def test_route_bug_is_a_500(bug: Exception) -> None:
    assert api_raising(bug).get("/boom").status_code == 500


# --- service/ raises typed errors ---------------------------------------------------------------

VALIDATORS = ("field_validator", "model_validator")
PLAIN = ("ValueError", "KeyError", "LookupError")
#: (file, function) that may raise a plain ValueError: none of these reports a user's mistake.
ALLOWED = {
    ("service/job_kinds.py", "spec_for"): "a stored job's kind no runner has: the job fails",
    ("service/reports.py", "_criteria_failure"): "a stored verdict outside VERDICTS: bad data",
    ("service/reviews.py", "refresh_annotation"): "Label Studio answered another annotation",
    ("service/storage.py", "validate_key"): "keys are built by the service: a bad one is a bug",
    ("service/sweep_report.py", "mean_pairwise_distance"): "one sampler run, one image size",
    ("service/statistics.py", "holm"): "statistics on counts the service computed",
    ("service/statistics.py", "mantel_haenszel"): "as above",
    ("service/statistics.py", "cohen_kappa"): "as above",
    ("service/statistics.py", "fleiss_kappa"): "as above",
    ("service/study_statistics.py", "exact_interval"): "as above",
    ("service/study_statistics.py", "equivalence_to_chance"): "as above",
    ("service/study_statistics.py", "_alpha_from_units"): "as above",
    ("service/study_statistics.py", "krippendorff_alpha_nominal"): "as above",
    ("service/study_statistics.py", "auc"): "as above",
    ("service/study_statistics.py", "roc_points"): "as above",
}


def plain_raises(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each ``raise ValueError``/``KeyError``/``LookupError``
    outside pydantic validators (pydantic turns those into a ValidationError)."""
    found: list[tuple[str, int]] = []

    def walk(node: ast.AST, fn: str, in_validator: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                decorators = [ast.unparse(d) for d in child.decorator_list]
                validator = any(d.startswith(VALIDATORS) for d in decorators)
                walk(child, child.name, in_validator or validator)
                continue
            if isinstance(child, ast.Raise) and child.exc is not None and not in_validator:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name) and exc.id in PLAIN:
                    found.append((fn, child.lineno))
            walk(child, fn, in_validator)

    walk(ast.parse(path.read_text()), "<module>", False)
    return found


def test_service_raises_typed_errors() -> None:
    stray = [
        f"{rel}:{line} in {fn}"
        for path in sorted((REPO / "service").rglob("*.py"))
        for rel in [path.relative_to(REPO).as_posix()]
        for fn, line in plain_raises(path)
        if (rel, fn) not in ALLOWED
    ]
    assert not stray, f"raise Invalid/NotFound/Conflict (ml.errors) instead: {stray}"


def test_the_scan_sees_plain_raises(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from pydantic import field_validator\n"
        "def f():\n    raise ValueError('x')\n"
        "def g():\n    raise KeyError\n"
        "class M:\n    @field_validator('a')\n    def v(cls, a):\n        raise ValueError('y')\n"
    )
    assert plain_raises(src) == [("f", 3), ("g", 5)]
