"""``protomed audit`` on a local run folder and a sampled batch folder: the summary, a training
image planted into the batch flagged with its source, one ``error:`` line for a bad path."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ml.cli import app
from ml.data.toy import write_toy_dataset

runner = CliRunner()
TINY_ENCODER = ["--encoder", "protomed-tiny-vit", "--untrained", "--no-cache"]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained briefly on two toy classes (6 held-out images per class), and a
    sampled batch folder with one training image planted in it (listed in its manifest)."""
    tmp = tmp_path_factory.mktemp("audit")
    data = write_toy_dataset(tmp / "data", n_per_class=14, size=32, seed=0)
    r = invoke(
        "prototypes",
        data,
        "--out",
        tmp / "cb",
        "--n-per-class",
        8,
        "--heldout",
        6,
        "--epochs",
        3,
        "--image-size",
        32,
        "--classes",
        "lymphocyte,neutrophil",
        *TINY_ENCODER,
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "train",
        "--out",
        tmp / "run",
        "--mode",
        "prototype",
        "--codebook",
        tmp / "cb",
        "--preset",
        "tiny",
        "--set",
        "max_steps=2",
        "--set",
        "batch_size=4",
    )
    assert r.exit_code == 0, r.output
    r = invoke(
        "sample", tmp / "run", "--out", tmp / "batch", "-n", 3, "--steps", 2, "--precision", "fp32"
    )
    assert r.exit_code == 0, r.output
    book = json.loads((tmp / "cb" / "codebook.json").read_text())
    assert book["selection"]["n_heldout"] == 6
    return tmp


def plant(tmp: Path, source: Path) -> str:
    """Copy a training image into the batch folder and list it in the manifest."""
    dest = tmp / "batch" / "lymphocyte" / "planted.png"
    shutil.copy(source, dest)
    with open(tmp / "batch" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.append({**rows[0], "file": "lymphocyte/planted.png", "class": "lymphocyte"})
    with open(tmp / "batch" / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return "lymphocyte/planted.png"


def test_audit_prints_the_summary_and_flags_a_planted_training_image(run: Path) -> None:
    from ml.audit import model_split
    from ml.models.checkpoint import load_model

    split = model_split(load_model(run / "run"))
    source = Path(split.train.paths[split.train.labels.tolist().index(0)])
    planted = plant(run, source)
    r = invoke("audit", run / "run", run / "batch", "--out", run / "audit.json", *TINY_ENCODER)
    assert r.exit_code == 0, r.output
    assert "lymphocyte" in r.output and "neutrophil" in r.output
    assert "fresh real held-out images flagged" in r.output
    assert "no formal privacy guarantee" in r.output
    assert f"flagged: {planted} (lymphocyte)" in r.output and source.name in r.output
    report = json.loads((run / "audit.json").read_text())
    assert report["totals"]["n_images"] == 7  # 3 per class sampled + the planted one
    planted_row = next(i for i in report["images"] if i["name"] == planted)
    assert planted_row["flagged"] and planted_row["pixel"]["distance"] == 0.0
    assert planted_row["pixel"]["train_path"] == str(source)
    cal = report["per_class"][0]["calibration"]
    assert (cal["n_calibration"], cal["n_check"]) == (3, 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent.pt", "."], "no checkpoint at /nonexistent.pt"),
        (["{run}", "/nonexistent-batch"], "no batch folder at /nonexistent-batch"),
        (["{run}", "{tmp}"], "has no manifest.csv"),
        (["{run}", "{batch}", "--space", "pixels"], "spaces"),
    ],
)
def test_bad_paths_get_one_error_line(run: Path, args: list[str], message: str) -> None:
    fill = {"run": run / "run", "tmp": run / "cb", "batch": run / "batch"}
    r = invoke("audit", *(a.format(**fill) for a in args), *TINY_ENCODER)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and message in r.output and "Traceback" not in r.output
