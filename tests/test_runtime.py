"""ml.runtime's thread choice: the setting, the user's OpenMP variable, and ``auto`` from the
usable cores (affinity, cgroup quota) and the machine's load; where the CLI and the workers
apply it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml import runtime
from ml.runtime import ThreadChoice, ThreadSettingError, choose_threads, usable_cores

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fake machine: ``set(cores, load)``; no cgroup limit unless a test writes one."""
    monkeypatch.delenv("PROTOMED_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(runtime, "PROC_CGROUP", tmp_path / "proc_cgroup")

    def set_machine(cores: int, load: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(cores)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    return set_machine


@pytest.mark.parametrize(
    "cores,load,threads",
    [(2, 0.0, 2), (2, 0.3, 2), (2, 1.2, 1), (2, 6.0, 1), (8, 2.6, 5), (1, 0.0, 1), (4, 0.49, 4)],
)
def test_auto_is_the_free_cores_clamped_to_one_and_the_usable_cores(machine, cores, load, threads):
    machine(cores, load)
    choice = choose_threads()
    assert choice.threads == threads
    assert f"{cores} usable core" in choice.reason and f"load {load:.1f}" in choice.reason
    assert choice.line().startswith(f"threads: {threads} (")
    assert "set PROTOMED_THREADS to override" in choice.line()


def test_explicit_setting_wins_over_everything(machine, monkeypatch):
    machine(2, 3.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PROTOMED_THREADS", "3")
    assert choose_threads() == ThreadChoice(3, "PROTOMED_THREADS=3", overridable=False)
    assert choose_threads(4, source="--threads").line() == "threads: 4 (--threads=4)"
    assert choose_threads("auto").threads == 1  # auto asked for: OMP_NUM_THREADS is not used
    monkeypatch.setenv("PROTOMED_THREADS", "auto")
    assert choose_threads().threads == 1


def test_the_users_omp_num_threads_is_respected(machine, monkeypatch):
    machine(2, 3.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    choice = choose_threads()
    assert choice.threads == 2 and choice.reason == "OMP_NUM_THREADS=2 set by the user"
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # OpenMP's nested list: the outer level
    assert choose_threads().threads == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a count OpenMP would use: auto
    assert choose_threads().threads == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", "auto2"])
def test_a_bad_setting_names_the_variable_and_the_allowed_values(machine, monkeypatch, bad):
    machine(2, 0.0)
    monkeypatch.setenv("PROTOMED_THREADS", bad)
    with pytest.raises(ThreadSettingError) as err:
        choose_threads()
    assert f"PROTOMED_THREADS={bad!r}" in str(err.value)
    assert "auto or a whole number of threads >= 1" in str(err.value)
    with pytest.raises(ThreadSettingError, match="--threads="):
        choose_threads(bad, source="--threads")


def test_usable_cores_follow_the_affinity_and_the_cgroup_v2_quota(machine, tmp_path):
    machine(8, 0.0)
    assert usable_cores() == 8
    (tmp_path / "proc_cgroup").write_text("0::/job/step\n")
    step = tmp_path / "cgroup" / "job" / "step"
    step.mkdir(parents=True)
    (step / "cpu.max").write_text("max 100000\n")
    assert usable_cores() == 8
    (step.parent / "cpu.max").write_text("300000 100000\n")  # an ancestor's quota counts too
    assert usable_cores() == 3
    (step / "cpu.max").write_text("150000 100000\n")  # 1.5 cores: a second thread is throttled
    assert usable_cores() == 1
    (step / "cpu.max").write_text("50000 100000\n")
    assert usable_cores() == 1
    assert choose_threads().threads == 1


def test_usable_cores_follow_the_cgroup_v1_quota(machine, tmp_path):
    machine(4, 0.0)
    cpu = tmp_path / "cgroup" / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores() == 4
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    assert usable_cores() == 2


def test_apply_sets_torch_and_says_one_line(machine):
    said: list[str] = []
    runtime.apply_threads(ThreadChoice(1, "PROTOMED_THREADS=1", overridable=False), said.append)
    assert torch.get_num_threads() == 1
    assert said == ["threads: 1 (PROTOMED_THREADS=1)"]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "ml.cli", *args], env=full, capture_output=True, text=True
    )


def test_the_cli_says_what_it_chose_on_stderr(tmp_path):
    from ml.data.toy import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", n_per_class=1)
    proc = _cli("check", str(tmp_path / "toy"), PROTOMED_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads: 1 (PROTOMED_THREADS=1)" in proc.stderr.splitlines()
    assert "threads:" not in proc.stdout  # stdout stays the command's output (JSON here)

    proc = _cli("check", str(tmp_path / "toy"), PROTOMED_THREADS="many")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: PROTOMED_THREADS='many' is not valid: use auto or a whole number of threads >= 1"
    )
    help_ = _cli("check", "--help", PROTOMED_THREADS="many")  # help needs no threads
    assert help_.returncode == 0 and "threads:" not in help_.stderr + help_.stdout


def test_the_worker_process_applies_the_threads_setting(monkeypatch, caplog):
    import logging

    from service.config import Settings, get_settings
    from workers import tasks

    monkeypatch.setenv("PROTOMED_THREADS", "1")
    get_settings.cache_clear()
    try:
        assert get_settings().threads == "1"
        torch.set_num_threads(2)
        with caplog.at_level(logging.INFO, logger="workers.tasks"):
            tasks._threads()
        assert torch.get_num_threads() == 1
        assert "threads: 1 (PROTOMED_THREADS=1)" in caplog.messages
    finally:
        get_settings.cache_clear()
    with pytest.raises(ValueError, match="threads"):
        Settings(threads="lots")


def test_openmp_waits_passively_on_a_busy_machine_unless_the_user_chose(machine, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as before torch is loaded; restored after
    machine(2, 0.3)  # quiet: libgomp's spinning is faster there
    assert not runtime.prefer_passive_wait(env := {}) and env == {}
    machine(2, 1.1)
    assert runtime.prefer_passive_wait(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for mine in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}):
        assert not runtime.prefer_passive_wait(dict(mine))
    monkeypatch.setitem(sys.modules, "torch", torch)  # too late once torch is loaded
    assert not runtime.prefer_passive_wait(env := {}) and env == {}


@pytest.mark.parametrize("entry", ["ml.cli", "bench", "workers.celery_app"])
@pytest.mark.parametrize("load,policy", [(9.0, "PASSIVE"), (0.0, None)])
def test_every_entry_point_sets_the_wait_policy_before_torch_loads(entry, load, policy):
    code = (
        f"import os, sys; os.getloadavg = lambda: ({load}, {load}, {load}); import {entry}; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_POLICY_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout.split() == [str(policy), "False"], proc.stderr[-2000:]
