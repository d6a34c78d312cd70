"""Data stays inside its roots: symbolic links in a dataset folder may not
lead the service to files outside the allowed data roots, at registration or when a job reads the
folder later; files that are no images are reported per file; sizes and overrides that would
exhaust the machine are refused naming the allowed range; review domains are checked.

Real SQLite database, local storage, image folders and (for the job) a real Celery worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Service
from factories import state, upload, zip_folder
from service_procs import Worker, wait_job

from ml.data.catalog import OutsideRootsError, scan
from ml.data.images import load_split
from ml.data.toy import TOY_CLASSES, write_toy_dataset

PASSWD = Path("/etc/passwd")


def without_threads_line(stderr: str) -> str:
    """The CLI's stderr less the line saying which threads a torch command chose."""
    return "".join(ln for ln in stderr.splitlines(True) if not ln.startswith("threads: "))


def _toy(service: Service, name: str = "toy", n: int = 3) -> Path:
    return write_toy_dataset(service.data_root / name, n_per_class=n, size=16, seed=0)


def _outside(service: Service) -> Path:
    """A folder of images outside every data root (beside them, in the test's temp dir)."""
    return write_toy_dataset(service.tmp / "outside", n_per_class=2, size=16, seed=1)


def _link_class_folder(service: Service, toy: Path) -> Path:
    link = toy / "stolen"
    link.symlink_to(_outside(service) / TOY_CLASSES[0], target_is_directory=True)
    return link


def _link_file_outside(service: Service, toy: Path) -> Path:
    link = toy / TOY_CLASSES[0] / "x.png"
    link.symlink_to(sorted((_outside(service) / TOY_CLASSES[1]).glob("*.png"))[0])
    return link


def _link_passwd(service: Service, toy: Path) -> Path:
    link = toy / TOY_CLASSES[0] / "passwd.png"
    link.symlink_to(PASSWD)
    return link


LINKS = {"class-folder": _link_class_folder, "file": _link_file_outside, "passwd": _link_passwd}


@pytest.mark.parametrize("kind", sorted(LINKS))
def test_registration_refuses_links_leaving_the_roots(service: Service, kind: str) -> None:
    toy = _toy(service)
    link = LINKS[kind](service, toy)
    before = state(service)
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "outside the allowed data roots" in detail and str(link) in detail, detail
    assert str(service.data_root.resolve()) in detail  # names what is allowed
    assert "links that stay inside the allowed roots are followed" in detail
    assert state(service) == before


def test_links_inside_the_roots_are_followed(service: Service) -> None:
    toy = _toy(service)
    other = write_toy_dataset(service.data_root / "other", n_per_class=2, size=16, seed=2)
    (toy / "linked").symlink_to(other / TOY_CLASSES[0], target_is_directory=True)
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 201, r.text
    assert r.json()["counts"]["linked"] == 2


def test_non_images_are_reported_per_file_and_not_counted(service: Service) -> None:
    toy = _toy(service)
    (toy / TOY_CLASSES[0] / "notes.png").write_text("not an image\n")
    (toy / TOY_CLASSES[1] / "empty.jpg").write_bytes(b"")
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["counts"] == dict.fromkeys(TOY_CLASSES, 3)
    skipped = {s["path"]: s["reason"] for s in out["skipped"]}
    assert set(skipped) == {f"{TOY_CLASSES[0]}/notes.png", f"{TOY_CLASSES[1]}/empty.jpg"}
    assert all("not an image" in reason for reason in skipped.values())
    # the loaders report them too, per file, beside corrupt images
    split = load_split(toy, image_size=16)
    assert {Path(p).name for p, _ in split.skipped} == {"notes.png", "empty.jpg"}


def test_core_loader_takes_the_roots_as_a_parameter(tmp_path: Path) -> None:
    """ml/ knows nothing of the service: the allowed roots are an argument, by default the
    dataset folder itself (the CLI)."""
    data = write_toy_dataset(tmp_path / "data" / "toy", n_per_class=2, size=16, seed=0)
    (data / TOY_CLASSES[0] / "passwd.png").symlink_to(PASSWD)
    with pytest.raises(OutsideRootsError, match=r"passwd\.png -> /etc/passwd"):
        scan(data)
    with pytest.raises(OutsideRootsError):
        load_split(data, roots=[tmp_path / "data"])
    (data / TOY_CLASSES[0] / "passwd.png").unlink()
    sibling = write_toy_dataset(tmp_path / "data" / "sib", n_per_class=2, size=16, seed=1)
    (data / "sib").symlink_to(sibling / TOY_CLASSES[0], target_is_directory=True)
    with pytest.raises(OutsideRootsError):
        scan(data)  # the dataset folder alone does not hold the link's target
    assert scan(data, roots=[tmp_path / "data"]).counts()["sib"] == 2


def test_cli_refuses_a_link_to_etc_passwd(tmp_path: Path) -> None:
    data = write_toy_dataset(tmp_path / "toy", n_per_class=2, size=16, seed=0)
    (data / TOY_CLASSES[0] / "passwd.png").symlink_to(PASSWD)
    cmd = [
        sys.executable,
        "-m",
        "ml.cli",
        "prototypes",
        str(data),
        "--out",
        str(tmp_path / "cb"),
        "--untrained",
        "--encoder",
        "protomed-tiny-vit",
        "--n-per-class",
        "1",
        "--heldout",
        "0",
        "--image-size",
        "16",
        "--no-cache",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 2, r.stderr
    said = without_threads_line(r.stderr)
    assert said.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "passwd.png -> /etc/passwd" in r.stderr and "--allow-root" not in r.stdout


def test_job_fails_when_the_folder_gains_a_link_after_registration(service: Service) -> None:
    toy = _toy(service, n=3)
    r = service.client.post("/datasets", json={"name": "t", "path": "toy"}, headers=service.admin)
    assert r.status_code == 201, r.text
    _link_passwd(service, toy)  # after registration: the worker must check again
    body = {
        "dataset_id": r.json()["id"],
        "mode": "baseline",
        "preset": "tiny",
        "n_per_class": 2,
        "n_heldout": 0,
        "overrides": {"max_steps": 1},
    }
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobs"][0]["id"]
    worker = Worker(service.env, service.tmp / "worker.log")
    try:
        worker.wait_ready()
        job = wait_job(service.client, job_id, timeout=600, worker=worker)
    finally:
        worker.kill()  # SIGKILL: its graceful shutdown is not what this test is about
    assert job["status"] == "failed", job
    assert "OutsideRootsError" in job["error"] and "passwd.png -> /etc/passwd" in job["error"]
    model = service.client.get(f"/models/{job['model_id']}", headers=service.admin).json()
    assert model["status"] == "failed"


# --- bounds that protect the machine -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({"overrides": {"batch_size": 1e9}}, ["batch_size", "1 <= batch_size <= 1024"]),
        ({"overrides": {"base_channels": 100000}}, ["base_channels", "8 <= base_channels <= 512"]),
        ({"n_per_class": 100000}, ["1 <= n_per_class <= 10000"]),
        ({"n_heldout": 100000}, ["0 <= n_heldout <= 10000"]),
        ({"overrides": {"epochs": 10**9}}, ["epochs", "<= 100000"]),
        ({"overrides": {"max_steps": 10**12}}, ["max_steps", "<= 10000000"]),
        ({"overrides": {"timesteps": 10**7}}, ["timesteps", "10 <= timesteps <= 10000"]),
        ({"overrides": {"num_res_blocks": 1000}}, ["num_res_blocks", "<= 8"]),
        ({"overrides": {"channel_mults": [1, 2, 4, 8, 16, 32, 64]}}, ["1 to 6 items"]),
        ({"overrides": {"channel_mults": [1, 1000]}}, ["1 <= each item <= 16"]),
        ({"overrides": {"class_dim": 10**6}}, ["class_dim", "<= 4096"]),
        ({"overrides": {"checkpoint_every": 0}}, ["checkpoint_every", "1 <= checkpoint_every"]),
        ({"overrides": {"seed": -1}}, ["seed", "0 <= seed"]),
    ],
)
def test_training_sizes_are_bounded(service: Service, extra: dict, needles: list[str]) -> None:
    toy = _toy(service)
    r = service.client.post(
        "/datasets", json={"name": "t", "path": toy.name}, headers=service.admin
    )
    assert r.status_code == 201, r.text
    body = {"dataset_id": r.json()["id"], "mode": "both", "preset": "cpu-small", **extra}
    r = service.client.post("/jobs/train", json=body, headers=service.admin)
    assert r.status_code == 422, r.text
    detail = json.dumps(r.json()["detail"])
    for needle in needles:
        assert needle in detail, detail
    assert service.client.get("/jobs", headers=service.admin).json() == []


def test_cli_set_gets_the_same_bounds(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ml.cli",
        "train",
        "--mode",
        "baseline",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--set",
        "batch_size=1000000000",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    said = without_threads_line(r.stderr)
    assert said.startswith("error: ") and "1 <= batch_size <= 1024" in said, r.stderr


def test_generate_and_evaluate_sizes_are_bounded(service: Service) -> None:
    r = service.client.post("/generate", params={"class": "a", "n": 10**6}, headers=service.admin)
    assert r.status_code == 422 and "between 1 and 1000" in r.text, r.text
    body = {"baseline_model_id": 1, "prototype_model_id": 2, "n_per_class": 10**6}
    r = service.client.post("/jobs/evaluate", json=body, headers=service.admin)
    assert r.status_code == 422 and "n_per_class" in r.text, r.text


# --- review domains ------------------------------------------------------------------------------


def test_unknown_domain_is_refused_listing_the_known_ones(service: Service) -> None:
    _toy(service)
    before = state(service)
    body = {"name": "t", "path": "toy", "domain": "derm"}
    r = service.client.post("/datasets", json=body, headers=service.admin)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "unknown review domain 'derm'" in detail
    for known in ("blood", "bone-marrow", "dermatoscopy", "toy"):
        assert known in detail, detail
    assert state(service) == before
    data = zip_folder(service.data_root / "toy", service.tmp / "toy.zip").read_bytes()
    r = upload(service, "up", data, domain="derm")
    assert r.status_code == 422 and "unknown review domain 'derm'" in r.text, r.text
    assert state(service) == before
    ok = service.client.post(
        "/datasets", json={**body, "domain": "dermatoscopy"}, headers=service.admin
    )
    assert ok.status_code == 201, ok.text


def test_a_file_swapped_for_a_link_after_the_scan_is_not_read(tmp_path: Path) -> None:
    """The loaders check each file again right before opening it."""
    import ml.data.images

    data = write_toy_dataset(tmp_path / "toy", n_per_class=2, size=16, seed=0)
    real_scan = ml.data.images.scan

    def scan_then_swap(*args, **kwargs):
        cat = real_scan(*args, **kwargs)
        victim = cat.items[TOY_CLASSES[0]][0]
        victim.unlink()
        victim.symlink_to(PASSWD)
        return cat

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ml.data.images, "scan", scan_then_swap)
        with pytest.raises(OutsideRootsError, match="/etc/passwd"):
            load_split(data, image_size=16)
