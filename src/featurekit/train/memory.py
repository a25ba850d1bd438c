"""Keep freed memory for reuse in a training process (glibc Linux; a no-op elsewhere).

A training step allocates the same large temporaries every step (the (batch × latents) pre-activation
matrix is 128 MiB at 4,096 × 8,192 in fp32). glibc serves blocks above its mmap threshold (≤ 32 MiB)
with fresh `mmap`s and unmaps them on free, so every step pays the kernel's page faults and zeroing
for them again, where reusing a heap block costs nothing (the saving is measured in BENCHMARKS.md,
"Numbers formerly in code comments").
`keep_freed_memory()` tells glibc to serve every block from its heap and never give freed heap memory
back (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = ∞), as the jemalloc/tcmalloc preloads recommended for
PyTorch on CPU would. The process's resident memory then stays at its peak instead of shrinking
between steps; the peak itself does not grow (tests/train/test_memory.py).

The `featurekit` command calls it for a training run when `train.keep_freed_memory` is true (the default);
the setting is process-wide and stays for the life of the process, so the library never applies it on its
own: a Python user who wants it calls `keep_freed_memory()`. `_done` caches the outcome (it can run once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_done = {"ok": None}


def keep_freed_memory() -> bool:
    """Apply the glibc settings once; True when they are in force (glibc found and accepted them)."""
    if _done["ok"] is None:
        _done["ok"] = _apply()
    return _done["ok"]


def _apply() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
