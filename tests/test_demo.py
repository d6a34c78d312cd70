"""The embedded main job (``protomed demo``) at a tiny size: every artefact and the summary."""

from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from ml.config import SampleConfig
from ml.console import LINES
from ml.data.toy import TOY_CLASSES
from ml.demo import MODES, STAGES, compare, difference_text, run_demo
from ml.prototypes.encoder import TINY_MODEL

TINY = {"base_channels": 8, "norm_groups": 4, "batch_size": 4, "image_size": 16}
DIFFERENCE = re.compile(
    r"difference prototype - baseline: [+-]\d+\.\d points, "
    r"95% interval \[[+-]\d+\.\d, [+-]\d+\.\d\] \(Newcombe\): "
)


def test_demo_runs_end_to_end_and_summarises(tmp_path, capsys):
    said: list[str] = []
    sample = SampleConfig(scheduler="ddim", steps=3)  # not the demo's default sampler
    summary = run_demo(
        tmp_path,
        steps=2,
        n_per_class=4,
        n_sample=2,
        heldout=3,
        encoder=TINY_MODEL,
        overrides=TINY,
        sample=sample,
        say=said.append,
    )
    assert sorted(summary["classes"]) == sorted(TOY_CLASSES)
    for mode in MODES:
        grid = tmp_path / f"grid_{mode}.png"
        assert len(list((tmp_path / f"samples_{mode}").glob("*/*.png"))) == 2 * len(TOY_CLASSES)
        plaus = summary["modes"][mode]["plausibility"]
        assert set(plaus) == set(TOY_CLASSES) and all(p["n"] == 2 for p in plaus.values())
        assert summary["modes"][mode]["n"] == 2 * len(TOY_CLASSES)
        assert summary["modes"][mode]["seconds_per_step"] > 0
        # labelled grid: 8 tiles of 16px at scale 2 (plus padding) and a strip of class names
        # on the left, with dark text pixels in it
        img = np.asarray(Image.open(grid).convert("L"))
        tiles = 8 * (2 * 16 + 2) + 2
        assert img.shape[1] > tiles
        assert (img[:, : img.shape[1] - tiles] < 128).any(), "the label strip has text"
        manifest = json.loads((tmp_path / f"samples_{mode}" / "manifest.json").read_text())
        assert manifest["sample"]["scheduler"] == "ddim"
    # the ceiling: real toy images at the model's size are judged too
    assert 0.0 <= summary["real_mean"] <= 1.0
    assert summary["prototypes"]["n_heldout"] == 3 * len(TOY_CLASSES)
    text = (tmp_path / "summary.txt").read_text()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["text"] == summary["text"] and "\nrule-based plausibility" in text
    assert text.startswith(f"prototypes: encoder {TINY_MODEL}"), "it says which encoder"
    # the summary names the sampler actually used, not a fixed one
    assert "DDIM (ddim), 3 steps, guidance 2" in text and "dpm++sde" not in text
    # the comparison: a difference with its interval, in the file and on the terminal
    assert DIFFERENCE.search(text), text
    assert said[-1] == summary["text"]
    # a header per stage, in order
    headers = [s for s in said if s.startswith("[")]
    assert [h.split("]")[0] + "]" for h in headers] == [f"[{i}/{STAGES}]" for i in range(1, 7)]
    assert "embedding" in headers[1]
    # the embedding step reports progress (a bar on stderr up to all 35 images)
    err = capsys.readouterr().err
    assert "embed images: 35/35" in err
    # every long stage's bar says what it counts; off a terminal it is a few plain lines
    for label in ("train baseline", "train prototype", "sample baseline", "sample prototype"):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"{label}:")]
        assert 1 <= len(lines) <= LINES + 1, err
    assert "\r" not in err and "\x1b[" not in err, "no cursor codes in a log"
    # the summary says what the grids show, what "real" is, and that the encoder was untrained
    assert "(the first 2 of the 2 images per class" in text
    assert "real: the checker on the 3 held-out real toy images per class" in text
    assert "UNTRAINED" in text.splitlines()[0] and summary["encoder_untrained"] is True


def test_demo_default_sampler_is_named_from_its_config(tmp_path):
    summary = run_demo(
        tmp_path,
        steps=1,
        n_per_class=3,
        n_sample=1,
        heldout=2,
        encoder=TINY_MODEL,
        overrides=TINY,
        say=lambda _: None,
        show_progress=False,
    )
    used = json.loads((tmp_path / "samples_prototype" / "manifest.json").read_text())["sample"]
    assert f"({used['scheduler']}), {used['steps']} steps" in summary["text"]
    assert used["scheduler"] == "dpm++sde"


def test_comparison_says_no_difference_when_the_interval_covers_zero():
    same = compare({"passed": 10, "n": 40}, {"passed": 12, "n": 40})
    assert same["ci95"][0] < 0 < same["ci95"][1] and not same["shown"]
    assert "no difference shown" in difference_text(same)
    ahead = compare({"passed": 5, "n": 160}, {"passed": 80, "n": 160})
    assert ahead["shown"] and ahead["ci95"][0] > 0
    text = difference_text(ahead)
    assert "+46.9 points" in text and "prototype model passes more often" in text
    assert "no difference" not in text


def test_demo_learns_its_encoder_by_default(tmp_path):
    """No CLIP weights needed: the demo's prototypes come from an encoder learned on the toy
    images, saved beside the codebook, and the summary says so."""
    said: list[str] = []
    summary = run_demo(
        tmp_path,
        steps=1,
        n_per_class=4,
        n_sample=1,
        heldout=2,
        overrides=TINY,
        sample=SampleConfig(scheduler="ddim", steps=2),
        say=said.append,
        show_progress=False,
    )
    assert summary["encoder"].startswith("learned:")
    assert (tmp_path / "codebook" / "encoder.safetensors").is_file()
    assert summary["prototypes"]["encoder_kind"] == "learned"
    assert summary["text"].startswith("prototypes: domain encoder learned from the toy images")
    assert any("learning a domain encoder" in line for line in said)
