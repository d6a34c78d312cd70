"""``protomed``: the core's commands (``ml.cli``) plus the service's ``serve``, ``worker``,
``migrate`` and ``keys``.

Kept apart from ``ml.cli`` so the core never imports the service; the service commands import
nothing heavy until they run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from ml.cli import _fail, app

REPO = Path(__file__).resolve().parents[1]
KEY_FILE = ".protomed-admin-key"


def _migrate() -> None:
    from alembic import command
    from alembic.config import Config

    from api.core.config import get_settings

    cfg = Config(str(REPO / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    cfg.set_main_option("sqlalchemy.url", get_settings().database_url.replace("%", "%%"))
    command.upgrade(cfg, "head")


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision (``alembic upgrade head``)."""
    _migrate()
    typer.echo("database schema is up to date")


@app.command("create-key")
def create_key_cmd(
    name: Annotated[str, typer.Argument(help="Who the key is for.")],
    role: Annotated[
        str,
        typer.Option(help="admin (everything), viewer (reads results) or reviewer (blinded)."),
    ] = "reviewer",
) -> None:
    """Create an API key and print it (shown once; only its hash is stored)."""
    from api.core.security import create_key
    from api.db.models import ApiKeyRole
    from api.db.session import get_sessionmaker

    roles = [r.value for r in ApiKeyRole]
    if role not in roles:
        _fail(f"role must be one of {', '.join(roles)} (got {role!r})")
    with get_sessionmaker()() as session:
        _, token = create_key(session, name, role)
        session.commit()
    typer.echo(token)


def _admin_key(state: Path) -> str:
    """The bootstrap admin key: PROTOMED_ADMIN_KEY, else one kept (mode 0600) in ``state``."""
    from api.core.security import new_key

    if os.environ.get("PROTOMED_ADMIN_KEY"):
        return os.environ["PROTOMED_ADMIN_KEY"]
    path = state / KEY_FILE
    if path.is_file():
        return path.read_text().strip()
    key = new_key()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key


def worker_command(queues: str, name: str, pool: str = "solo") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues,
        "--concurrency", "1", "--prefetch-multiplier", "1", "--pool", pool, "-n", name,
        "--loglevel", "INFO",
    ]  # fmt: skip


def _prepare_broker() -> None:
    from workers.celery_app import get_celery, prepare_broker

    prepare_broker(get_celery())


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Queues to consume: gpu, default or both.")] = (
        "gpu,default"
    ),
) -> None:
    """Run a Celery worker (one job at a time; DDP over the machine's GPUs for training)."""
    _prepare_broker()
    os.execv(sys.executable, worker_command(queues, "worker@%h", pool="prefork"))


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(help="Folder datasets may be registered from (repeatable; default: .)."),
    ] = None,
    no_worker: Annotated[bool, typer.Option(help="API only; run workers elsewhere.")] = False,
) -> None:
    """Embedded mode: the API and one worker on this machine. Defaults need no servers:
    SQLite database, SQLite-backed Celery queue, local storage (all under the current folder)."""
    import uvicorn

    state = Path.cwd()
    env = os.environ
    if "PROTOMED_DATA_ROOTS" not in env:
        roots = [str(p.resolve()) for p in (data_root or [state])]
        env["PROTOMED_DATA_ROOTS"] = __import__("json").dumps(roots)
    env["PROTOMED_ADMIN_KEY"] = _admin_key(state)
    _choose_encoder(env)
    _migrate()
    typer.echo(f"admin key: {env['PROTOMED_ADMIN_KEY']}  (kept in {state / KEY_FILE})")
    typer.echo(f"datasets may be registered from: {env['PROTOMED_DATA_ROOTS']}")
    typer.echo(
        f"API docs: http://{host}:{port}/docs  dashboard: http://{host}:{port}/ui "
        "(log in with the admin key above)"
    )
    _prepare_broker()
    worker = None
    if not no_worker:
        worker = Supervised(worker_command("gpu,default", "embedded@%h"), env=dict(env))
        worker.start()
    try:
        uvicorn.run("api.main:app", host=host, port=port, log_level="info")
    finally:
        if worker is not None:
            worker.stop()


UNTRAINED_ENCODER = "ViT-B-32"  # light enough for a CPU; random weights carry no knowledge


def _choose_encoder(env: os._Environ[str] | dict[str, str]) -> None:
    """Embedded defaults that train out of the box: when no encoder weights were configured and
    the default ones are not on this machine (protomed never downloads), use an untrained
    encoder for this serve (and its worker) and say so plainly; configured weights that are
    missing are reported too (training requests then answer 422 saying what to set)."""
    from api.core.config import Settings
    from ml.weights import find_weights

    settings = Settings()  # the environment and .env as they are now
    try:
        found = find_weights(settings.encoder, settings.encoder_weights)
    except ValueError as exc:
        if "encoder_weights" in settings.model_fields_set:  # configured (environment or .env)
            typer.echo(f"WARNING: encoder weights not usable, training will be refused: {exc}")
            return
        env["PROTOMED_ENCODER_WEIGHTS"] = "untrained"
        if "encoder" not in settings.model_fields_set:
            env["PROTOMED_ENCODER"] = UNTRAINED_ENCODER
        typer.echo(
            f"encoder: UNTRAINED {env['PROTOMED_ENCODER']} (random weights, for trials: "
            f"prototypes will be centroids of random features), because no weights for "
            f"{settings.encoder} {settings.encoder_weights!r} are on this machine and protomed "
            "never downloads. For real prototypes set PROTOMED_ENCODER_WEIGHTS to a local "
            "checkpoint file (or a tag whose weights are in the Hugging Face hub cache, HF_HOME) "
            "and PROTOMED_ENCODER to its open_clip model, e.g. PROTOMED_ENCODER=ViT-L-14 "
            "PROTOMED_ENCODER_WEIGHTS=/weights/ViT-L-14.pt"
        )
        return
    where = f" ({found.path})" if found.path else ""
    untrained = " UNTRAINED (random weights, for trials)" if found.kind == "untrained" else ""
    typer.echo(f"encoder: {settings.encoder} {settings.encoder_weights}{untrained}{where}")


class Supervised:
    """The embedded worker process, restarted if it exits on its own: without it jobs would
    stay ``queued`` behind an API that still answers. Restarts back off up to a minute."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.cmd, self.env = cmd, env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env)
        self._thread.start()

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            assert self.proc is not None
            started, code = time.monotonic(), self.proc.wait()
            if self._stopping.is_set():
                return
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            typer.echo(f"worker exited with code {code}; restarting in {delay:g} s", err=True)
            with self._lock:
                if self._stopping.wait(delay):
                    return
                self.proc = subprocess.Popen(self.cmd, env=self.env)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:  # not while a restart is under way
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":  # pragma: no cover - `python -m api.cli`
    app()
