"""The benchmarks run (at a tiny size) so they cannot rot; their figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_speed_harness_runs_both_models(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, "bench/speed.py", "--presets", "tiny", "--repeats", "1",
           "--sample-n", "2", "--steps", "2", "--train-steps", "1", "--no-memory",
           "--threads", "2", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    for key in ("ours_train_img_s", "diffusers_train_img_s", "ours_sample_img_s",
                "diffusers_sample_img_s", "train_ratio", "sample_ratio"):  # fmt: skip
        assert row[key] > 0, key
    assert "ours/peer" in r.stdout


def test_same_architecture_within_one_percent() -> None:
    sys.path.insert(0, str(REPO))
    from bench.speed import build
    from ml.unet import count_parameters

    for preset in ("cpu-small", "paper"):
        ours, peer = (count_parameters(build(w, preset, "fp32")[0]) for w in ("ours", "diffusers"))
        assert abs(ours / peer - 1) < 0.01, (preset, ours, peer)
