"""A disk cache of the kernels K_m = Phi_m^T Phi_m of stores that do not keep them.

A read-only store (the bundled one, a store shipped without its ``kernel_{m}.npy``) has its
kernels computed from Phi when it is first queried: one float64 pass over every feature row,
about 2 s for 4,000 rows at d = 2,048, paid by the first page of every fresh server. The
cache keeps each kernel in ``cache_dir`` under a key bound to the store's content, so the next
server reads it instead (32 MiB at d = 2,048).

Key (:func:`kernel_cache_key`): sha256 over the manifest's settings, dataset and checkpoint entries, the checkpoint index
and the rows' recorded CRC-32s (or, for a store without checksums, the feature file's bytes).
A changed row changes its CRC and so the key; a cache file that is unreadable or of the wrong
shape is recomputed and replaced, never trusted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..tools.files import atomic_save_npy

__all__ = ["kernel_cache_key", "cached_kernel"]


def kernel_cache_key(manifest: dict[str, Any], m: int, row_crcs: np.ndarray | None, done: np.ndarray,
                     features_path: Path) -> str:
    """Hex key of checkpoint ``m``'s kernel: changes whenever its features or settings do.

    Args:
        manifest: the store's manifest (its settings, dataset, checkpoints, sizes are bound).
        row_crcs: (N,) uint32 recorded CRC-32 of each row, or None for a store without checksums
            (then the bytes of ``features_path`` are hashed instead).
        done: (N,) uint8 done flags of checkpoint ``m``.
    """
    h = hashlib.sha256()
    bound = {k: manifest.get(k) for k in ("settings", "dataset", "checkpoints", "proj_dim", "num_params")}
    h.update(json.dumps(bound, sort_keys=True, default=str).encode())
    h.update(f"checkpoint {m}".encode())
    h.update(np.ascontiguousarray(done).tobytes())
    if row_crcs is not None:
        h.update(np.ascontiguousarray(row_crcs).tobytes())
    else:
        with open(features_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def cached_kernel(key: str, dim: int, compute: Callable[[], np.ndarray], cache_dir: Path) -> np.ndarray:
    """(dim, dim) float64 kernel named ``key``: read from ``cache_dir`` if cached there, else
    ``compute()`` d and saved (atomically) for the next time."""
    path = Path(cache_dir) / f"kernel-{key}.npy"
    if path.exists():
        try:
            kernel = np.load(path, allow_pickle=False)
            if kernel.shape == (dim, dim) and kernel.dtype == np.float64:
                return kernel
        except (OSError, ValueError, EOFError):
            pass  # unreadable: recomputed and replaced below
    kernel = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, kernel)
    except OSError:
        pass  # a cache that cannot be written only costs the next start the computation
    return kernel
