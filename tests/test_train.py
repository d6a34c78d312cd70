"""Training loop: exact resume, determinism, checkpoints, cancellation, DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.config import SampleConfig, make_config
from ml.data.images import ImageSet
from ml.diffusion.sample import generate, sample_to_folder
from ml.diffusion.train import Progress, TrainingCancelled, train
from ml.errors import NotFound
from ml.models.checkpoint import load_model, read_checkpoint

HERE = Path(__file__).parent


def random_set(n: int = 24, size: int = 16, classes: int = 3, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    names = [f"c{i}" for i in range(classes)]
    return ImageSet(
        images, labels, names, [f"x{i}.png" for i in range(n)], [str(i) for i in range(n)]
    )


def losses_of(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_next_loss_as_uninterrupted(tmp_path):
    data = random_set()
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 6, "batch_size": 4})
    train(cfg, data, tmp_path / "full", show_progress=False)
    full = losses_of(tmp_path / "full")

    half = cfg.model_copy(update={"max_steps": 3})
    train(half, data, tmp_path / "part", show_progress=False)
    assert read_checkpoint(tmp_path / "part" / "last.pt")["step"] == 3
    train(cfg, data, tmp_path / "part", resume=tmp_path / "part" / "last.pt", show_progress=False)
    resumed = losses_of(tmp_path / "part")
    assert len(resumed) == 6
    assert resumed == full, "a resumed run must continue exactly as an uninterrupted one"
    a = read_checkpoint(tmp_path / "full" / "last.pt")
    b = read_checkpoint(tmp_path / "part" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_same_seed_same_images_and_independent_of_batch_size(tmp_path):
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 2, "batch_size": 4})
    train(cfg, random_set(), tmp_path, show_progress=False)
    loaded = load_model(tmp_path)
    for p in loaded.model.parameters():  # make the output depend on the weights visibly
        p.data.add_(0.01 * torch.randn_like(p))
    scfg = SampleConfig(steps=5, seed=7, batch_size=8, precision="fp32")
    a = generate(loaded, "c1", 5, scfg)
    b = generate(loaded, "c1", 5, scfg.model_copy(update={"batch_size": 2}))
    c = generate(loaded, "c1", 5, scfg.model_copy(update={"seed": 8}))
    d = generate(loaded, "c1", 5, scfg.model_copy(update={"channels_last": False}))
    e = generate(loaded, "c1", 5, scfg.model_copy(update={"precision": "bf16"}))
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a.int() - d.int()).abs().max() <= 1  # NHWC is a speed choice, not another image
    # bf16 autocast (the default where the hardware has it) moves pixels by a few levels at most
    assert (a.float() - e.float()).abs().mean() < 1.5


def test_stochastic_sampler_is_seeded_per_image(tmp_path):
    """SDE-DPM-Solver++ draws fresh noise at every step, from one generator per image: the
    same seed gives the same images whatever the batch size, another seed other images."""
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 2, "batch_size": 4})
    train(cfg, random_set(), tmp_path, show_progress=False)
    loaded = load_model(tmp_path)
    for p in loaded.model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    scfg = SampleConfig(scheduler="dpm++sde", steps=6, seed=3, batch_size=8, precision="fp32")
    assert SampleConfig().scheduler == "dpm++sde" and SampleConfig().steps == 20
    assert SampleConfig(scheduler="ddim").steps == 50
    a = generate(loaded, "c0", 5, scfg)
    b = generate(loaded, "c0", 5, scfg.model_copy(update={"batch_size": 2}))
    c = generate(loaded, "c0", 5, scfg.model_copy(update={"seed": 4}))
    ode = generate(loaded, "c0", 5, scfg.model_copy(update={"scheduler": "dpm++"}))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, ode)  # the SDE really injects noise


def test_sample_writes_pngs_and_manifest(tmp_path):
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1})
    train(cfg, random_set(), tmp_path / "run", show_progress=False)
    loaded = load_model(tmp_path / "run")
    res = sample_to_folder(loaded, tmp_path / "out", 2, SampleConfig(steps=3), ["c0", "c2"])
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in res.files) == [
        "c0/c0_0000.png",
        "c0/c0_0001.png",
        "c2/c2_0000.png",
        "c2/c2_0001.png",
    ]
    rows = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert rows[0].startswith("file,class,index,seed,image_seed,model,step,mode,guidance,steps")
    assert len(rows) == 5 and ",baseline,2.0,3,dpm++sde," in rows[1]
    with pytest.raises(ValueError, match="unknown class 'zz'; this model knows: c0, c1, c2"):
        sample_to_folder(loaded, tmp_path / "bad", 1, SampleConfig(steps=2), ["zz"])
    assert not (tmp_path / "bad").exists(), "nothing is written before the classes are checked"


def test_bf16_autocast_path_trains(tmp_path):
    """Forced bf16 (native on GPUs and AMX/AVX512-BF16 CPUs, emulated elsewhere) still learns."""
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 2, "precision": "bf16"})
    result = train(cfg, random_set(), tmp_path, show_progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.dtype == torch.float32 for p in result.model.parameters()), "master weights fp32"


def test_progress_callback_and_cancel_checkpoints(tmp_path):
    seen: list[Progress] = []

    def cb(p: Progress) -> None:
        seen.append(p)
        if p.step == 2:
            raise TrainingCancelled

    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 10})
    with pytest.raises(TrainingCancelled):
        train(cfg, random_set(), tmp_path, progress=cb, show_progress=False)
    assert [p.step for p in seen] == [1, 2] and seen[0].total_steps == 10
    assert seen[1].eta_s >= 0 and seen[1].loss > 0
    assert read_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_wrong_image_size_is_a_clear_error(tmp_path):
    cfg = make_config("tiny", {"mode": "baseline"})
    with pytest.raises(ValueError, match="images are 32px but the model is 16px"):
        train(cfg, random_set(size=32), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="prototype mode needs a codebook"):
        train(cfg.model_copy(update={"mode": "prototype"}), random_set(), tmp_path)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(NotFound, match="no checkpoint"):
        read_checkpoint(tmp_path / "nothing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable protomed checkpoint"):
        read_checkpoint(bad)


class _RunsCode:
    """Unpickling this runs a command: what a tampered checkpoint on shared storage can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    """Checkpoints load with weights_only=True: tensors and plain data only, so a file from
    shared storage cannot run code; a normal checkpoint (args and cond dicts, optimizer state)
    still loads, and resumes exactly (test_resume_gives_the_same_next_loss_as_uninterrupted)."""
    cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1, "batch_size": 4})
    train(cfg, random_set(), tmp_path / "run", show_progress=False)
    good = read_checkpoint(tmp_path / "run")
    assert good["args"]["mode"] == "baseline" and good["cond"]["classes"] == ["c0", "c1", "c2"]
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**good, "args": {**good["args"], "hook": _RunsCode(marker)}}, evil)
    for load in (read_checkpoint, load_model):
        with pytest.raises(ValueError, match=r"refused.*posix\.system.*weights_only"):
            load(evil)
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun, gloo, two ranks: gradients are averaged so both ranks end with equal weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    with socket.socket() as s:  # a free port, so parallel runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ddp.json").read_text())
    assert report["world"] == 2
    assert report["digests"][0] == report["digests"][1], "ranks diverged: no gradient sync"
    assert report["digests"][0] != report["initial"], "weights did not change"
    assert read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world"] == 2


def test_grid_has_one_row_per_class_with_blank_padding(tmp_path):
    from PIL import Image

    from ml.diffusion.sample import save_grid

    a = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    path = save_grid({"a": a, "b": b}, tmp_path / "g.png", per_row=3)
    grid = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    assert grid.shape == (3, 2 * 18 + 2, 3 * 18 + 2)
    assert torch.equal(grid[:, 2:18, 2:18], a[0])  # row "a", first tile
    assert torch.equal(grid[:, 20:36, 38:54], b[2])  # row "b", third tile
    assert bool((grid[:, 2:18, 38:54] == 255).all()), "a short row is padded with white"


def test_min_snr_weighting_reaches_the_training_loss(tmp_path):
    """Same seed, same noise and timesteps: the min-SNR loss (weights <= 1) is the smaller."""
    data = random_set()
    first = {}
    for weighting in ("none", "min_snr"):
        cfg = make_config("tiny", {"mode": "baseline", "max_steps": 1, "loss_weighting": weighting})
        train(cfg, data, tmp_path / weighting, show_progress=False)
        first[weighting] = losses_of(tmp_path / weighting)[0]
        saved = json.loads((tmp_path / weighting / "config.json").read_text())
        assert saved["loss_weighting"] == weighting
    assert first["min_snr"] < first["none"]


def test_both_modes_take_the_codebook_width_and_record_it(tmp_path):
    """With K=1 the modes differ only in whether the table learns: same size, same width, and
    the saved configs say the width the models have (not the config's default)."""
    from ml.prototypes.cpl import Codebook

    data = random_set()
    width = 12  # neither the tiny preset's class_dim (16) nor the default (768)
    book = Codebook(list(data.classes), torch.randn(3, 1, width), torch.ones(3, 1), "test-enc")
    sizes = {}
    for mode in ("prototype", "baseline"):
        cfg = make_config("tiny", {"mode": mode, "max_steps": 1, "batch_size": 4})
        assert cfg.class_dim != width
        res = train(cfg, data, tmp_path / mode, codebook=book, show_progress=False)
        assert json.loads((tmp_path / mode / "config.json").read_text())["class_dim"] == width
        assert load_model(res.checkpoint).cfg.class_dim == width
        sizes[mode] = sum(p.numel() for p in res.model.parameters())
        assert res.model.class_embed.weight.shape == (3, width)
    assert sizes["prototype"] == sizes["baseline"]


def test_unfrozen_prototypes_start_at_the_codebook_and_train(tmp_path):
    """``freeze_prototypes=False`` ([3]'s proto_unfrozen, an ablation arm): the table starts as
    the codebook's prototypes and moves with training; the default keeps them bit-identical."""
    from ml.prototypes.cpl import Codebook

    data = random_set()
    book = Codebook(list(data.classes), torch.randn(3, 1, 12), torch.ones(3, 1), "test-enc")
    tables = {}
    for frozen in (True, False):
        cfg = make_config(
            "tiny",
            {
                "mode": "prototype",
                "max_steps": 3,
                "batch_size": 4,
                "lr": 1e-2,
                "freeze_prototypes": frozen,
            },
        )
        run = tmp_path / str(frozen)
        res = train(cfg, data, run, codebook=book, show_progress=False)
        assert res.model.frozen_table is frozen
        loaded = load_model(res.checkpoint, use_ema=False)
        assert loaded.cfg.freeze_prototypes is frozen  # recorded with the run
        tables[frozen] = loaded.model.class_embed.weight.detach()
    assert torch.equal(tables[True], book.table().float())
    assert not torch.allclose(tables[False], book.table().float())
