"""Real processes for service tests: a Celery worker, and waiting on jobs through the API."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


class Worker:
    """``celery worker`` in its own process group (so SIGKILL takes the pool child too)."""

    def __init__(
        self, env: dict[str, str], log: Path, queues: str = "gpu,default", threads: int = 2
    ) -> None:
        self.log = log
        cmd = [
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
            "--pool",
            "prefork",
            "-n",
            f"test-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ]
        full_env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd,
            env=full_env,
            cwd=REPO,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.tail()}")
            return " ready." in self.log.read_text(errors="replace")

        wait_until(ready, timeout=timeout, what="worker ready", details=self.tail)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL if the worker is still busy after a minute,
        so a test's own failure is never hidden behind a stuck shutdown."""
        if self.proc.poll() is None:
            try:
                self.kill(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)


def wait_job(
    client: Any,
    job_id: int,
    *,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout: float = 300,
    worker: Worker | None = None,
    predicate: Any = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` until its status is in ``until`` (and ``predicate`` holds).
    Reads need a key: ``headers``, else the client's own, else the test services' bootstrap
    admin key."""
    from conftest import ADMIN_KEY

    auth = headers
    if auth is None:
        has_key = "authorization" in getattr(client, "headers", {})
        auth = {} if has_key else {"Authorization": f"Bearer {ADMIN_KEY}"}

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/jobs/{job_id}", headers=auth).json()
        done = job["status"] in until and (predicate is None or predicate(job))
        return job if done else None

    return wait_until(
        finished,
        timeout=timeout,
        interval=0.5,
        what=f"job {job_id} {'/'.join(until)}",
        details=(lambda: f"worker log:\n{worker.tail()}") if worker else None,
    )


def log_tail(log: Path, chars: int = 6000) -> str:
    """A server's log without the test's own polling lines, so the worker's output shows."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if '"GET /jobs/' not in ln]
    return "\n".join(lines)[-chars:]


def wait_serving(
    fn: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    log: Path,
    proc: subprocess.Popen | None = None,
) -> Any:
    """``wait_until`` for a server started by the test: ``fn`` may meet a server that is not
    listening yet; a server that exits ends the wait at once; a timeout shows its log."""

    def check() -> Any:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"protomed serve exited ({proc.returncode}):\n{log_tail(log)}")
        return fn()

    import httpx

    return wait_until(
        check,
        timeout=timeout,
        interval=0.5,
        what=what,
        ignore=(httpx.TransportError,),
        details=lambda: f"log:\n{log_tail(log)}",
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """``uvicorn api.main:app`` as a real HTTP server (Label Studio must reach it: webhooks)."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            cwd=REPO,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited:\n{self.log.read_text()[-3000:]}")
            return httpx.get(self.url + "/health", timeout=2).status_code == 200

        wait_until(
            up,
            timeout=timeout,
            what="API /health",
            ignore=(httpx.TransportError,),
            details=lambda: self.log.read_text()[-3000:],
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class TcpProxy:
    """A loopback TCP forwarder: stopping it makes the target unreachable to whoever was
    pointed at the proxy, as if that server were down, without touching the server itself."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import socket
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._socket, self._threading = socket, threading
        self._server: Any = None
        self._conns: list[Any] = []

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        import socketserver

        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = proxy._socket.create_connection(proxy.target, timeout=30)
                proxy._conns += [self.request, upstream]
                pipes = [
                    proxy._threading.Thread(target=_pipe, args=(self.request, upstream)),
                    proxy._threading.Thread(target=_pipe, args=(upstream, self.request)),
                ]
                for p in pipes:
                    p.start()
                for p in pipes:
                    p.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for c in self._conns:  # cut open keep-alive connections too
            try:
                c.shutdown(self._socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self._conns.clear()


def _pipe(src: Any, dst: Any) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(1)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie, or a pid that no longer exists, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Serve:
    """``protomed serve`` (``python -m protomed_cli serve``) in ``folder``, in its own session (so
    the test can signal its whole process group, as Ctrl-C in a terminal does), with the
    tests' tiny untrained encoder and no other PROTOMED_* settings from the environment."""

    def __init__(self, folder: Path, log: Path, **extra: str) -> None:
        self.folder, self.log, self.port = folder, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.family: list[int] = []  # its processes when it was ready (killed by close())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOMED_")}
        env |= {
            "PROTOMED_ENCODER": "protomed-tiny-vit",
            "PROTOMED_ENCODER_WEIGHTS": "untrained",
            "OMP_NUM_THREADS": "2",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
        cmd = [
            sys.executable,
            "-m",
            "protomed_cli",
            "serve",
            "--port",
            str(self.port),
            "--data-root",
            str(folder / "data"),
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=folder,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        """The log without the test's own polling lines, so the worker's output shows."""
        return log_tail(self.log, chars)

    def wait_ready(self, timeout: float = 300) -> None:
        """The API answers /ready and the worker has said it is ready."""
        import httpx

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited ({self.proc.returncode}):\n{self.tail()}")
            up = httpx.get(self.url + "/ready", timeout=5).status_code == 200
            return up and " ready." in self.text()

        wait_until(
            ready,
            timeout=timeout,
            interval=0.5,
            what="serve /ready and worker ready",
            ignore=(httpx.TransportError,),
            details=self.tail,
        )
        self.family = descendants(self.proc.pid)

    def signal(self, sig: int, *, group: bool = False) -> None:
        (os.killpg if group else os.kill)(self.proc.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"serve still running {timeout} s after the signal:\n{self.tail()}"
            ) from None

    def close(self) -> None:
        """Whatever the test did: nothing of this serve is left running."""
        pids = [self.proc.pid, *self.family, *descendants(self.proc.pid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def train_tiny(
    client: Any,
    headers: dict[str, str],
    dataset_id: int,
    worker: Worker,
    *,
    mode: str = "prototype",
    n_heldout: int = 8,
) -> dict[str, Any]:
    """A two-step cpu-small model of two toy classes (8 images each) trained by ``worker``
    through ``POST /jobs/train`` (its finished job): for tests that need a real checkpoint, not a
    good one."""
    body = {
        "dataset_id": dataset_id,
        "mode": mode,
        "preset": "cpu-small",
        "n_per_class": 8,
        "n_heldout": n_heldout,
        "classes": ["lymphocyte", "neutrophil"],
        "overrides": {"max_steps": 2, "batch_size": 4},
    }
    r = client.post("/jobs/train", json=body, headers=headers)
    assert r.status_code == 202, r.text
    trained = wait_job(client, r.json()["jobs"][0]["id"], worker=worker, headers=headers)
    assert trained["status"] == "succeeded", (trained, worker.tail())
    return trained
