"""``protomed``: the core's commands (``ml.cli``) plus the service's ``serve``, ``worker``,
``migrate`` and ``keys``.

Kept apart from ``ml.cli`` so the core never imports the service; the service commands import
nothing heavy until they run.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from ml.cli import _fail
from ml.cli import app as app

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from service.db.models import Sweep

KEY_FILE = ".protomed-admin-key"
T = TypeVar("T")


def _migrate() -> None:
    from alembic import command

    from migrations import alembic_config, log_progress
    from service.config import get_settings

    log_progress()
    command.upgrade(alembic_config(get_settings().database_url), "head")


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
    from service.db.models import ApiKeyRole
    from service.db.session import get_sessionmaker
    from service.security import create_key

    roles = [r.value for r in ApiKeyRole]
    if role not in roles:
        _fail(f"role must be one of {', '.join(roles)} (got {role!r})")
    with get_sessionmaker()() as session:
        _, token = create_key(session, name, role)
        session.commit()
    typer.echo(token)


class CardFormat(StrEnum):
    markdown = "markdown"
    json = "json"


@app.command()
def card(
    model_id: Annotated[int, typer.Argument(help="The model's id (GET /models lists them).")],
    format: Annotated[CardFormat, typer.Option(help="Markdown or JSON.")] = CardFormat.markdown,
) -> None:
    """Print a model's card from the service's database: training data and licence, encoder,
    configuration, evaluation, expert plausibility, audits, intended use and limits."""
    from service.db.models import Model
    from service.db.session import get_sessionmaker
    from service.model_cards import build_card, card_markdown

    with get_sessionmaker()() as session:
        model = session.get(Model, model_id)
        if model is None:
            _fail(f"no model with id {model_id} in {_database_name()}")
            return
        built = build_card(session, model)
    typer.echo(
        card_markdown(built) if format is CardFormat.markdown else built.model_dump_json(indent=2)
    )


scorer_app = typer.Typer(
    help="Plausibility scorers learnt from expert verdicts (train one, show its report).",
    no_args_is_help=True,
)
app.add_typer(scorer_app, name="scorer")


@scorer_app.command("train")
def scorer_train(
    domain: Annotated[str, typer.Argument(help="The review domain (GET /criteria lists them).")],
) -> None:
    """Queue a ``score`` job: the domain's next scorer version on all its reviewed images (a
    worker runs it: ``protomed serve`` or ``protomed worker``)."""
    from service.config import get_settings
    from service.db.session import get_sessionmaker
    from service.scorers import request_scorer

    with get_sessionmaker()() as session:
        job = _act(lambda: request_scorer(session, get_settings(), domain, "cli"))
        typer.echo(f"queued score job {job.id} for domain {domain!r}")


@scorer_app.command("list")
def scorer_list(
    domain: Annotated[str | None, typer.Option(help="Only this review domain.")] = None,
) -> None:
    """Every scorer version: domain, version, images, cross-validated AUC."""
    from sqlalchemy import select

    from service.db.models import Scorer
    from service.db.session import get_sessionmaker
    from service.scorers import metrics_of

    with get_sessionmaker()() as session:
        query = select(Scorer).order_by(Scorer.domain, Scorer.version)
        if domain is not None:
            query = query.where(Scorer.domain == domain)
        rows = session.scalars(query).all()
        typer.echo(f"{'id':>4}  {'domain':<16} {'version':>7} {'images':>7} {'AUC (95% CI)':<22}")
        for row in rows:
            cv = metrics_of(row).cv
            typer.echo(
                f"{row.id:>4}  {row.domain:<16} {row.version:>7} {row.n_images:>7} "
                f"{_auc_text(cv.auc, cv.auc_ci):<22}"
            )


def _auc_text(auc: float | None, ci: tuple[float, float] | None) -> str:
    if auc is None or ci is None:
        return "n/a (one verdict only)"
    return f"{auc:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


@scorer_app.command("show")
def scorer_show(
    scorer_id: Annotated[int, typer.Argument(help="The scorer's id (protomed scorer list).")],
) -> None:
    """A scorer's report: on how many reviewed images, cross-validated AUC with its interval,
    Brier score and the calibration curve as a table."""
    from service.db.models import Scorer
    from service.db.session import get_sessionmaker
    from service.scorers import metrics_of

    with get_sessionmaker()() as session:
        row = session.get(Scorer, scorer_id)
        if row is None:
            _fail(f"no scorer with id {scorer_id} in {_database_name()}")
            return
        m = metrics_of(row)
        cv = m.cv
        lines = [
            f"scorer {row.id}: domain {row.domain!r}, version {row.version}, trained "
            f"{row.created_at:%Y-%m-%d %H:%M} (job {row.job_id})",
            f"encoder: {row.encoder}",
            f"trained on {row.n_images} reviewed images, {row.n_plausible} plausible "
            f"(base rate {cv.base_rate:.3f})",
            f"cross-validated ({m.folds}-fold, nested) AUC: {_auc_text(cv.auc, cv.auc_ci)}",
            f"Brier score {cv.brier:.4f} (base rate alone: {cv.brier_base:.4f}); L2 C = {m.c:g}",
            "calibration (predicted vs observed plausible share):",
            f"  {'predicted range':<17} {'n':>5} {'mean predicted':>15} {'observed':>9} "
            f"{'95% CI':>15}",
        ]
        for b in cv.calibration:
            lines.append(
                f"  {b.low:.3f}-{b.high:.3f}       {b.count:>5} {b.mean_predicted:>15.3f} "
                f"{b.observed:>9.3f} {b.observed_ci[0]:>7.3f}-{b.observed_ci[1]:.3f}"
            )
    typer.echo("\n".join(lines))


# --- guidance sweeps (service.sweeps) ------------------------------------------------------------

sweep_app = typer.Typer(
    help="Guidance per class from expert verdicts: start a sweep, send it to review, read the "
    "report, apply the recommended scales as the model's per-class defaults.",
    no_args_is_help=True,
)
app.add_typer(sweep_app, name="sweep")


class ReportFormat(StrEnum):
    text = "text"
    json = "json"
    csv = "csv"


def _scales(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        _fail(f"--scales must be comma-separated numbers (got {value!r})")
        raise


@sweep_app.command("start")
def sweep_start(
    model_id: Annotated[int, typer.Argument(help="A ready model's id (GET /models).")],
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated classes (default: every class).")
    ] = None,
    scales: Annotated[
        str | None,
        typer.Option(help="Comma-separated guidance scales, 2 to 8 (default 1,2,3.5,5)."),
    ] = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Images per class and scale.")] = 8,
    seed: Annotated[int, typer.Option(help="The same at every scale (paired design).")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Sampler steps (default per scheduler).")
    ] = None,
    scheduler: Annotated[str, typer.Option(help="ddim, dpm++ or dpm++sde.")] = "dpm++sde",
) -> None:
    """Queue a guidance sweep: one sample job per (class, scale) on the service's workers."""
    from ml.cli import _classes, _guard
    from service.config import get_settings
    from service.db.models import Model
    from service.db.session import get_sessionmaker
    from service.exceptions import ServiceUnavailable
    from service.queue import submit
    from service.sweeps import SweepRequest, discard, start_sweep

    body: dict[str, object] = {"n": n, "seed": seed, "steps": steps, "scheduler": scheduler}
    if classes:
        body["classes"] = _classes(classes)
    if scales:
        body["scales"] = _scales(scales)
    request = _guard(lambda: SweepRequest.model_validate(body))
    with get_sessionmaker()() as session:
        model = session.get(Model, model_id)
        if model is None:
            _fail(f"no model with id {model_id} in {_database_name()}")
            return
        sweep, jobs = _guard(lambda: start_sweep(session, model, request, get_settings(), "cli"))
        try:
            submit(session, jobs)
        except ServiceUnavailable as exc:
            discard(session, sweep)
            _fail(f"the job queue did not answer ({exc}); nothing was queued")
        typer.echo(
            f"sweep {sweep.id}: {len(sweep.classes)} classes x {len(sweep.scales)} scales "
            f"({', '.join(f'{s:g}' for s in sweep.scales)}) x {sweep.n} images, "
            f"{len(jobs)} sample jobs queued; then: protomed sweep review {sweep.id}"
        )


def _sweep(session: Session, sweep_id: int) -> Sweep:
    from service.db.models import Sweep

    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        _fail(f"no sweep with id {sweep_id} in {_database_name()}")
        raise AssertionError("unreachable")
    return sweep


@sweep_app.command("review")
def sweep_review(
    sweep_id: Annotated[int, typer.Argument(help="The sweep's id.")],
    domain: Annotated[
        str | None, typer.Option(help="Review domain (default: the dataset's).")
    ] = None,
) -> None:
    """Send every batch of the sweep to blinded review in Label Studio (scales shuffled
    together; tasks never show the scale)."""
    from service.config import get_settings
    from service.db.session import get_sessionmaker
    from service.sweeps import send_sweep_to_review

    with get_sessionmaker()() as session:
        sent = _act(lambda: send_sweep_to_review(session, get_settings(), sweep_id, domain, "cli"))
        typer.echo(
            f"{len(sent.tasks)} images added to review project {sent.project.id}; "
            f"sync job {sent.job.id}"
        )


@sweep_app.command("report")
def sweep_report_cmd(
    sweep_id: Annotated[int, typer.Argument(help="The sweep's id.")],
    format: Annotated[ReportFormat, typer.Option(help="text, json or csv.")] = ReportFormat.text,
) -> None:
    """Plausibility against guidance per class (image as unit, Wilson 95% intervals), the
    diversity of each batch and the recommended scale per class with the rule."""
    from service.config import get_settings
    from service.db.session import get_sessionmaker
    from service.storage import get_storage
    from service.sweep_report import sweep_csv, sweep_text
    from service.sweeps import report

    with get_sessionmaker()() as session:
        sweep = _sweep(session, sweep_id)
        rep = report(session, sweep, get_storage(), get_settings())
    if format is ReportFormat.json:
        typer.echo(rep.model_dump_json(indent=2))
    else:
        typer.echo(sweep_csv(rep) if format is ReportFormat.csv else sweep_text(rep), nl=False)
        if format is ReportFormat.text:
            typer.echo()


@sweep_app.command("apply")
def sweep_apply(
    sweep_id: Annotated[int, typer.Argument(help="The sweep's id.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="CLASS=SCALE instead of the recommendation (repeatable)."),
    ] = None,
) -> None:
    """Write the sweep's recommended scales (or --set ones) into the model's per-class
    guidance defaults, which POST /generate uses when given no guidance."""
    from ml.cli import _guard
    from service.config import get_settings
    from service.db.session import get_sessionmaker
    from service.storage import get_storage
    from service.sweeps import apply

    overrides: dict[str, float] = {}
    for item in set_ or []:
        name, sep, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            _fail(f"--set takes CLASS=SCALE (got {item!r})")
    with get_sessionmaker()() as session:
        sweep = _sweep(session, sweep_id)
        chosen, skipped = _guard(
            lambda: apply(session, sweep, get_storage(), get_settings(), overrides or None)
        )
        session.commit()
        for name, scale in chosen.items():
            typer.echo(f"{name}: guidance {scale:g}")
        for name, why in skipped.items():
            typer.echo(f"{name}: unchanged ({why})")
        typer.echo(f"model {sweep.model_id}'s defaults: {sweep.model.guidance_defaults}")


def _act(fn: Callable[[], T]) -> T:
    """Run a service action: what the user can fix (a :class:`~ml.errors.UserError`, a
    dependency that did not answer) is one ``error:`` line and exit 2, as the API answers it
    with a status and the same message."""
    from ml.errors import UserError
    from service.exceptions import ServiceUnavailable

    try:
        return fn()
    except (UserError, ServiceUnavailable) as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _database_name() -> str:
    from service.config import get_settings

    url = get_settings().database_url
    return url.rsplit("@", 1)[-1]  # never print a password


def _admin_key(state: Path) -> tuple[str, str | None]:
    """The bootstrap admin key and a note for the user: PROTOMED_ADMIN_KEY, else the one kept
    (mode 0600) in ``state``, else a new one. A key that was revoked (``POST /keys/{id}/revoke``)
    is never printed nor revived: the kept one is replaced by a new key, and a revoked
    PROTOMED_ADMIN_KEY is refused (the operator set it on purpose and must choose another)."""
    from service.db.session import get_sessionmaker
    from service.security import new_key, revoked_key

    def revoked(key: str) -> int | None:
        with get_sessionmaker()() as session:
            row = revoked_key(session, key)
            return row.id if row is not None else None

    if os.environ.get("PROTOMED_ADMIN_KEY"):
        key_id = revoked(os.environ["PROTOMED_ADMIN_KEY"])
        if key_id is not None:
            _fail(
                f"PROTOMED_ADMIN_KEY was revoked (API key id {key_id}); set a live admin key, or "
                f"unset it to have serve create a new one in {state / KEY_FILE}"
            )
        return os.environ["PROTOMED_ADMIN_KEY"], None
    path = state / KEY_FILE
    note = None
    if path.is_file():
        key = path.read_text().strip()
        key_id = revoked(key)
        if key_id is None:
            return key, None
        note = f"the admin key kept in {path} was revoked (API key id {key_id}): created a new one"
    key = new_key()
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key, note


def worker_command(queues: str, name: str, pool: str = "solo") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queues,
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--pool",
        pool,
        "-n",
        name,
        "--loglevel",
        "INFO",
    ]


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
    _check_port_free(host, port)
    import uvicorn

    from service.config import get_settings

    state = Path.cwd()
    env = os.environ
    if "PROTOMED_DATA_ROOTS" not in env:
        roots = [str(p.resolve()) for p in (data_root or [state])]
        env["PROTOMED_DATA_ROOTS"] = __import__("json").dumps(roots)
    _choose_encoder(env)
    _migrate()
    env["PROTOMED_ADMIN_KEY"], note = _admin_key(state)
    get_settings.cache_clear()  # read again with the key (and data roots) set
    if note:
        typer.echo(note)
    typer.echo(f"admin key: {env['PROTOMED_ADMIN_KEY']}  (kept in {state / KEY_FILE})")
    typer.echo(f"datasets may be registered from: {env['PROTOMED_DATA_ROOTS']}")
    typer.echo(
        f"API docs: http://{host}:{port}/docs  dashboard: http://{host}:{port}/ui "
        "(log in with the admin key above)"
    )
    _prepare_broker()
    worker = None
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that killed serve on the spot and left the worker running as an orphan.
    # With these handlers SIGTERM and SIGINT both unwind through ``finally``.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    try:
        if not no_worker:
            node = f"embedded-{os.getpid()}@{socket.gethostname()}"
            worker = Supervised(
                worker_command("gpu,default", node),
                env=dict(env),
                on_exit=lambda pid, code: _release_worker(f"{node}:{pid}", code),
            )
            worker.start()
        uvicorn.run("api.main:app", host=host, port=port, log_level="info")
    except _Stop as stop:
        raise typer.Exit(128 + stop.signum) from None
    finally:
        if worker is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: no more waiting
                signal.signal(sig, lambda *_: worker.kill())
            worker.stop()


def _check_port_free(host: str, port: int) -> None:
    """Bind the address as uvicorn will, then let go. A busy port otherwise surfaces as
    uvicorn's "address already in use" after the migration log and the admin key, where it is
    easily missed; here it is the first line, and nothing has been migrated or created yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # uvicorn's choice
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's socket
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                _fail(
                    f"port {port} on {host} is already in use (another protomed serve?); "
                    "choose a free one with --port"
                )
            _fail(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port"
            )


UNTRAINED_ENCODER = "ViT-B-32"  # light enough for a CPU; random weights carry no knowledge


def _choose_encoder(env: os._Environ[str] | dict[str, str]) -> None:
    """Embedded defaults that train out of the box: when no encoder weights were configured and
    the default ones are not on this machine (protomed never downloads), learn the prototypes'
    encoder from each dataset and measure with an untrained CLIP encoder for this serve (and
    its worker), and say so plainly; configured weights that are
    missing are reported too (training requests then answer 422 saying what to set)."""
    from ml.prototypes.weights import find_weights
    from service.config import Settings

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
        if "prototype_encoder" not in settings.model_fields_set:
            env["PROTOMED_PROTOTYPE_ENCODER"] = "learned"
        typer.echo(
            f"encoder: UNTRAINED {env['PROTOMED_ENCODER']} (random weights, for trials: "
            f"prototypes will be centroids of random features), because no weights for "
            f"{settings.encoder} {settings.encoder_weights!r} are on this machine and protomed "
            "never downloads. For real prototypes set PROTOMED_ENCODER_WEIGHTS to a local "
            "checkpoint file (or a tag whose weights are in the Hugging Face hub cache, HF_HOME) "
            "and PROTOMED_ENCODER to its open_clip model, e.g. PROTOMED_ENCODER=ViT-L-14 "
            "PROTOMED_ENCODER_WEIGHTS=/weights/ViT-L-14.pt"
        )
        _say_prototype_encoder(env.get("PROTOMED_PROTOTYPE_ENCODER", settings.prototype_encoder))
        return
    where = f" ({found.path})" if found.path else ""
    untrained = " UNTRAINED (random weights, for trials)" if found.kind == "untrained" else ""
    typer.echo(f"encoder: {settings.encoder} {settings.encoder_weights}{untrained}{where}")
    _say_prototype_encoder(settings.prototype_encoder)


def _say_prototype_encoder(kind: str) -> None:
    """Which encoder the training jobs learn prototypes with, and what the CLIP one is for."""
    if kind == "learned":
        typer.echo(
            "prototype encoder: LEARNED from each dataset (a small CNN trained on its training "
            "images jointly with the prototypes, saved beside the codebook; "
            "PROTOMED_PROTOTYPE_ENCODER=clip to use the encoder above). The encoder above only "
            "measures images (evaluation, audit, scorers), never in the prototypes' own space."
        )
    else:
        typer.echo("prototype encoder: the CLIP encoder above (PROTOMED_PROTOTYPE_ENCODER=clip)")


class _Stop(BaseException):
    """SIGTERM or SIGINT reached serve: stop the worker, then exit 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def _release_worker(worker: str, code: int | None) -> None:
    """Serve saw its worker process end: re-queue the jobs it was running now (at their place)
    rather than after the heartbeat timeout. A worker that stopped cleanly has re-queued its
    job itself; this covers one that was killed or crashed."""
    from service.config import get_settings
    from service.job_state import release_worker
    from service.queue import enqueue

    why = f"exited (code {code})" if code is not None else "was killed"
    try:
        release_worker(get_settings(), worker, enqueue, why)
    except Exception as exc:  # the reaper still catches these jobs later
        typer.echo(f"could not re-queue the jobs of {worker}: {exc}", err=True)


def _parent_death_signal() -> None:  # pragma: no cover - runs in the forked child
    """Linux: the worker gets SIGTERM if serve dies without stopping it (SIGKILL, crash), so
    it never outlives serve and keeps consuming the queue."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class Supervised:
    """The embedded worker process, restarted if it exits on its own: without it jobs would
    stay ``queued`` behind an API that still answers. Restarts back off up to a minute.
    ``on_exit(pid, returncode)`` runs after each exit (before a restart, and after stop)."""

    STOP_WAIT_S = 60.0  # SIGTERM: the job checkpoints and re-queues itself; then SIGKILL

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        on_exit: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self.cmd, self.env, self.on_exit = cmd, env, on_exit
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        linux = sys.platform.startswith("linux")
        return subprocess.Popen(
            self.cmd, env=self.env, preexec_fn=_parent_death_signal if linux else None
        )

    def start(self) -> None:
        self.proc = self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            assert self.proc is not None
            started, code = time.monotonic(), self.proc.wait()
            if self._stopping.is_set():
                return
            if self.on_exit is not None:
                self.on_exit(self.proc.pid, code)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            typer.echo(f"worker exited with code {code}; restarting in {delay:g} s", err=True)
            with self._lock:
                if self._stopping.wait(delay):
                    return
                self.proc = self._spawn()

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown: the running job is interrupted and re-queued),
        then SIGKILL after ``STOP_WAIT_S``; the worker's jobs are released either way."""
        self._stopping.set()
        with self._lock:  # not while a restart is under way
            if self.proc is None:
                return
            if self.proc.poll() is None:
                self.proc.terminate()
        try:
            self.proc.wait(timeout=self.STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            typer.echo(f"worker still running after {self.STOP_WAIT_S:g} s: killing it", err=True)
            self.proc.kill()
            self.proc.wait()
        if self.on_exit is not None:
            self.on_exit(self.proc.pid, self.proc.returncode)


if __name__ == "__main__":  # pragma: no cover - `python -m protomed_cli`
    app()
