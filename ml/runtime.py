"""Process-level tuning for CPU runs.

glibc's default malloc serves every large tensor with a fresh ``mmap`` and hands freed memory
back to the kernel, so each training step page-faults through its activations again: measured at
about a million faults per batch on the 64x64 UNet, and steps 1.3-1.6x slower than with the
thresholds below. Raising the thresholds keeps that memory in the process. ``mallopt`` does at
run time what the ``MALLOC_*_`` environment variables do at start-up, so the CLI needs no wrapper
script.

Threads. torch's default is one intra-op thread per core, right on a quiet machine; on one other
jobs are using, every parallel region waits for its slowest thread, the one sharing a core.
:func:`choose_threads` takes ``PROTOMED_THREADS`` (``auto`` or N), else the user's
``OMP_NUM_THREADS``, else ``auto``: the usable cores (affinity, cgroup CPU quota) less the
1-minute load average, rounded, clamped to [1, usable cores]. It is chosen once, at start-up;
a long run does not follow the load as it changes. The CLI, the workers and the benches apply it
and say what they chose in one line.

The wait policy. PyTorch's Linux CPU build runs its intra-op parallelism on GNU OpenMP (the
``libgomp`` it ships in ``torch/lib``; ``torch.__config__.parallel_info()`` says "OpenMP"), and
MKL's threads go through it too. With ``OMP_WAIT_POLICY`` unset, a libgomp thread that reaches
a barrier spins 300,000 times before sleeping (``GOMP_SPINCOUNT``), between every two parallel
regions: on a busy core the spinning thread takes the time the thread it waits for needs.
Measured with ``bench.threads`` (cpu-small, batch 8, medians of 2-3 interleaved runs in fresh
processes, 2 cores; the machine is shared with other jobs, so the numbers are noisy but the
gaps are not), seconds per training step for 2 threads spinning / passive / 1 thread:

- other jobs at load ~4, plus 0 / 1 busy-loop helper: 1.74 / 0.32 / 0.67 and 7.10 / 0.50 /
  0.58; sampling 1.83 / 0.17 / 0.37 and 3.16 / 0.16 / 0.25 s per image;
- a quiet machine (no other jobs; load average 0.2 before the first of two runs): 0.19 / 0.27
  / 0.29, sampling 0.074 / 0.127 / 0.106; with one helper: 0.74 / 0.39 / 0.34. A shorter
  spin (``GOMP_SPINCOUNT=10000``) kept the quiet speed (0.18) but did not help with the
  helper (0.74).

So passive waiting is 1.4-1.7x slower on a quiet machine and several times faster on a busy
one, and one thread needs no team to wait for. protomed sets ``OMP_WAIT_POLICY=PASSIVE`` only
when the machine is busy (:func:`prefer_passive_wait`, the same test that makes ``auto`` take
fewer threads than cores), when ``ml`` or ``bench`` is imported, before torch loads libgomp,
and never over a user's ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ml.errors import Invalid

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 << 20),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, (1 << 31) - 1),  # mallopt takes a C int
    "MALLOC_TOP_PAD_": (_M_TOP_PAD, 512 << 20),
}


def tune_allocator() -> bool:
    """Apply the malloc thresholds unless the user set them; True if glibc accepted them."""
    if not sys.platform.startswith("linux") or os.environ.get("PROTOMED_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = True
    for env, (param, value) in _SETTINGS.items():
        if env not in os.environ:
            ok = bool(libc.mallopt(param, value)) and ok
    log.debug("malloc thresholds tuned: %s", ok)
    return ok


# Threads ---------------------------------------------------------------------------------------


def prefer_passive_wait(environ: MutableMapping[str, str] | None = None) -> bool:
    """``OMP_WAIT_POLICY=PASSIVE`` for this process and the ones it starts when other processes
    load the usable cores (:func:`machine_is_busy`), unless the user chose a wait policy
    (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) or torch is imported already: libgomp reads its
    environment once, when torch loads it, so a later change does nothing. True if it set the
    variable. Why only when busy: see the module's docstring."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(name in env for name in WAIT_POLICY_ENV):
        return False
    if not machine_is_busy():
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


THREADS_ENV = "PROTOMED_THREADS"
AUTO = "auto"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
WAIT_POLICY_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_interop_set = False


class ThreadSettingError(Invalid):
    """A thread setting that is neither ``auto`` nor a whole number of threads >= 1."""


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads torch gets, and why (shown to the user in one line)."""

    threads: int
    reason: str
    overridable: bool = True  # chosen by protomed (auto, or the user's OMP_NUM_THREADS)

    def line(self) -> str:
        hint = f"; set {THREADS_ENV} to override" if self.overridable else ""
        return f"threads: {self.threads} ({self.reason}{hint})"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_v2_limit() -> float | None:
    """The tightest ``cpu.max`` quota from this process's cgroup up to the root (v2)."""
    text = _read(PROC_CGROUP) or ""
    rel = next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), None)
    if rel is None:
        return None
    limits: list[float] = []
    group = CGROUP_ROOT / rel.lstrip("/")
    for folder in (group, *group.parents):
        quota = (_read(folder / "cpu.max") or "").split()
        if len(quota) == 2 and quota[0] != "max":
            with contextlib.suppress(ValueError):
                limits.append(int(quota[0]) / int(quota[1]))
        if folder == CGROUP_ROOT:
            break
    return min(limits) if limits else None


def _cgroup_v1_limit() -> float | None:
    """``cpu.cfs_quota_us / cpu.cfs_period_us`` of the v1 cpu controller, -1 meaning none."""
    for name in ("cpu", "cpu,cpuacct"):
        quota, period = (
            _read(CGROUP_ROOT / name / f) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        )
        if quota and period:
            with contextlib.suppress(ValueError):
                q, p = int(quota), int(period)
                return q / p if q > 0 and p > 0 else None
    return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, cut to a container's CPU quota
    (cgroup v2 ``cpu.max``, else v1 ``cfs_quota_us``). ``os.cpu_count()`` counts the host's
    cores, which a container or ``taskset`` may not let us use; a quota of 1.5 cores gives 1
    (threads beyond the quota are throttled, not run)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    cores = len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)
    quota = _cgroup_v2_limit()
    if quota is None:
        quota = _cgroup_v1_limit()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def other_load() -> float:
    """The 1-minute load average: the runnable processes the machine already has before this
    one starts its work (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _auto_threads(cores: int, load: float) -> int:
    return min(cores, max(1, round(cores - load)))


def machine_is_busy() -> bool:
    """Other processes load the usable cores enough that ``auto`` takes fewer threads than
    there are cores (a 1-minute load average above 0.5)."""
    cores = usable_cores()
    return _auto_threads(cores, other_load()) < cores


def _parse(value: str | int, source: str) -> int | None:
    """``None`` for ``auto``, else the thread count; anything else is refused, naming ``source``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n: int | None = value
    elif isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    else:
        try:
            n = int(str(value).strip())
        except ValueError:
            n = None
    if n is None or n < 1:
        raise ThreadSettingError(
            f"{source}={value!r} is not valid: use {AUTO} or a whole number of threads >= 1"
        )
    return n


def choose_threads(
    setting: str | int | None = None,
    *,
    source: str = THREADS_ENV,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """The intra-op thread count for this process.

    In order: ``setting`` (a ``--threads`` option or the service's ``threads`` setting; its name
    is ``source``), else ``PROTOMED_THREADS``, else a number the user gave OpenMP in
    ``OMP_NUM_THREADS``, else ``auto``. ``auto`` is the usable cores less the load the other
    processes already put on them (the 1-minute load average), rounded and clamped to
    [1, usable cores]: torch's own default, one thread per core, is right on a quiet machine
    but on a busy one every parallel region waits for the thread that shares its core, and a
    step takes 2-3 times as long as with the threads the free cores can actually run.
    """
    env = os.environ if environ is None else environ
    if setting is None or (isinstance(setting, str) and not setting.strip()):
        setting, source = env.get(THREADS_ENV) or None, THREADS_ENV
    if setting is not None:
        n = _parse(setting, source)
        if n is not None:
            return ThreadChoice(n, f"{source}={n}", overridable=False)
    else:
        omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        if omp.isdigit() and int(omp) >= 1:
            return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp} set by the user")
    cores, load = usable_cores(), other_load()
    threads = _auto_threads(cores, load)
    plural = "s" if cores != 1 else ""
    reason = f"{cores} usable core{plural}, load {load:.1f} from other processes"
    return ThreadChoice(threads, reason)


def apply_threads(choice: ThreadChoice, say: Callable[[str], None] | None = None) -> ThreadChoice:
    """Give torch ``choice.threads`` intra-op threads (MKL and OpenMP follow) and the same
    number of inter-op threads, the latter once per process and only while torch still allows
    it (it refuses once inter-op work has started); report the choice through ``say`` (default:
    this module's logger at INFO). The choice is made once, at start-up: a long run does not
    follow the load as it changes."""
    global _interop_set
    import torch

    torch.set_num_threads(choice.threads)
    if not _interop_set:
        _interop_set = True
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(choice.threads)
    (say or log.info)(choice.line())
    return choice


def configure_threads(
    setting: str | int | None = None,
    *,
    source: str = THREADS_ENV,
    say: Callable[[str], None] | None = None,
) -> ThreadChoice:
    """:func:`choose_threads` then :func:`apply_threads`: what every entry point calls."""
    return apply_threads(choose_threads(setting, source=source), say)
