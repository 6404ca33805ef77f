"""Helpers with no attribution logic: atomic file writes, path guards, the allocator setting.

The command modules :mod:`attribution.tools.assets` and :mod:`attribution.tools.doctor` use the
whole core and are imported by the CLI only, not here."""

from .allocator import (
    DEFAULT_KEEP_BYTES,
    tune_malloc,
)
from .files import (
    atomic_save_npy,
    atomic_write_bytes,
    sha256_file,
)
from .threads import (
    THREADS_ENV,
    configure_torch_threads,
)
from .paths import (
    MAX_NAME,
    PathEscapeError,
    resolve_within,
    safe_name,
)

__all__ = [
    "DEFAULT_KEEP_BYTES",
    "MAX_NAME",
    "THREADS_ENV",
    "PathEscapeError",
    "atomic_save_npy",
    "atomic_write_bytes",
    "configure_torch_threads",
    "resolve_within",
    "safe_name",
    "sha256_file",
    "tune_malloc",
]
