"""Process-wide tuning of glibc's malloc for featurize-heavy processes (CPU).

Why: featurize allocates and frees tensors of tens of MB per chunk (activations, per-example
gradients, their tiles). glibc serves blocks above its mmap threshold (dynamic, at most 32 MB)
with fresh ``mmap`` pages and returns freed memory at the top of the heap to the system, so every
chunk pays page faults and kernel zeroing for the same memory again. Keeping up to ``keep_bytes``
in the heap removes that: on the bundled UNet (2 cores) featurize ran 7-15 % faster
(``benchmarks/README.md``, 2026-11-30). The cost is that the process keeps up to ``keep_bytes`` of
freed memory instead of returning it.

Both settings are needed: a fixed mmap threshold alone still trims the heap (no gain), and a trim
threshold alone fixes glibc's mmap threshold at its 128 KiB start value (2x slower).

This changes the allocator of the whole process, so the library never calls it on its own: the
``attribution featurize`` command does (each torchrun rank too), and so do benchmark workers asked
to (``bench_traker.py --tune-malloc``, for every method alike).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

#: Freed memory kept in the heap, and the largest block served from it (1 GiB).
DEFAULT_KEEP_BYTES = 1 << 30


def tune_malloc(keep_bytes: int = DEFAULT_KEEP_BYTES) -> bool:
    """Serve blocks up to ``keep_bytes`` from the heap and keep up to that much freed memory in it.

    Returns True when glibc accepted every setting; False (nothing changed or partly) on other C
    libraries or when a call fails.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    value = min(int(keep_bytes), 2**31 - 1)  # mallopt takes an int
    return all(mallopt(p, value) == 1 for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD))
