"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis).

Every operation gets generated valid and invalid requests, sent with the admin key so writes run
their validation and database code instead of stopping at 401. The database is seeded with a
dataset, a ready model, a queued job and a stored one-image batch so small generated ids reach
real rows. Whatever is sent, the answer must never be a 5xx: on SQLite (the embedded default)
and on PostgreSQL (production; its 32-bit INTEGER columns reject ids SQLite accepts). A second
test pins the public interface clients and docs rely on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import ADMIN_KEY, fresh_postgres, migrate, reset_service_caches, service_env
from factories import seed_rows
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from api.main import bootstrap, create_app

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # served as stored; the API never decodes it


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Service settings shared by all fuzz cases of one database (one app, one database: the
    function-scoped ``service`` fixture would rebuild both for every generated request)."""
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    (tmp / "data").mkdir()
    # Only the empty temp root: a fuzzed folder name must never start a scan of the real data.
    extra = {"PROTOMED_DATA_ROOTS": json.dumps([str(tmp / "data")])}
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "postgresql":
            extra["PROTOMED_DATABASE_URL"] = request.getfixturevalue("_module_pg_url")
        env = service_env(tmp, **extra)
        for k, v in env.items():
            mp.setenv(k, v)
        reset_service_caches()
        migrate(env["PROTOMED_DATABASE_URL"])
        yield env
    reset_service_caches()


@pytest.fixture(scope="module")
def _module_pg_url() -> Iterator[str]:
    with fresh_postgres() as url:
        yield url


def seed() -> dict[str, int]:
    """The shared seed rows, with one image really in storage."""
    from service.db.session import get_sessionmaker
    from service.storage import get_storage

    key = "batches/seed/0000.png"
    get_storage().put_bytes(key, PNG, "image/png")
    with get_sessionmaker()() as s:
        return seed_rows(s, image_key=key, png=PNG)


# The document is static: loading it needs no settings or database. The app that answers is
# built per database (``fuzz_app``) once the environment points at the temporary service.
# (``schemathesis.pytest.from_fixture`` would do both in a fixture, but schemathesis 4.32 sets
# ``Function._nodeid``, which pytest 9 does not have.)
schema = schemathesis.openapi.from_dict(create_app().openapi())


@pytest.fixture(scope="module")
def fuzz_app(fuzz_env: dict[str, str]) -> FastAPI:
    """A seeded app on the module's database, with the bootstrap admin key in place."""
    bootstrap()
    seed()
    return create_app()


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to .hypothesis/; derandomized runs repeat anyway
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors(case: Any, fuzz_app: FastAPI) -> None:
    response = case.call(headers=ADMIN, app=fuzz_app)
    case.validate_response(response, checks=[not_a_server_error])


# --- the documented interface ------------------------------------------------------------------

PUBLIC = [
    ("post", "/jobs/train"),
    ("post", "/generate"),
    ("get", "/jobs/{job_id}"),
    ("post", "/jobs/{job_id}/cancel"),
    ("get", "/models"),
    ("get", "/batches/{batch_id}"),
    ("get", "/batches/{batch_id}/zip"),
    ("get", "/images/{image_id}"),
    ("post", "/datasets"),
    ("post", "/datasets/upload"),
    ("get", "/health"),
    ("get", "/ready"),
]
WRITE_METHODS = {"post", "put", "patch", "delete"}


def test_spec_lists_public_interface() -> None:
    spec = create_app().openapi()
    paths = spec["paths"]
    missing = [f"{m.upper()} {p}" for m, p in PUBLIC if m not in paths.get(p, {})]
    assert not missing, f"not in the OpenAPI document: {missing}"
    generate = paths["/generate"]["post"]
    params = {p["name"]: p for p in generate["parameters"]}
    assert params["class"]["in"] == "query"  # or in the JSON body: one of the two is required
    body = generate["requestBody"]["content"]["application/json"]["schema"]["anyOf"][0]["$ref"]
    assert "class" in spec["components"]["schemas"][body.rsplit("/", 1)[-1]]["required"]
    schemes = spec["components"]["securitySchemes"]
    bearer = {name for name, s in schemes.items() if s.get("scheme", "").lower() == "bearer"}
    assert bearer, f"no bearer scheme among {sorted(schemes)}"
    writes = [(m, p, op) for p, ops in paths.items() for m, op in ops.items() if m in WRITE_METHODS]
    # Label Studio's webhook proves itself with a shared secret header, not an API key.
    unsecured = [
        f"{m.upper()} {p}"
        for m, p, op in writes
        if not any(bearer & set(req) for req in op.get("security", [])) and p != "/reviews/webhook"
    ]
    assert not unsecured, f"write operations without the bearer scheme: {unsecured}"
    # Reads need a key too, but for liveness and review images (their token is the capability).
    open_reads = {"/health", "/ready", "/review-images/{token}"}
    unsecured_reads = [
        p
        for p, ops in paths.items()
        if "get" in ops
        and p not in open_reads
        and not any(bearer & set(req) for req in ops["get"].get("security", []))
    ]
    assert not unsecured_reads, f"reads without the bearer scheme: {unsecured_reads}"
