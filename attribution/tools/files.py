"""Atomic file writes (write a temporary file, then rename) and content hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["atomic_save_npy", "atomic_write_bytes", "sha256_file"]


def _replace_from_tmp(path: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` then rename ``tmp`` to ``path``; on any failure remove ``tmp``, keep ``path``."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _replace_from_tmp(path, path.with_name(f".{path.name}.tmp{os.getpid()}"), write)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())

    _replace_from_tmp(path, path.with_name(f".{path.name}.tmp{os.getpid()}.npy"), write)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
