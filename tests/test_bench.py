"""The benchmarks run (at a tiny size) so they cannot rot; their figures are not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # benchmarks at a tiny size: not in the fast default lane
# Each run takes seconds to a minute here; the subprocess limit only catches a hang, under any
# load (a loaded CI machine ran 20x slower than a quiet one), and stays below pytest's 900 s.
HANG_GUARD_S = 840
HEAD = (
    subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    or None
)


def assert_run_info(run: dict, module: str, *args: str) -> None:
    """A result's ``run`` (bench.provenance.run_info): this checkout's commit, the command as
    run, the parsed arguments, the versions and the machine."""
    assert run["commit"] == HEAD and len(run["commit"] or "") == 40
    assert isinstance(run["dirty"], bool)
    assert run["argv"][1:3] == ["-m", module], run["argv"]
    assert all(a in run["argv"] for a in args), (args, run["argv"])
    assert isinstance(run["args"], dict) and run["args"]
    assert run["torch"] and run["python"] and run["platform"] and run["cpus"] >= 1
    assert "gpu" in run and run["utc"].endswith("+00:00")


def test_speed_harness_runs_both_models(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.speed",
        "--presets",
        "tiny",
        "--repeats",
        "1",
        "--sample-n",
        "2",
        "--steps",
        "2",
        "--train-steps",
        "1",
        "--no-memory",
        "--threads",
        "2",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.speed", "--presets", "tiny")
    assert res["run"]["args"]["presets"] == ["tiny"] and res["run"]["args"]["train_steps"] == 1
    row = res["rows"][0]
    for key in (
        "ours_train_img_s",
        "diffusers_train_img_s",
        "ours_sample_img_s",
        "diffusers_sample_img_s",
        "train_ratio",
        "sample_ratio",
    ):
        assert row[key] > 0, key
    assert "ours/peer" in r.stdout


def test_speed_harness_runs_both_models_with_attention(tmp_path: Path) -> None:
    """The faithful ``paper`` layout (self-attention where [3] puts it) against diffusers'
    attention blocks, at the tiny size: both have attention at both sizes, parameters agree."""
    out = tmp_path / "speed.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.speed",
        "--presets",
        "tiny",
        "--repeats",
        "1",
        "--sample-n",
        "2",
        "--steps",
        "2",
        "--train-steps",
        "1",
        "--threads",
        "2",
        "--precisions",
        "fp32",
        "--set",
        "attention_resolutions=[16,8]",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["ours_train_img_s"] > 0 and row["diffusers_sample_img_s"] > 0
    assert row["ours_train_peak_mib"] > 10 and row["diffusers_sample_peak_mib"] > 10
    assert abs(row["param_ratio"] - 1) < 0.05  # tiny: the class input's share is larger
    from bench.peer import build
    from ml.models.unet import AttnBlock

    ours, _ = build("ours", "tiny", "fp32", {"attention_resolutions": [16, 8]})
    peer, _ = build("diffusers", "tiny", "fp32", {"attention_resolutions": [16, 8]})
    n_peer = sum(type(m).__name__ == "Attention" for m in peer.modules())
    assert (
        sum(isinstance(m, AttnBlock) for m in ours.modules()) == n_peer == 7
    )  # 1 + 2 per level, 1 middle


def test_same_architecture_within_one_percent() -> None:
    from bench.peer import build
    from ml.models.unet import count_parameters

    for preset in ("cpu-small", "paper-legacy", "paper"):
        ours, peer = (count_parameters(build(w, preset, "fp32")[0]) for w in ("ours", "diffusers"))
        assert abs(ours / peer - 1) < 0.01, (preset, ours, peer)


def test_whole_command_benchmark_runs_both_commands(tmp_path: Path) -> None:
    out = tmp_path / "command.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.command",
        "--preset",
        "tiny",
        "--n",
        "2",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.command", "--n", "2")
    row = res["row"]
    for who in ("ours", "diffusers"):
        assert row[f"{who}_wall_s"] > 0 and row[f"{who}_peak_mib"] > 10, row
    assert "x the peer's speed" in r.stdout


def test_profile_groups_the_time_of_both_models(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "-m", "bench.breakdown", "--preset", "tiny", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.breakdown", "--preset", "tiny")
    ms = res["ms"]
    for task in ("train", "sample"):
        for who in ("ours", "diffusers"):
            assert ms[task][who]["convolution"] > 0, (task, who)
    assert ms["train"]["diffusers"]["dropout RNG"] > 0  # the peer's bernoulli_ is counted


def test_gpu_script_runs_on_the_cpu_at_a_tiny_size(tmp_path: Path) -> None:
    """bench/gpu.sh is for a lent GPU; its CPU mode at the tiny preset keeps it from rotting."""
    small = {
        "DEVICE": "cpu",
        "PRESETS": "tiny",
        "BATCHES": "2",
        "REPEATS": "1",
        "TRAIN_STEPS": "1",
        "STEPS": "2",
    }
    env = {**os.environ, **small, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "bench/gpu.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "speed_gpu.json").read_text())
    assert_run_info(res["run"], "bench.speed", "--device", "cpu")
    rows = res["rows"]
    assert [(row["precision"], row["train_batch"], row["sample_n"]) for row in rows] == [
        ("bf16", 2, 2)
    ]


def test_solver_quality_compares_every_variant(tmp_path: Path) -> None:
    """A tiny baseline on the toy domain through the CLI, then the sampler comparison on it, at
    a tenth of the variants' steps: about 25 denoising steps per image in all instead of 240
    (bf16 autocast is emulated, hence slow, on CPUs without native bf16), so the timeout is a
    hang guard, not a race against the machine's load."""
    env = {**os.environ, "PROTOMED_NO_MALLOC_TUNING": "1"}
    protomed = [sys.executable, "-m", "ml.cli"]
    for cmd in (
        ["toy", str(tmp_path / "toy"), "--n-per-class", "6", "--size", "16"],
        [
            "train",
            "--mode",
            "baseline",
            "--data",
            str(tmp_path / "toy"),
            "--preset",
            "tiny",
            "--set",
            "max_steps=2",
            "--out",
            str(tmp_path / "run"),
        ],
    ):
        r = subprocess.run([*protomed, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "q.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.solver_quality",
            str(tmp_path / "run"),
            "--n",
            "2",
            "--encoder",
            "protomed-tiny-vit",
            "--step-scale",
            "0.1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.solver_quality", "--step-scale", "0.1")
    rows = res["rows"]
    assert rows["ddim-50"]["mean_abs_vs_ddim50"] == 0 and rows["ddim-50"]["fd_vs_ddim50"] == 0
    assert {"dpm++sde-20", "ddim-50 bf16", "ddim-50 seed 1"} <= rows.keys()
    assert rows["ddim-50 seed 1"]["mean_abs_vs_ddim50"] > 0
    assert all(row["toy_plausible"] is not None for row in rows.values())


def test_audit_planted_runs(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    cmd = [sys.executable, "-m", "bench.audit_planted", "--toy-only", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.audit_planted", "--toy-only")
    row = res["toy 32 px"]
    assert row["exact"] == [30, 30] and row["check"][1] == 150


def test_audit_memorised_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "memorised.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.audit_memorised",
        "--datasets",
        "toy",
        "--steps",
        "2,4",
        "--samples-per-class",
        "3",
        "--heldout-per-class",
        "6",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.audit_memorised", "--steps", "2,4")
    rows = res["toy"]["rows"]
    assert set(rows) == {"2 ddim-50", "2 dpm++sde-20", "4 ddim-50", "4 dpm++sde-20"}
    assert all(row["flagged"][1] == 9 and row["check"][1] == 9 for row in rows.values())


def test_replicated_real_comparison_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """bench/compare_real.py end to end on a toy dataset: the split, one codebook, two
    generative seeds per mode with a checkpoint per candidate budget, the budget chosen on
    validation and the paired test summary over the seeds."""
    env = {**os.environ, "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.cli",
            "toy",
            str(tmp_path / "data" / "toy"),
            "--n-per-class",
            "12",
            "--size",
            "16",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "replicated.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.compare_real",
        "--data",
        str(tmp_path / "data"),
        "--datasets",
        "toy",
        "--sizes",
        "5,3,3",
        "--budgets",
        "2,4",
        "--gen-seeds",
        "0,1",
        "--clf-seeds",
        "0",
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--clf-image-size",
        "16",
        "--sample-steps",
        "2",
        "--encoder",
        "protomed-tiny-vit",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    full = json.loads(out.read_text())
    assert_run_info(full["run"], "bench.compare_real", "--budgets", "2,4")
    assert full["run"]["args"]["gen_seeds"] == [0, 1]
    res = full["datasets"]["toy"]
    assert res["chosen_budget"] in (2, 4)
    assert set(res["validation_f1_by_budget"]) == {"2", "4"}
    assert {r["budget"] for r in res["runs"] if r["split"] == "test"} == {res["chosen_budget"]}
    for mode in ("baseline", "prototype"):
        assert res["test"]["modes"][mode]["f1"]["n"] == 2
    assert res["test"]["paired"]["f1"]["seeds"] == [0, 1]
    assert res["sizes_per_class"]["test"] == dict.fromkeys(res["sizes_per_class"]["train"], 3)
    assert "prototype - baseline (paired)" in r.stdout
    # every F1 is read against what learning nothing scores on the same part (3 per class)
    chance = res["chance"]["test"]
    assert chance["majority"]["f1"] == pytest.approx((2 * (1 / 5) / (1 + 1 / 5)) / 5)
    assert chance["uniform"]["f1_low"] < chance["uniform"]["f1"] < chance["uniform"]["f1_high"]
    assert set(res["chance"]) == {"validation", "test"}
    assert "| toy | - | chance: uniform guess | - |" in r.stdout


def test_scorer_toy_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """bench/scorer_toy.py end to end at a tiny size: a 2-step model draws nothing plausible,
    so the scorer is refused (and says why) unless some cell came out right; either way the
    harness runs through and writes its JSON."""
    out = tmp_path / "scorer.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.scorer_toy",
        "--out",
        str(tmp_path / "run"),
        "--json",
        str(out),
        "--steps",
        "2",
        "--pool",
        "6",
        "--n",
        "2",
        "--oversample",
        "2",
        "--encoder",
        "protomed-tiny-vit",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert_run_info(result["run"], "bench.scorer_toy", "--steps", "2")
    assert "refused" in result or result["filter"]["pooled"]["filtered"]["n"] == 10


def test_ablation_runs_every_arm_at_a_tiny_size(tmp_path: Path) -> None:
    """bench/ablation.py end to end at a tiny size: both codebooks, four arms paired with the
    baseline by seed at every checkpoint, the step chosen on validation, the class tables as
    each arm defines them, and a rerun that reuses every finished run."""
    import torch

    from ml.models.checkpoint import read_checkpoint
    from ml.prototypes.cpl import Codebook

    env = {**os.environ, "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.cli",
            "toy",
            str(tmp_path / "data" / "toy"),
            "--n-per-class",
            "12",
            "--size",
            "16",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out, runs = tmp_path / "ablation.json", tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "bench.ablation",
        "--data",
        str(tmp_path / "data"),
        "--datasets",
        "toy",
        "--sizes",
        "5,3,3",
        "--steps",
        "9",
        "--steps-for",
        "toy=2,4",
        "--seeds",
        "0,1",
        "--preset",
        "tiny",
        "--set",
        '{"lr": 0.01}',
        "--epochs",
        "1",
        "--clf-image-size",
        "16",
        "--sample-steps",
        "2",
        "--encoder-epochs",
        "2",
        "--jobs",
        "2",
        "--out",
        str(runs),
        "--results",
        str(out),
        "--plot",
        str(tmp_path / "ablation.png"),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.ablation", "--seeds", "0,1")
    assert res["protocol"]["seeds"] == [0, 1]
    toy = res["datasets"]["toy"]
    assert toy["steps"] == [2, 4]  # --steps-for wins over --steps
    summary = toy["summary"]
    assert summary["chosen_step"] in (2, 4)
    arms = ["baseline", "frozen-learned", "frozen-untrained", "unfrozen-learned"]
    for split in ("validation", "test"):
        assert list(summary["f1_curves"][split]) == arms
        assert all(c[s]["n"] == 2 for c in summary["f1_curves"][split].values() for s in ("2", "4"))
        for arm in arms[1:]:
            assert summary["paired_f1_vs_baseline"][split][arm]["4"]["seeds"] == [0, 1]
    assert set(toy["chance"]) == {"validation", "test"} and "test" in toy["real"]
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "| frozen-untrained |" in r.stdout and "chance: uniform guess" in r.stdout

    # each arm's class table: the codebook's (frozen), moved from it (unfrozen), learnt (baseline)
    books = {k: Codebook.load(runs / "toy" / f"codebook-{k}") for k in ("learned", "untrained")}
    assert books["learned"].encoder != books["untrained"].encoder
    assert books["learned"].dim == books["untrained"].dim  # one class-table width for all arms

    def table(arm: str) -> torch.Tensor:
        ckpt = read_checkpoint(runs / "toy" / "runs" / f"{arm}_seed0" / "step_4.pt")
        return ckpt["model"]["class_embed.weight"]

    assert torch.equal(table("frozen-learned"), books["learned"].table().float())
    assert torch.equal(table("frozen-untrained"), books["untrained"].table().float())
    assert not torch.allclose(table("unfrozen-learned"), books["learned"].table().float())
    assert table("baseline").shape == table("frozen-learned").shape
    spread = toy["table_spread_seed0"]  # a frozen table's spread stays put, a learnt one moves
    assert spread["frozen-learned"]["2"] == spread["frozen-learned"]["4"]
    assert spread["unfrozen-learned"]["2"] != spread["unfrozen-learned"]["4"]
    assert toy["codebooks"]["learned"]["row_gap_min"] > 0

    # a rerun with the same arguments reuses every finished run (nothing retrained)
    stamps = {p: p.stat().st_mtime_ns for p in (runs / "toy" / "runs").glob("*.json")}
    assert len(stamps) == 8
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads(out.read_text())["datasets"]["toy"]["runs"]
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, toy["runs"]))


def toy_data(tmp_path: Path, n_per_class: int = 12) -> Path:
    """``protomed toy`` under tmp_path/data/toy; returns tmp_path/data."""
    env = {**os.environ, "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ml.cli",
            "toy",
            str(tmp_path / "data" / "toy"),
            "--n-per-class",
            str(n_per_class),
            "--size",
            "16",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return tmp_path / "data"


def test_prototype_probe_runs_at_a_toy_size(tmp_path: Path) -> None:
    """bench/prototype_probe.py on the toy domain with the tiny untrained encoder: one row per K,
    every class named, accuracies in [0, 1], the majority baseline at 1/5 (balanced)."""
    from ml.data.toy import TOY_CLASSES

    out = tmp_path / "probe.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.prototype_probe",
        "--data",
        str(toy_data(tmp_path)),
        "--datasets",
        "toy",
        "--encoder",
        "protomed-tiny-vit",
        "--untrained",
        "--n-per-class",
        "8",
        "--heldout",
        "4",
        "--k",
        "1",
        "2",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.prototype_probe", "--datasets", "toy")
    assert res["run"]["args"]["k"] == [1, 2] and res["run"]["args"]["untrained"] is True
    rows = res["rows"]
    assert [(row["dataset"], row["k"]) for row in rows] == [("toy", 1), ("toy", 2)]
    for row in rows:
        assert sorted(row["classes"]) == sorted(TOY_CLASSES)
        assert row["n_train"] == 8 * len(TOY_CLASSES) and row["n_heldout"] == 4 * len(TOY_CLASSES)
        for key in ("nearest_prototype_acc", "logreg_acc", "train_acc"):
            assert 0 <= row[key] <= 1, (key, row[key])
        assert row["majority_acc"] == pytest.approx(1 / len(TOY_CLASSES))
        assert row["intra_inter_ratio"] > 0 and "untrained" in row["encoder"]
    assert (tmp_path / "work" / "toy-k2" / "codebook.json").exists()


def test_review_toy_runs_at_a_toy_size(tmp_path: Path) -> None:
    """bench/review_toy.py through a real Label Studio (started by .ci/run; skipped without one,
    failed under PROTOMED_REQUIRE_SERVICES): both modes of a tiny model, two images per class and
    mode, every task annotated by the toy checker, the report counting them all."""
    from test_reviews import ls_settings

    from ml.data.toy import TOY_CLASSES

    url, token = ls_settings()
    out = tmp_path / "review"
    cmd = [
        sys.executable,
        "-m",
        "bench.review_toy",
        "--ls-url",
        url,
        "--ls-token",
        token,
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--n-per-class",
        "6",
        "--n",
        "2",
        "--sample-steps",
        "2",
        "--no-screenshots",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (out / "report.json").read_text()
    assert token not in text  # the run info hides the token
    report = json.loads(text)
    assert_run_info(report["run"], "bench.review_toy", "--steps", "2")
    assert report["run"]["args"]["ls_token"] == "***" and report["run"]["args"]["n"] == 2
    assert sorted(m["mode"] for m in report["models"]) == ["baseline", "prototype"]
    assert sorted(row["class"] for row in report["classes"]) == sorted(TOY_CLASSES)
    for row in report["classes"]:
        assert len(row["models"]) == 2, row
        for entry in row["models"].values():
            assert entry["images"] == 2 and 0 <= entry["plausible"] <= 2, (row["class"], entry)
            assert entry["rate"] is None or 0 <= entry["rate"] <= 1
    pooled = report["average"]["pooled"].values()
    assert sum(m["images"] for m in pooled) == 2 * 2 * len(TOY_CLASSES)
    assert f"{2 * 2 * len(TOY_CLASSES)} images reviewed" in r.stdout
    assert (out / "report.csv").read_text().strip()
    side = json.loads((out / "report.csv.run.json").read_text())
    assert side["commit"] == report["run"]["commit"] and side["argv"] == report["run"]["argv"]


def test_study_toy_runs_at_a_toy_size(tmp_path: Path) -> None:
    """bench/study_toy.py through a real Label Studio (as above): a tiny model of each mode, two
    images per class and mode, real controls, two readers with their own tokens; the study is
    complete, both readers' reads count and the origin answers are scored."""
    from test_reviews import ls_settings

    from ml.data.toy import TOY_CLASSES

    url, token = ls_settings()
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "bench.study_toy",
        "--ls-url",
        url,
        "--ls-token",
        token,
        "--steps",
        "2",
        "--n-per-class",
        "6",
        "--n",
        "2",
        "--sample-steps",
        "2",
        "--calibration",
        "8",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (out / "study.json").read_text()
    assert token not in text
    doc = json.loads(text)
    assert_run_info(doc["run"], "bench.study_toy", "--steps", "2")
    assert len(doc["machine_load"]["start"]) == 3 and len(doc["machine_load"]["end"]) == 3
    classes, images = len(TOY_CLASSES), 2 * 2 * len(TOY_CLASSES) + 2 * len(TOY_CLASSES)
    assert doc["tasks"] == images  # 2 per class and mode, and share 0.5 of that real
    origin = doc["readers"]["origin"]
    assert sorted(origin["ranges"]) == sorted(TOY_CLASSES) and origin["calibration_per_class"] == 8
    assert 0 <= doc["readers"]["noise"]["flipped"] <= images
    rep = doc["report"]
    assert rep["study"]["status"] == "complete" and rep["progress"]["complete"] is True
    assert rep["study"]["overlap"] == 2 and rep["study"]["ask_origin"] is True
    assert [p["reads"] for p in rep["progress"]["readers"]] == [images, images]
    assert rep["progress"]["not_counted"]["other_readers"] == 0
    assert sorted(m["mode"] for m in rep["models"]) == ["baseline", "prototype"]
    assert len(rep["classes"]) == classes
    for row in rep["classes"]:
        assert row["real"]["images"] == 2 and 0 <= row["real"]["plausible"] <= 2, row
        assert len(row["models"]) == 2 and len(row["versus_real"]) == 2, row
        for diff in row["versus_real"].values():
            assert -1 <= diff["ci"][0] <= diff["value"] <= diff["ci"][1] <= 1, diff
    kappa = rep["pooled"]["agreement"]
    assert kappa["kappa_units"] == images
    assert kappa["kappa"] is None or -1 <= kappa["kappa"] <= 1
    d = rep["plausibility"]["discrimination"]
    assert d["pooled"]["n"] == 2 * images and len(d["readers"]) == 2
    for scores in [d["pooled"], *d["readers"].values()]:
        acc = scores["accuracy"]
        assert 0 <= acc["ci"][0] <= acc["rate"] <= acc["ci"][1] <= 1
        assert scores["claim"] in ("indistinguishable", "not shown to be indistinguishable")
        assert scores["auc"] is None or 0 <= scores["auc"] <= 1
    assert 0 <= doc["png_size_auc"] <= 1
    assert "reader 1: accuracy" in r.stdout and "PNG-size AUC" in r.stdout


def test_sweep_toy_runs_at_a_toy_size(tmp_path: Path) -> None:
    """bench/sweep_toy.py through a real Label Studio (as above): a tiny model's sweep over two
    classes and two scales, every image reviewed by the toy checker and counted per cell."""
    from test_reviews import ls_settings

    url, token = ls_settings()
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "bench.sweep_toy",
        "--ls-url",
        url,
        "--ls-token",
        token,
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--n-per-class",
        "6",
        "--classes",
        "lymphocyte,neutrophil",
        "--scales",
        "1,4",
        "--n",
        "2",
        "--sample-steps",
        "2",
        "--no-screenshot",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROTOMED_NO_MALLOC_TUNING": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (out / "sweep.json").read_text()
    assert token not in text
    rep = json.loads(text)
    assert_run_info(rep["run"], "bench.sweep_toy", "--scales", "1,4")
    assert rep["run"]["args"]["classes"] == "lymphocyte,neutrophil"
    assert rep["scales"] == [1.0, 4.0] and rep["n"] == 2 and rep["steps"] == 2
    assert sorted(c["class"] for c in rep["classes"]) == ["lymphocyte", "neutrophil"]
    for c in rep["classes"]:
        assert [e["scale"] for e in c["scales"]] == [1.0, 4.0]
        for e in c["scales"]:
            p = e["plausibility"]
            assert e["generated"] == 2 and p["images"] == 2 and 0 <= p["plausible"] <= 2, e
            assert p["rate"] is None or 0 <= p["rate"] <= 1
        assert c["recommended"] in (None, 1.0, 4.0) and c["reason"]
    assert "8 images reviewed" in r.stdout
    side = json.loads((out / "sweep.csv.run.json").read_text())
    assert side["commit"] == rep["run"]["commit"]


def test_threads_bench_measures_both_policies_under_load(tmp_path: Path) -> None:
    """bench.threads at a toy size: every load level has both policies, with positive times, the
    auto choice's reason, the machine's load before the run, and the run info."""
    out = tmp_path / "threads.json"
    cmd = [sys.executable, "-m", "bench.threads", "--loads", "0", "1", "--repeats", "1"]
    cmd += ["--settle", "0", "--preset", "tiny", "--batch", "2", "--train-steps", "1"]
    cmd += ["--sample-n", "1", "--sample-steps", "1", "--helper-limit", "300", "--out", str(out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert_run_info(res["run"], "bench.threads", "--loads", "0", "1")
    assert len(res["machine_load_before"]) == 3 and res["usable_cores"] >= 1
    summary = {(s["load"], s["policy"]): s for s in res["summary"]}
    assert set(summary) == {(load, p) for load in (0, 1) for p in ("default", "auto")}
    for s in summary.values():
        assert s["train_step_s"] > 0 and s["sample_image_s"] > 0 and s["threads"] >= 1
    auto = [row for row in res["rows"] if row["policy"] == "auto"]
    assert auto and all("usable core" in row["choice"] for row in auto)
