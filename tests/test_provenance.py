"""Every generated PNG carries its provenance (IPTC trainedAlgorithmicMedia in XMP, checkpoint
hash, class, seed, sampler...), enough to draw the same pixels again; review copies drop it."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import random_set

from ml.config import SampleConfig, make_config
from ml.diffusion.provenance import (
    DIGITAL_SOURCE_TYPE,
    XMP_KEY,
    file_sha256,
    read_provenance,
    source_type,
)
from ml.diffusion.sample import regenerate, sample_to_folder
from ml.diffusion.train import train
from ml.models.checkpoint import load_model
from service.blinding import blind_png


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 2, "batch_size": 4})
    train(cfg, random_set(), out, show_progress=False)
    loaded = load_model(out)
    for p in loaded.model.parameters():  # an untrained model draws near-constant images
        p.data.add_(0.05 * torch.randn_like(p))
    torch.save(
        {
            **torch.load(loaded.path, weights_only=False),
            "ema": None,
            "model": loaded.model.state_dict(),
        },
        loaded.path,
    )
    return out


def pixels(path_or_bytes: Path | bytes) -> np.ndarray:
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(src).convert("RGB"))


def test_each_png_says_it_is_synthetic_and_regenerates_exactly(run: Path, tmp_path: Path) -> None:
    # the stochastic sampler, in batches of 2: image 3 sits in the second batch
    scfg = SampleConfig(scheduler="dpm++sde", steps=4, seed=7, batch_size=2, precision="fp32")
    loaded = load_model(run)
    res = sample_to_folder(loaded, tmp_path / "out", 5, scfg, ["c1"])
    path = tmp_path / "out" / "c1" / "c1_0003.png"
    packet = Image.open(path).info[XMP_KEY]
    assert source_type(packet) == DIGITAL_SOURCE_TYPE
    record = read_provenance(path)
    assert record is not None
    assert (record.class_name, record.index, record.n, record.seed) == ("c1", 3, 5, 7)
    assert (record.scheduler, record.steps, record.guidance, record.mode) == (
        "dpm++sde",
        4,
        2.0,
        "baseline",
    )
    assert record.checkpoint_sha256 == file_sha256(loaded.path)
    rows = list(csv.DictReader(res.manifest.read_text().splitlines()))
    assert {r["checkpoint_sha256"] for r in rows} == {record.checkpoint_sha256}

    again = regenerate(run, record)  # from the file's record alone, one image, batch of 1
    assert np.array_equal(again.permute(1, 2, 0).numpy(), pixels(path))
    others = [pixels(tmp_path / "out" / "c1" / f"c1_{i:04d}.png") for i in (0, 1, 2, 4)]
    assert not any(np.array_equal(pixels(path), o) for o in others)  # a real check

    other = tmp_path / "other"  # a different checkpoint cannot pass for the record's
    shutil.copytree(run, other)
    ckpt = torch.load(other / "last.pt", weights_only=False)
    ckpt["step"] += 1
    torch.save(ckpt, other / "last.pt")
    with pytest.raises(ValueError, match="made by checkpoint sha256"):
        regenerate(other, record)


def test_review_copies_carry_no_provenance(run: Path, tmp_path: Path) -> None:
    """Blinding: the record names the mode; the copy a reviewer sees must not carry it."""
    scfg = SampleConfig(steps=2, seed=1, precision="fp32")
    sample_to_folder(load_model(run), tmp_path / "out", 1, scfg, ["c0"])
    stored = (tmp_path / "out" / "c0" / "c0_0000.png").read_bytes()
    assert read_provenance(stored) is not None and b"iTXt" in stored
    copy = blind_png(stored, "token")
    assert read_provenance(copy) is None and b"iTXt" not in copy and b"baseline" not in copy
    assert np.array_equal(pixels(copy), pixels(stored))
