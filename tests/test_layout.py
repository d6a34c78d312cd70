"""The house's layout, checked: arrows between the project's packages only point down.

    protomed_cli -> api, workers, service, ml      (the command line: the top, may use them all)
    api          -> service, ml (torch-free parts)  (routes, schemas, dashboard)
    workers      -> service, ml                     (Celery tasks)
    service      -> ml (torch-free parts)           (settings, db, storage, queue producer, domain)
    ml           -> nothing of the project's        (the ML core, usable on its own)

Every ``import`` counts, lazy ones inside functions included: a lazy import is still a
dependency, only a later one. Read with :mod:`ast`, so no module is imported to check it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protomed_cli", "api", "workers", "service", "ml")
ALLOWED: dict[str, set[str]] = {
    "protomed_cli": {"api", "workers", "service", "ml"},
    "api": {"service", "ml"},
    "workers": {"service", "ml"},
    "service": {"ml"},
    "ml": set(),
}
WEB = ("fastapi", "starlette", "jinja2", "uvicorn")


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module name ``path`` imports (absolute; relative ones resolved), with its line."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts[: len(parts) - node.level + (path.name == "__init__.py")]
                base = ".".join([*parts, base] if base else parts)
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def project_files() -> dict[str, list[Path]]:
    return {pkg: sorted((REPO / pkg).rglob("*.py")) for pkg in PACKAGES}


def arrows() -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> where, for every import between two project packages."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pkg, files in project_files().items():
        for path in files:
            for name, line in imports(path):
                target = name.split(".")[0]
                if target in PACKAGES and target != pkg:
                    found[(pkg, target)].append(f"{path.relative_to(REPO)}:{line} ({name})")
    return found


def test_every_package_is_scanned() -> None:
    files = project_files()
    assert all(files[pkg] for pkg in PACKAGES), {p: len(f) for p, f in files.items()}


def test_no_upward_arrow() -> None:
    """service imports neither api nor workers, api does not import workers, ml imports none
    of them (and so on, as in the module's table)."""
    wrong = {
        f"{src} -> {dst}": where[:3]
        for (src, dst), where in arrows().items()
        if dst not in ALLOWED[src]
    }
    assert not wrong, wrong


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in arrows():
        graph[src].add(dst)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for start in PACKAGES:
        if start not in state:
            assert visit(start, []) is None


def test_routes_do_not_import_each_other() -> None:
    """What two route modules share lives in the service core or in api's own helpers."""
    wrong = []
    for path in sorted((REPO / "api" / "routes").glob("*.py")):
        for name, line in imports(path):
            if name.startswith("api.routes.") and name != "api.routes":
                wrong.append(f"{path.name}:{line} imports {name}")
    assert not wrong, wrong


def test_service_core_is_web_framework_free() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} ({name})"
        for path in project_files()["service"]
        for name, line in imports(path)
        if name.split(".")[0] in WEB
    ]
    assert not wrong, wrong


def run(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_api_starts_without_torch_or_the_workers() -> None:
    """``import api.main`` (what uvicorn does) loads neither torch nor the workers' code."""
    loaded = run(
        "import sys, api.main\n"
        "print(*sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'workers', "
        "'torchvision', 'open_clip', 'diffusers'}))"
    )
    assert loaded == []


def test_service_core_loads_neither_the_web_stack_nor_torch() -> None:
    modules = sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in project_files()["service"]
        if p.name != "__init__.py"
    )
    loaded = run(
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(*sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', "
        "'starlette', 'api', 'workers'}))"
    )
    assert loaded == []
