"""The embedded main job (``protomed demo``) at a tiny size: every artefact and the summary."""

from __future__ import annotations

import json

from ml.demo import MODES, run_demo
from ml.encoder import TINY_MODEL
from ml.toy import TOY_CLASSES


def test_demo_runs_end_to_end_and_summarises(tmp_path):
    summary = run_demo(
        tmp_path,
        steps=2,
        n_per_class=4,
        n_sample=2,
        heldout=3,
        encoder=TINY_MODEL,
        overrides={"base_channels": 8, "norm_groups": 4, "batch_size": 4},
    )
    assert sorted(summary["classes"]) == sorted(TOY_CLASSES)
    for mode in MODES:
        assert (tmp_path / f"grid_{mode}.png").stat().st_size > 0
        assert len(list((tmp_path / f"samples_{mode}").glob("*/*.png"))) == 2 * len(TOY_CLASSES)
        plaus = summary["modes"][mode]["plausibility"]
        assert set(plaus) == set(TOY_CLASSES) and all(p["n"] == 2 for p in plaus.values())
        assert summary["modes"][mode]["seconds_per_step"] > 0
    # the ceiling: real toy images at the model's size pass the rule-based checker
    assert summary["real_mean"] >= 0.9
    assert summary["prototypes"]["n_heldout"] == 3 * len(TOY_CLASSES)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["text"] == summary["text"] and "baseline" in saved["text"]
    assert (tmp_path / "summary.txt").read_text().startswith("rule-based plausibility")
