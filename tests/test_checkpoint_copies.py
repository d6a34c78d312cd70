"""A trained model's checkpoint is on disk once on a machine with local storage: the run
folder's ``last.pt`` (kept so a re-run resumes), the stored object (what the model's download
serves) and the sampling worker's local copy share one inode. Resuming still works and never
changes the stored model; where no link can be made, plain copies are made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_train import random_set

from ml.config import make_config
from ml.diffusion.train import train
from ml.models.checkpoint import load_model
from service.storage import LocalStorage
from workers.sampling import local_checkpoint
from workers.training import _upload


def _train_and_store(tmp_path: Path) -> tuple[Path, LocalStorage, str, Path]:
    """A one-step model trained into its worker run folder, uploaded, fetched for sampling."""
    work = tmp_path / "work"
    run_dir = work / "models" / "1"
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1, "batch_size": 4})
    train(cfg, random_set(), run_dir, show_progress=False)
    (run_dir / "codebook").mkdir()
    (run_dir / "codebook" / "codebook.json").write_text("{}")
    storage = LocalStorage(tmp_path / "storage")
    key = _upload(1, run_dir, storage)["checkpoint"]
    local = local_checkpoint(key, 1, storage, work)
    return run_dir, storage, key, local


def _files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("*.pt"))


def test_a_trained_checkpoint_is_on_disk_once(tmp_path: Path) -> None:
    run_dir, storage, key, local = _train_and_store(tmp_path)
    files = _files(tmp_path)
    assert len(files) == 3, files  # last.pt, the stored object, the sampler's checkpoint.pt
    assert len({(p.stat().st_dev, p.stat().st_ino) for p in files}) == 1, "one full copy"
    stored = b"".join(storage.open_stream(key))
    assert stored == (run_dir / "last.pt").read_bytes() == local.read_bytes()

    # a re-run resumes from last.pt; the stored model and the sampler's copy keep their bytes
    more = make_config("tiny", {"mode": "baseline", "max_steps": 2, "batch_size": 4})
    train(more, random_set(), run_dir, resume=run_dir / "last.pt", show_progress=False)
    assert load_model(run_dir / "last.pt").step == 2
    assert b"".join(storage.open_stream(key)) == stored == local.read_bytes()
    assert load_model(local).step == 1


def test_without_links_the_copies_are_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*_args: object, **_kwargs: object) -> None:
        raise OSError("no hard links on this filesystem")

    monkeypatch.setattr(os, "link", no_links)
    run_dir, storage, key, local = _train_and_store(tmp_path)
    files = _files(tmp_path)
    assert len({(p.stat().st_dev, p.stat().st_ino) for p in files}) == 3
    assert b"".join(storage.open_stream(key)) == (run_dir / "last.pt").read_bytes()
    assert local.read_bytes() == (run_dir / "last.pt").read_bytes()
    assert all(p.stat().st_mode & 0o644 == 0o644 for p in files)
