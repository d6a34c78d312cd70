"""API request latency under a short loopback load, against a real ``uvicorn api.main:app``.

    .venv/bin/python -m bench.api_latency [--requests N --concurrency C] [--database sqlite|both]

The server runs as in production (one uvicorn worker process; PostgreSQL, Redis broker, local
storage) or, with ``--database sqlite``, on the embedded defaults (SQLite database and Celery's
SQLite broker). Each run gets a throw-away database, broker and storage folder, seeded with one
dataset and one ready model; no Celery worker runs, so queued sample jobs just wait in the broker
until it is flushed. Measured: ``GET /jobs/{id}`` (read path) and ``POST /generate`` (validate,
insert job + batch, publish to the broker). The client threads share the machine with the
server, so on few cores the figures include their contention. Results merge into the JSON file
by database, so one file can hold a PostgreSQL and a SQLite run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.provenance import run_info
from bench.testkit import tests_module  # the tests' migrate() and seed rows, shared with them

REPO = Path(__file__).resolve().parents[1]

ADMIN_KEY = "pm_bench-admin-key-0123456789"
CLASSES = ["basophil", "eosinophil", "lymphocyte"]  # as tests/seed.py
PG_ADMIN_URL = os.environ.get(
    "PROTOMED_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PROTOMED_BENCH_REDIS_URL", "redis://127.0.0.1:6379")


# --- throw-away backing services ---------------------------------------------------------------


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh ``protomed_bench_<rand>`` database, dropped (with any connections) afterwards."""
    import psycopg

    name = f"protomed_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_broker(db: int) -> Iterator[str]:
    """Redis database ``db``, flushed before and after: the unconsumed tasks are the only
    thing this benchmark leaves there."""
    import redis

    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def backing_env(database: str, tmp: Path, redis_db: int) -> Iterator[dict[str, str]]:
    """``PROTOMED_*`` settings pointing at fresh services for ``database``."""
    base = {
        "PROTOMED_STORAGE_BACKEND": "local",
        "PROTOMED_STORAGE_DIR": str(tmp / "storage"),
        "PROTOMED_WORK_DIR": str(tmp / "work"),
        "PROTOMED_DATA_ROOTS": json.dumps([str(tmp / "data")]),
        "PROTOMED_ADMIN_KEY": ADMIN_KEY,
    }
    if database == "sqlite":
        yield base | {
            "PROTOMED_DATABASE_URL": f"sqlite:///{tmp / 'protomed.db'}",
            "PROTOMED_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
        }
        return
    with postgres_database() as db_url, redis_broker(redis_db) as broker_url:
        yield base | {"PROTOMED_DATABASE_URL": db_url, "PROTOMED_BROKER_URL": broker_url}


def seed(url: str) -> dict[str, int]:
    """One dataset, one ready model and one queued sample job (with its batch) to read back."""
    from sqlalchemy.orm import Session

    from service.db.session import make_engine

    engine = make_engine(url)
    try:
        with Session(engine) as s:
            ids: dict[str, int] = tests_module("seed").seed_rows(s)  # the rows the API tests read
            return ids
    finally:
        engine.dispose()


# --- the server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def uvicorn_server(env: dict[str, str], log: Path) -> Iterator[str]:
    """``uvicorn api.main:app`` (one worker process) on a free loopback port, until /ready."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=os.environ | env, stdout=out, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, proc, log)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(
    base_url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    """Poll /ready (database, broker, storage) so the first measured request finds it warm."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/ready not 200 within {timeout} s:\n{log.read_text()}")


# --- load --------------------------------------------------------------------------------------

Send = Callable[[httpx.Client], httpx.Response]


@dataclass
class Endpoint:
    name: str
    send: Send
    expect: int


def endpoints(ids: dict[str, int]) -> list[Endpoint]:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    params: dict[str, str | int] = {"class": CLASSES[1], "n": 8, "dataset_id": ids["dataset"]}
    return [
        Endpoint("GET /jobs/{id}", lambda c: c.get(f"/jobs/{ids['job']}", headers=auth), 200),
        Endpoint(
            "POST /generate (n=8)",
            lambda c: c.post("/generate", params=params, headers=auth),
            202,
        ),
    ]


def run_load(base_url: str, ep: Endpoint, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` calls shared by ``concurrency`` threads, each with its own keep-alive client."""
    tickets = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def worker() -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while next(tickets) < requests:  # itertools.count is atomic under the GIL
                t0 = time.perf_counter()
                try:
                    status = str(ep.send(client).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                mine.append(time.perf_counter() - t0)
                if status != str(ep.expect):
                    with lock:
                        errors[status] = errors.get(status, 0) + 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarize(latencies, wall) | {"endpoint": ep.name, "errors": errors}


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summarize(latencies: list[float], wall: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    ms = {f"p{q}_ms": round(percentile(ordered, q) * 1000, 2) for q in (50, 90, 99)}
    return {
        "requests": len(ordered),
        **ms,
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 2),
        "throughput_rps": round(len(ordered) / wall, 1),
        "wall_s": round(wall, 2),
    }


# --- one run, reporting ------------------------------------------------------------------------


def bench(database: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fresh services, migrated and seeded, a server on them, then each endpoint in turn."""
    with (
        tempfile.TemporaryDirectory(prefix="protomed-bench-") as tmp_name,
        backing_env(database, Path(tmp_name), args.redis_db) as env,
    ):
        tmp = Path(tmp_name)
        (tmp / "data").mkdir()
        tests_module("conftest").migrate(env["PROTOMED_DATABASE_URL"])
        ids = seed(env["PROTOMED_DATABASE_URL"])
        with uvicorn_server(env, tmp / "uvicorn.log") as base_url:
            results = []
            for ep in endpoints(ids):
                run_load(base_url, ep, args.warmup, args.concurrency)  # connections, caches
                results.append(run_load(base_url, ep, args.requests, args.concurrency))
        broker = env["PROTOMED_BROKER_URL"].split(":", 1)[0]
    return {
        "database": database,
        "broker": "redis" if broker == "redis" else "sqlalchemy+sqlite",
        "storage": "local",
        "server": "uvicorn api.main:app --workers 1",
        "settings": {
            "requests": args.requests,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
        },
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "endpoints": results,
    }


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in ("fastapi", "uvicorn", "sqlalchemy", "celery")},
    }


def print_table(run: dict[str, Any]) -> None:
    print(f"\n{run['database']} + {run['broker']} broker, {run['settings']}")
    cols = ["p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_rps"]
    print(f"{'endpoint':<28}" + "".join(f"{c:>16}" for c in cols) + f"{'errors':>10}")
    for r in run["endpoints"]:
        errors = sum(r["errors"].values())
        print(f"{r['endpoint']:<28}" + "".join(f"{r[c]:>16}" for c in cols) + f"{errors:>10}")


def save(path: Path, runs: list[dict[str, Any]]) -> None:
    """Merge into ``path`` by database, so separate invocations can fill one file."""
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = old.get("runs", {}) | {r["database"]: r for r in runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "runs": merged}, indent=2) + "\n")
    print(f"\nwrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per endpoint")
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests per endpoint")
    p.add_argument("--database", choices=["postgresql", "sqlite", "both"], default="postgresql")
    p.add_argument("--redis-db", type=int, default=13, help="Redis database index (flushed)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "api_latency.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    databases = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
    runs = []
    for database in databases:
        runs.append({**bench(database, args), "run": run_info(args)})
        print_table(runs[-1])
    save(args.out, runs)


if __name__ == "__main__":
    main()
