"""Process-level tuning for CPU runs.

glibc's default malloc serves every large tensor with a fresh ``mmap`` and hands freed memory
back to the kernel, so each training step page-faults through its activations again: measured at
about a million faults per batch on the 64x64 UNet, and steps 1.3-1.6x slower than with the
thresholds below. Raising the thresholds keeps that memory in the process. ``mallopt`` does at
run time what the ``MALLOC_*_`` environment variables do at start-up, so the CLI needs no wrapper
script.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

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
