"""How many intra-op torch threads a process that scores in several Python threads uses."""

from __future__ import annotations

import os

THREADS_ENV = "ATTRIBUTION_TORCH_THREADS"


def configure_torch_threads() -> int:
    """One intra-op torch thread per Python thread by default (``$ATTRIBUTION_TORCH_THREADS`` overrides).

    The app scores the step on screen and prefetches the others in a background
    thread; with torch's default of one OpenMP thread per core,
    the two fight over the cores, and on a busy 2-core machine a UNet forward
    measured 100x slower (0.56 s instead of 5.6 ms; one journey step 18-250 s
    instead of 0.5-1 s).
    """
    import torch

    n = int(os.environ.get(THREADS_ENV, "1"))
    torch.set_num_threads(n)
    return n
