"""Works offline, by default: nothing in the CLI or the service tries the
network, missing encoder weights fail at once with one clear line (CLI) or a 422 (API), serve's
embedded defaults train on a machine without weights, and /docs and /redoc need no CDN.

Network access is observed, not just prevented: the subprocesses run with a ``sitecustomize``
that records (and refuses) every DNS lookup and connection to a non-loopback address, in the
process and every Python process it starts. HF_HUB_OFFLINE is removed from their environment
(conftest sets it for the test process) so the product must set offline mode itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import REPO, Service, fake_hub_cache
from service_procs import ApiServer, free_port, wait_serving

from ml.data.toy import write_toy_dataset

GUARD = """
import os, socket

_LOG = os.environ["PROTOMED_TEST_NET_LOG"]
_LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0", "")


def _record(what):
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(101, "network is unreachable (protomed offline test)")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, \\
    socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _record(f"connect {address}")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _record(f"connect_ex {address}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL and host is not None:
        _record(f"getaddrinfo {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, \\
    getaddrinfo
"""


def offline_env(tmp: Path) -> tuple[dict[str, str], Path]:
    """Environment for a subprocess with the network guard, an empty hub cache and no
    offline flags or protomed settings of the caller; returns it and the attempts log."""
    guard = tmp / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp / "net-attempts.log"
    drop = ("PROTOMED_", "HF_", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env |= {
        "PYTHONPATH": f"{guard}{os.pathsep}{REPO}",
        "PROTOMED_TEST_NET_LOG": str(log),
        "HF_HOME": str(tmp / "hf-home"),  # empty: no weights on this "machine"
        "HOME": str(tmp / "home"),  # open_clip's URL cache (~/.cache/clip) empty too
        "OMP_NUM_THREADS": "2",
    }
    return env, log


def attempts(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_the_guard_records_network_attempts(tmp_path: Path) -> None:
    """The probe works: a plain connection attempt is recorded and refused."""
    env, log = offline_env(tmp_path)
    code = "import socket; socket.create_connection(('192.0.2.1', 443), timeout=1)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "192.0.2.1" in attempts(log)


def _prototypes(tmp: Path, data: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "protomed_cli",
        "prototypes",
        str(data),
        "--out",
        str(tmp / "cb"),
        "--encoder",
        "ViT-L-14",
        "--pretrained",
        "openai",
    ]
    return subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)


def test_cli_missing_weights_fail_at_once_without_network(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "toy", n_per_class=2, size=16, seed=0)
    env, log = offline_env(tmp_path)
    r = _prototypes(tmp_path, data, env)
    assert r.returncode == 2, r.stderr
    # the one line besides the error is what threads the command chose (ml.runtime)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("threads: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr  # no warnings, no retries
    assert "--untrained" in lines[0] and "--pretrained PATH" in lines[0], lines[0]
    assert "ViT-L-14" in lines[0] and "openai" in lines[0]
    assert attempts(log) == ""
    assert not (tmp_path / "cb").exists()


def test_cli_checks_the_folder_before_the_encoder(tmp_path: Path) -> None:
    env, log = offline_env(tmp_path)
    r = _prototypes(tmp_path, tmp_path / "no-such-folder", env)
    assert r.returncode == 2, r.stderr
    # the one line besides the error is what threads the command chose (ml.runtime)
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("threads: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "no-such-folder does not exist" in lines[0], lines[0]
    assert attempts(log) == ""


def test_weights_are_found_without_torch(tmp_path: Path) -> None:
    """The API's check imports neither torch nor open_clip, and maps a tag to the file open_clip
    would load from the hub cache (ViT-L-14 openai: timm/vit_large_patch14_clip_224.openai)."""
    env, log = offline_env(tmp_path)
    hub = tmp_path / "hf-home" / "hub"
    fake_hub_cache(hub, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    code = (
        "import sys, api.main, ml.prototypes.weights as w\n"
        "found = w.find_weights('ViT-L-14', 'openai')\n"
        "print(found.kind, found.path)\n"
        "try:\n    w.find_weights('ViT-B-16', 'openai')\nexcept ValueError as e:\n    print(e)\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, 'heavy import'\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first.startswith("tag ") and first.endswith("open_clip_model.safetensors")
    assert "no local weights for ViT-B-16 'openai'" in second and "--untrained" in second
    assert attempts(log) == ""


def test_pretrained_table_matches_open_clip() -> None:
    """The torch-free reading of open_clip's tags agrees with open_clip for every pair."""
    import open_clip

    from ml.prototypes.weights import _pretrained_table

    table = _pretrained_table()
    pairs = open_clip.list_pretrained()
    assert len(pairs) > 100
    for model, tag in pairs:
        ours, theirs = table[model][tag], open_clip.get_pretrained_cfg(model, tag)
        for key, empty in (("hf_hub", ""), ("url", ""), ("quick_gelu", False)):
            assert ours.get(key, empty) == theirs.get(key, empty), (model, tag, key)


def test_train_request_without_weights_is_422(service: Service, monkeypatch) -> None:
    write_toy_dataset(service.data_root / "toy", n_per_class=3, size=16, seed=0)
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 201, r.text
    hub = service.tmp / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("PROTOMED_ENCODER", "ViT-L-14")
    monkeypatch.setenv("PROTOMED_ENCODER_WEIGHTS", "openai")
    from service.config import get_settings

    get_settings.cache_clear()
    body = {
        "dataset_id": r.json()["id"],
        "mode": "both",
        "preset": "tiny",
        "n_per_class": 2,
        "n_heldout": 0,
    }
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for needle in (
        "PROTOMED_ENCODER_WEIGHTS",
        "PROTOMED_ENCODER=ViT-L-14",
        "untrained",
        "hub cache",
    ):
        assert needle in detail, detail
    assert service.client.get("/jobs", headers=service.admin).json() == []
    # the file open_clip would load, in the hub cache: accepted
    fake_hub_cache(hub, "timm/vit_large_patch14_clip_224.openai", "open_clip_pytorch_model.bin")
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    # a local file that is not there, then "untrained"
    monkeypatch.setenv("PROTOMED_ENCODER_WEIGHTS", str(service.tmp / "missing.pt"))
    get_settings.cache_clear()
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 422 and "checkpoint file not found" in r.json()["detail"], r.text
    monkeypatch.setenv("PROTOMED_ENCODER_WEIGHTS", "untrained")
    get_settings.cache_clear()
    assert service.client.post("/jobs/train", json=body, headers=service.admin).status_code == 202


@pytest.mark.slow
def test_serve_defaults_train_offline_with_a_learned_encoder(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path / "data" / "toy", n_per_class=2, size=16, seed=0)
    env, net = offline_env(tmp_path)
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "protomed_cli",
        "serve",
        "--port",
        str(port),
        "--data-root",
        str(tmp_path / "data"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_serving(lambda: http.get("/ready").status_code == 200, 300, "not ready", log, proc)
            out = log.read_text()
            assert re.search(r"encoder: UNTRAINED ViT-B-32 \(random weights", out), out
            assert "PROTOMED_ENCODER_WEIGHTS" in out and "PROTOMED_ENCODER=" in out
            assert "prototype encoder: LEARNED from each dataset" in out, out
            key = (tmp_path / ".protomed-admin-key").read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}
            r = http.post("/datasets", json={"name": "toy", "path": "toy"}, headers=auth)
            assert r.status_code == 201, r.text
            body = {
                "dataset_id": r.json()["id"],
                "mode": "prototype",
                "preset": "tiny",
                "n_per_class": 2,
                "n_heldout": 0,
                "overrides": {"max_steps": 1},
            }
            r = http.post("/jobs/train", json=body, headers=auth)
            assert r.status_code == 202, r.text
            job_id = r.json()["jobs"][0]["id"]

            def done() -> dict | None:
                job = http.get(f"/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_serving(done, 600, "training did not finish", log, proc)
            assert job["status"] == "succeeded", job
        # The prototypes came from the learned encoder: the worker never built the untrained one.
        assert "UNTRAINED encoder (ViT-B-32" not in log.read_text()
        books = list(tmp_path.rglob("codebook.json"))
        assert books and all(
            json.loads(b.read_text())["encoder"].startswith("learned:") for b in books
        ), books
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # serve and its worker (one process group)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert attempts(net) == "", attempts(net)


def test_docs_and_redoc_need_no_cdn(service: Service) -> None:
    for page in ("/docs", "/redoc"):
        r = service.client.get(page)
        assert r.status_code == 200
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text) + re.findall(r"url: '([^']+)'", r.text)
        assert urls, r.text
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), (page, url)
            got = service.client.get(url)
            assert got.status_code == 200 and len(got.content) > 100, (page, url)
        assert "cdn" not in r.text.lower() and "googleapis" not in r.text


def test_docs_render_in_a_browser_without_internet(service: Service, tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import sync_playwright

    server = ApiServer(service.env, tmp_path / "api.log")
    outside: list[str] = []

    def only_local(route) -> None:
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        server.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(server.url + "/docs")
            page.wait_for_selector('[data-path="/jobs/train"]', timeout=60_000)
            assert page.locator(".opblock").count() > 10
            assert outside == []  # Swagger UI: nothing from outside at all
            page.goto(server.url + "/redoc")
            page.wait_for_selector("h2:has-text('Register Folder')", timeout=60_000)
            browser.close()
    finally:
        server.stop()
    # ReDoc's bundle links its vendor's logo (a decoration in the sidebar) from its CDN; that
    # request fails offline and the page works without it
    assert [u for u in outside if not u.startswith("https://cdn.redoc.ly/redoc/logo")] == []
