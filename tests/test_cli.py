"""The ``protomed`` command line: help texts, one-line errors, and the whole core end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ml.cli import app
from ml.data.toy import write_toy_dataset

runner = CliRunner()
TINY_ENCODER = ["--encoder", "protomed-tiny-vit", "--untrained", "--no-cache"]
TINY_MODEL = [
    "--preset",
    "cpu-small",
    "--set",
    "base_channels=8",
    "--set",
    "norm_groups=4",
    "--set",
    "max_steps=2",
    "--set",
    "batch_size=4",
]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "command,phrase",
    [
        ("prototypes", "learn K class prototypes"),
        ("train", "prototype or baseline mode"),
        ("sample", "by default SDE-DPM-Solver++ in 20 steps"),
        ("demo", "embedded main job"),
        ("toy", "toy cytology dataset"),
        ("check", "Rule-based plausibility"),
    ],
)
def test_help_says_what_each_command_does(command, phrase):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert phrase in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--out", "x", "--mode", "prototype", "--data", "/nonexistent"],
            "prototype mode needs --codebook",
        ),
        (["train", "--out", "x", "--mode", "baseline", "--data", "/nonexistent"], "/nonexistent"),
        (
            ["train", "--out", "x", "--mode", "baseline", "--data", ".", "--set", "epoch=3"],
            "unknown field 'epoch'",
        ),
        (["sample", "/nonexistent.pt", "--out", "x"], "no checkpoint at /nonexistent.pt"),
        (["prototypes", "/nonexistent", "--out", "x", *TINY_ENCODER], "/nonexistent"),
        (
            ["prototypes", ".", "--out", "x", "--encoder", "no-such-model", "--untrained"],
            "no-such-model",
        ),
        (["check", "/nonexistent"], "no folder /nonexistent"),
    ],
)
def test_bad_arguments_get_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def wide_help(*command: str) -> str:
    """``--help`` on a terminal wide enough that no choice list or field name is wrapped."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "command,option,choices",
    [
        ("prototypes", "--layout", "auto|folder|ham10000|matek"),
        ("prototypes", "--head", "none|linear"),
        ("train", "--mode", "prototype|baseline"),
        ("train", "--preset", "paper|paper-legacy|cpu-small|tiny"),
        ("sample", "--scheduler", "ddim|dpm++|dpm++sde"),
        ("sample", "--precision", "auto|fp32|bf16"),
        ("evaluate", "--backbone", "small|resnet18|resnext50"),
    ],
)
def test_help_shows_the_choices(command, option, choices):
    lines = [ln for ln in wide_help(command).splitlines() if f" {option} " in ln]
    assert lines and f"<{choices}>" in lines[0], lines


def test_help_has_no_double_negatives_and_matches_the_defaults():
    from ml.config import DEFAULT_STEPS, PRESETS, SampleConfig, TrainConfig

    for command in ("prototypes", "train", "sample", "evaluate", "demo", "toy", "check"):
        assert "no-no" not in wide_help(command), command
    assert "--cache" in wide_help("prototypes") and "[default: cache]" in wide_help("evaluate")
    sample = " ".join(wide_help("sample").split())
    defaults = SampleConfig()
    assert "--ema --no-ema" in sample and "[default: ema]" in sample and defaults.use_ema
    assert f"[default: {defaults.scheduler}]" in sample
    assert f"{DEFAULT_STEPS[defaults.scheduler]} for {defaults.scheduler}" in sample
    train = " ".join(wide_help("train").split())
    for preset in PRESETS:  # every preset, tiny included, is described
        assert f"{preset}:" in train, preset
    fields = train.split("Fields: ", 1)[1]
    for field in TrainConfig.model_fields:  # --set lists what it accepts
        assert f" {field}," in f" {fields}" or f" {field}." in f" {fields}", field


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--out", "x", "--mode", "sideways", "--data", "."],
            "'sideways' is not one of 'prototype', 'baseline'",
        ),
        (
            ["train", "--out", "x", "--mode", "baseline", "--preset", "huge", "--data", "."],
            "'huge' is not one of 'paper', 'paper-legacy', 'cpu-small', 'tiny'",
        ),
        (
            ["sample", "x.pt", "--out", "x", "--scheduler", "euler"],
            "'euler' is not one of 'ddim', 'dpm++', 'dpm++sde'",
        ),
    ],
)
def test_a_value_outside_the_choices_names_them(args, message):
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in result.output, result.output


def test_negative_flags_keep_their_spelling(tmp_path):
    """``--no-cache`` and ``--no-ema`` parse (the off side of --cache, --ema)."""
    result = invoke("sample", tmp_path / "missing.pt", "--out", tmp_path / "o", "--no-ema")
    assert result.exit_code == 2 and "error: no checkpoint at" in result.output, result.output


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("protomed")
    proc = subprocess.run(
        [str(exe), "sample", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no checkpoint at")
    assert "Traceback" not in proc.stderr


def test_missing_clip_weights_are_a_one_line_error(tmp_path):
    """The default (ViT-L-14, OpenAI tag) with an empty hub cache and no network."""
    data = write_toy_dataset(tmp_path / "data", n_per_class=3, size=32)
    exe = Path(sys.executable).with_name("protomed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            str(exe),
            "prototypes",
            str(data),
            "--out",
            str(tmp_path / "cb"),
            "--n-per-class",
            "2",
            "--heldout",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no local weights for ViT-L-14 'openai'")
    assert "--pretrained PATH" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "cb").exists()


def test_core_end_to_end_on_the_toy_domain(tmp_path):
    data = write_toy_dataset(tmp_path / "data", n_per_class=8, size=64, seed=0)
    r = invoke(
        "prototypes",
        data,
        "--out",
        tmp_path / "cb",
        "--n-per-class",
        5,
        "--heldout",
        3,
        "--k",
        2,
        "--epochs",
        20,
        *TINY_ENCODER,
    )
    assert r.exit_code == 0, r.output
    book = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    report = book["report"]
    assert book["k"] == 2 and book["selection"]["n_per_class"] == 5
    assert '"nearest_prototype_acc"' in r.output, "the report is printed"
    assert report["n_train"] == 25 and report["n_heldout"] == 15
    assert 0.0 <= report["nearest_prototype_acc"] <= 1.0

    for mode in ("prototype", "baseline"):
        r = invoke(
            "train",
            "--out",
            tmp_path / mode,
            "--mode",
            mode,
            "--codebook",
            tmp_path / "cb",
            *TINY_MODEL,
        )
        assert r.exit_code == 0, r.output
        r = invoke(
            "sample",
            tmp_path / mode,
            "--out",
            tmp_path / f"s_{mode}",
            "-n",
            2,
            "--steps",
            3,
            "--grid",
            tmp_path / f"{mode}.png",
        )
        assert r.exit_code == 0, r.output
        assert len(list((tmp_path / f"s_{mode}").glob("*/*.png"))) == 10
        assert (tmp_path / f"{mode}.png").stat().st_size > 0
    manifest = (tmp_path / "s_prototype" / "manifest.csv").read_text()
    assert ",prototype,2.0,3,dpm++sde," in manifest
    # the modes differ only in the class table: both take the codebook's width (32 here, not
    # the config's default 768), record it, and have the same number of parameters
    from ml.config import make_config
    from ml.models.checkpoint import load_model, read_checkpoint
    from ml.prototypes.cpl import Codebook

    width = Codebook.load(tmp_path / "cb").dim
    assert width != make_config("cpu-small").class_dim
    sizes = {}
    for mode in ("prototype", "baseline"):
        assert json.loads((tmp_path / mode / "config.json").read_text())["class_dim"] == width
        assert read_checkpoint(tmp_path / mode)["args"]["class_dim"] == width
        model = load_model(tmp_path / mode).model
        assert model.class_embed.weight.shape[1] == width
        sizes[mode] = sum(
            p.numel() for n, p in model.named_parameters() if n != "class_embed.weight"
        )
    assert sizes["prototype"] == sizes["baseline"], "everything but the class table is the same"

    r = invoke("check", tmp_path / "s_prototype")
    assert r.exit_code == 0, r.output
    judged = json.loads(r.stdout)  # stderr has the threads line
    assert set(judged) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert all(v["n"] == 2 and 0.0 <= v["plausible"] <= 1.0 for v in judged.values())


def test_ml_does_not_import_the_web_stack():
    code = (
        "import sys, ml.cli, ml.pipeline, ml.diffusion.train, ml.diffusion.sample, ml.demo; "
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'starlette') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


LEARNED_SMALL = [
    "--encoder",
    "learned",
    "--encoder-epochs",
    3,
    "--encoder-size",
    16,
    "--encoder-patience",
    1,
    "--no-cache",
]


def test_prototypes_with_a_learned_encoder_then_its_space_is_refused_for_metrics(tmp_path):
    """``--encoder learned``: no weights, the encoder is saved beside the codebook and the report
    compares it with the untrained network; a model trained on that codebook is then not audited
    or evaluated in the same space (it favours prototype mode by construction)."""
    data = write_toy_dataset(tmp_path / "data", n_per_class=6, size=32, seed=0)
    cb = tmp_path / "cb"
    r = invoke(
        "prototypes",
        data,
        "--out",
        cb,
        "--n-per-class",
        4,
        "--heldout",
        2,
        "--image-size",
        32,
        *LEARNED_SMALL,
    )
    assert r.exit_code == 0, r.output
    book = json.loads((cb / "codebook.json").read_text())
    assert book["encoder"].startswith("learned:") and (cb / "encoder.safetensors").is_file()
    assert '"untrained_nearest_prototype_acc"' in r.output, "the report compares"
    training = json.loads((cb / "encoder.json").read_text())["training"]
    assert training["selected_on"] == "heldout (early stopping)", training
    r = invoke(
        "train", "--out", tmp_path / "m", "--mode", "prototype", "--codebook", cb, *TINY_MODEL
    )
    assert r.exit_code == 0, r.output
    r = invoke("sample", tmp_path / "m", "--out", tmp_path / "s", "-n", 1, "--steps", 2)
    assert r.exit_code == 0, r.output
    r = invoke(
        "audit",
        tmp_path / "m",
        tmp_path / "s",
        "--encoder",
        "learned",
        "--pretrained",
        cb,
        "--no-cache",
    )
    assert r.exit_code == 2 and "favours prototype mode by construction" in r.output, r.output
    r = invoke("audit", tmp_path / "m", tmp_path / "s", "--encoder", "learned", "--no-cache")
    assert r.exit_code == 2 and "needs --pretrained DIR" in r.output, r.output


def test_encoder_options_need_the_learned_encoder(tmp_path):
    data = write_toy_dataset(tmp_path / "data", n_per_class=2, size=16, seed=0)
    r = invoke("prototypes", data, "--out", tmp_path / "cb", "--encoder-epochs", 3, *TINY_ENCODER)
    assert r.exit_code == 2 and "need --encoder learned" in r.output, r.output
    r = invoke(
        "prototypes", data, "--out", tmp_path / "cb", "--head", "linear", "--encoder", "learned"
    )
    assert r.exit_code == 2 and "--head is for fixed CLIP embeddings" in r.output, r.output
    assert not (tmp_path / "cb").exists()


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "error: --steps must be between 1 and"),
        (["--n-sample", "0"], "error: --n-sample must be between 1 and"),
        (["--n-per-class", "0"], "error: --n-per-class must be between 1 and"),
        (["--encoder", "no-such-net"], "error: --encoder no-such-net: unknown open_clip model"),
        (["--device", "nonsense"], "error: --device 'nonsense'"),
    ],
)
def test_demo_checks_every_option_before_touching_the_output(tmp_path, args, message):
    """A previous run's files stay as they were (bytes and mtime), and no new file appears."""
    out = tmp_path / "demo_out"
    (out / "codebook").mkdir(parents=True)
    (out / "codebook" / "codebook.json").write_text('{"previous": "run"}')
    (out / "summary.txt").write_text("the previous run's summary\n")
    before = _snapshot(out)
    result = invoke("demo", "--out", out, *args)
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.output
    assert "[1/" not in result.output, "no stage started"
    assert _snapshot(out) == before


def test_serve_on_a_busy_port_says_so_first_and_creates_nothing(tmp_path):
    """A second ``protomed serve`` on a port in use: the first stderr line names the port and
    --port, exit 2, and the folder gets no database, key file or storage."""
    import socket

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROTOMED_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "protomed_cli", "serve", "--port", str(port), "--no-worker"],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(repo)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: port") and str(port) in first and "--port" in first, first
    assert list(tmp_path.iterdir()) == [], "nothing migrated or created"
