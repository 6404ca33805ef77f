"""On-disk feature store: the contract between featurizing (slow) and scoring (fast).

Layout of a store directory::

    manifest.json        format version, featurize settings, checkpoint hashes, training
                         objective, dataset fingerprint, shapes, dtypes, file sizes, kernel checksums
    features_{m}.npy     (N, d) train features Phi_m of checkpoint m (memory-mapped .npy)
    done_{m}.npy         (N,) uint8: 1 where row i of features_{m} is finished
    rowcrc_{m}.npy       (N,) uint32: CRC-32 of the bytes of row i, recorded when it was written
    kernel_{m}.npy       (d, d) float64 Phi_m^T Phi_m, written by :meth:`Store.finalize`
    built_with.json      the settings the rows were computed with and their sha256
                         (also recorded in the manifest as ``settings_sha256``)
    .lock                held (``flock``) by the process featurizing the store; names it

Settings binding: every setting that changes the features (the featurize
settings, checkpoint hashes, training objective, dataset fingerprint, parameter
count, projection layout) is hashed when the store is created and written both into the manifest
and into ``built_with.json`` beside the rows. :meth:`Store.open` recomputes the
hash from the manifest and compares the two files, so an edited setting or a
manifest copied from another store is refused, naming the setting. Stores built
before the binding existed have neither; for them only recomputing rows from the
models (``attribution doctor``, :mod:`attribution.features.verify`) catches an edit.

Crash safety: a row is written and flushed, then its checksum, then its done
flag, so a killed featurize never leaves a half-written row marked done;
rerunning resumes at the first row not marked. The manifest and kernels are
written to a temporary file and renamed (a failed write, e.g. a full disk,
leaves the previous file in place). Array files are allocated in full when the
store is created, so a full disk shows up then and not as a crash mid-run.

Verification, cheap at open and complete where the data is read anyway:
  * :meth:`Store.open`: the manifest parses, has this format version and the
    expected keys; every array file exists with the recorded byte size, shape
    and dtype; with a spec, settings, checkpoints and dataset match.
  * every row read through :meth:`Store.read_rows` (scoring, finalize) is
    checked once per open store against its recorded CRC-32: a done row whose
    bytes were edited, or that was marked done but never written, raises
    :class:`StoreError` before any score is computed from it.
  * kernels are checked against their sha256 when loaded.
  * featurize, on resuming, recomputes done rows that fail their checksum.
  * ``attribution doctor`` (:mod:`attribution.tools.doctor`) runs all of these at once.
Stores written before row checksums existed (no ``rowcrc_*`` in the manifest)
are read unverified; ``attribution doctor --record-checksums`` adds them. The kernel (not A = Phi K^-1) is
cached: it does not depend on the ridge lambda, and scoring with
``Phi (K + lambda I)^-1 g`` costs the same as ``A g`` while halving the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import FeaturizeConfig
from ..tools.files import _replace_from_tmp, atomic_save_npy, atomic_write_bytes, sha256_file
from .kernel_cache import cached_kernel, kernel_cache_key

FORMAT_VERSION = 1
MANIFEST_KEYS = ("settings", "checkpoints", "dataset", "num_params", "proj_dim", "arrays", "kernels")
STREAM_CHUNK_ROWS = 16384  # rows per chunk when streaming Phi (bounded memory, see Store.iter_chunks)
Progress = Callable[[int, int], None]


class StoreError(RuntimeError):
    """A store is missing, corrupt, unfinished or built for something else."""


class StoreBusyError(StoreError):
    """Another process (or thread) holds the store's lock: it is being featurized."""


BINDING_FILE = "built_with.json"
LOCK_FILE = ".lock"
#: Manifest entries that change what the rows hold; hashed into the settings binding.
BOUND_KEYS = ("settings", "checkpoints", "dataset", "num_params", "proj_dim", "projection_layout", "objective")


def bound_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The result-changing part of a manifest, flattened to ``name -> value`` (checkpoint paths left out)."""
    out: dict[str, Any] = {f"settings.{k}": v for k, v in manifest.get("settings", {}).items()}
    for m, ck in enumerate(manifest.get("checkpoints", [])):
        out[f"checkpoints[{m}].hash"] = ck.get("hash")
    ds = manifest.get("dataset", {})
    for k in ("fingerprint", "num_train", "image_shape"):
        out[f"dataset.{k}"] = ds.get(k)
    for k in ("num_params", "proj_dim", "projection_layout"):
        out[k] = manifest.get(k)
    if "objective" in manifest:  # only where recorded, so stores built before it keep their binding
        out["objective"] = manifest["objective"]
    return out


def objective_mismatch(recorded: dict[str, str] | None, identity: dict[str, str]) -> str | None:
    """Say how the objective a store was built for (``manifest.get("objective")``) differs from a model's
    ``objective.identity`` (None: same). Stores built before the objective was recorded are epsilon stores."""
    recorded = recorded or {"kind": "epsilon"}
    if recorded.get("kind") != identity["kind"]:
        return (f"the training objective differs: the store was built for a {recorded.get('kind')!r} model, "
                f"the model is {identity['kind']!r}")
    if "schedule_sha256" in recorded and recorded["schedule_sha256"] != identity["schedule_sha256"]:
        return (f"the noise schedule of the {identity['kind']!r} objective differs: the store was built with "
                f"{recorded['schedule_sha256'][:12]}..., the model has {identity['schedule_sha256'][:12]}...")
    if recorded.get("train_guidance") != identity.get("train_guidance"):
        return (f"the guidance embedding of the training loss differs: the store was built with "
                f"{recorded.get('train_guidance') or 'none'}, the model uses {identity.get('train_guidance') or 'none'}")
    return None


def settings_hash(bound: dict[str, Any]) -> str:
    """sha256 of :func:`bound_settings` (canonical JSON)."""
    return hashlib.sha256(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_binding(root: Path, manifest: dict[str, Any]) -> None:
    """Record the manifest's result-changing settings beside the rows and their hash in the manifest."""
    bound = bound_settings(manifest)
    digest = settings_hash(bound)
    atomic_write_bytes(root / BINDING_FILE, json.dumps({"sha256": digest, "settings": bound}, indent=1).encode())
    manifest["settings_sha256"] = digest


def _check_binding(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose result-changing settings are not those the rows were built with.

    Legacy stores (no ``settings_sha256`` and no binding file) pass: see the module doc.
    """
    path = root / BINDING_FILE
    recorded = manifest.get("settings_sha256")
    if recorded is None and not path.exists():
        return
    fix = "restore the store's original manifest.json, or featurize a new store with the settings you want"
    bound = bound_settings(manifest)
    if not path.exists():
        raise StoreError(f"store {root} lacks {BINDING_FILE}, which its manifest says it was built with; {fix}")
    try:
        built = json.loads(path.read_text())
        built_settings, built_hash = dict(built["settings"]), str(built["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is unreadable ({e}); {fix}") from e
    for key in sorted(set(bound) | set(built_settings)):
        if bound.get(key) != built_settings.get(key):
            raise StoreError(
                f"store {root}: the manifest has {key} = {bound.get(key)!r} but the features were built with "
                f"{built_settings.get(key)!r} ({BINDING_FILE}): the manifest was edited or comes from another store; {fix}"
            )
    digest = settings_hash(bound)
    if built_hash != digest or (recorded is not None and recorded != digest):
        raise StoreError(f"store {root}: the settings hash in {BINDING_FILE} or the manifest was edited; {fix}")


_HELD: dict[str, tuple[int, int, int]] = {}  # resolved lock path -> (fd, thread id, depth)
_HELD_LOCK = threading.Lock()


def _lock_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"PID {info['pid']} on {info['host']} since {info['since']} "
                f"({info['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def store_lock(root: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of the store directory ``root`` (created if absent) for the block.

    The lock is an ``flock`` on ``root/.lock``, released by the OS when its holder dies
    (a killed featurize never leaves a store locked). The holder's PID, host, start
    time and command are written into the file, so a refused caller can say who
    holds it. Reentrant within one thread (the CLI takes it before loading models,
    :func:`~attribution.features.featurize.featurize` again inside).

    Raises:
        StoreBusyError: another process or thread holds it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    key = str(path.resolve())
    me = threading.get_ident()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and held[1] == me:
            _HELD[key] = (held[0], me, held[2] + 1)
            fd = -1
        elif held is not None:
            raise StoreBusyError(f"store {root} is in use by another thread of this process (PID {os.getpid()})")
        else:
            fd = _acquire(path, root)
            _HELD[key] = (fd, me, 1)
    try:
        yield
    finally:
        with _HELD_LOCK:
            fd, _, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (fd, me, depth - 1)
            else:
                del _HELD[key]
                path.unlink(missing_ok=True)  # while still locked: a later caller makes a fresh file
                os.close(fd)


def _acquire(path: Path, root: Path) -> int:
    """Open and ``flock`` ``path`` (exclusive, non-blocking), write the holder's details; returns the fd."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusyError(
                f"store {root} is in use by {_lock_holder(path)}; wait for it to finish or stop it, "
                "then rerun (a stopped featurize resumes)"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and lock: try the new one
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "python"}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _allocate_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Create a zero-filled .npy of ``shape`` whose blocks are all allocated (not sparse).

    A sparse file would fail on a full disk only when a page is first written
    through the memory map, and that kills the process with SIGBUS.
    """

    def write(tmp: Path) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
        fd = os.open(tmp, os.O_RDWR)
        try:
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            os.fsync(fd)
        finally:
            os.close(fd)

    _replace_from_tmp(path, path.with_name(f".{path.name}.tmp{os.getpid()}.npy"), write)


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete temporary files under ``root`` left by killed writers (their process id is gone)."""
    removed = []
    for tmp in root.glob(".*.tmp*"):
        digits = tmp.name.rsplit(".tmp", 1)[1].split(".")[0]
        if not digits.isdigit() or int(digits) == os.getpid():
            continue
        try:
            os.kill(int(digits), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """(B,) uint32 CRC-32 of the bytes of each row of a C-contiguous (B, d) array."""
    rows = np.ascontiguousarray(rows)
    return np.fromiter((zlib.crc32(r) for r in rows), dtype=np.uint32, count=len(rows))


def _check_npy_header(path: Path, info: dict[str, Any]) -> None:
    """Refuse a .npy whose header does not parse or disagrees with the manifest's shape and dtype."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)  # the header only (a literal, no pickle)
    except (ValueError, OSError, SyntaxError) as e:
        raise StoreError(f"{path} is not a valid .npy file ({e}); delete the store and featurize again") from e
    if list(shape) != info["shape"] or dtype.str != info["dtype"]:
        raise StoreError(
            f"{path} holds {shape} {dtype.str}, the manifest records {tuple(info['shape'])} {info['dtype']}; "
            "delete the store and featurize again"
        )


def settings_mismatch(built: dict[str, Any], config: FeaturizeConfig) -> str | None:
    """Say which featurize setting of ``config`` (resolved) differs from a manifest's ``built`` settings (None: none)."""
    want = config.resolved().to_dict()
    for key in sorted(set(built) | set(want)):
        if built.get(key) != want.get(key):
            return f"setting {key!r} differs: the store was built with {built.get(key)!r}, now {want.get(key)!r}"
    return None


def _components_differ(built: dict[str, Any], now: dict[str, Any]) -> str:
    """`` in its text_encoder_2`` (the components whose hashes differ), or ``""`` when either entry has none."""
    a, b = built.get("components") or {}, now.get("components") or {}
    if not a or not b:
        return ""
    names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if not names:  # same components, other adapter (LoRA) or extra settings folded into the hash
        return " in its adapter or settings"
    return f" in its {', '.join(names)}"


@dataclass(frozen=True)
class StoreSpec:
    """What a store is built for; two specs must match for a store to be reused.

    Attributes:
        config: featurize settings.
        checkpoints: one ``{"path": ..., "hash": ...[, "components": {name: hash}]}`` per checkpoint, in order.
        dataset: ``{"name", "fingerprint", "num_train", "image_shape"}``.
        num_params: number of differentiated parameters p.
        projection_layout: version of a structured projection's layout (factorized:
            :data:`attribution.features.projection.factorized.LAYOUT_VERSION`), None for the others.
        objective: the models' ``objective.identity`` (``{"kind", "schedule_sha256"}``), or None (not checked).
    """

    config: FeaturizeConfig
    checkpoints: tuple[dict[str, Any], ...]
    dataset: dict[str, Any]
    num_params: int
    projection_layout: int | None = None
    objective: dict[str, str] | None = None

    @property
    def proj_dim(self) -> int:
        return self.num_params if self.config.proj_kind == "identity" else self.config.proj_dim

    def mismatch(self, manifest: dict[str, Any]) -> str | None:
        """Say, in words, how ``manifest`` differs from this spec (None if it does not)."""
        why = settings_mismatch(manifest["settings"], self.config)
        if why is not None:
            return why
        if self.objective is not None:
            why = objective_mismatch(manifest.get("objective"), self.objective)
            if why is not None:
                return why
        old_ck = manifest["checkpoints"]
        if len(old_ck) != len(self.checkpoints):
            return f"the store holds {len(old_ck)} checkpoints, {len(self.checkpoints)} were given"
        for m, (a, b) in enumerate(zip(old_ck, self.checkpoints)):
            if a["hash"] != b["hash"]:
                return (
                    f"checkpoint {m} differs{_components_differ(a, b)}: the store was built for {a['path']} "
                    f"(sha256 {a['hash'][:12]}...), now {b['path']} (sha256 {b['hash'][:12]}...)"
                )
        old_ds = manifest["dataset"]
        if old_ds["fingerprint"] != self.dataset["fingerprint"]:
            return (
                f"the dataset differs: the store was built for {old_ds.get('name')!r} with "
                f"{old_ds['num_train']} examples (fingerprint {old_ds['fingerprint'][:12]}...), now "
                f"{self.dataset.get('name')!r} with {self.dataset['num_train']} (fingerprint "
                f"{self.dataset['fingerprint'][:12]}...)"
            )
        if manifest["num_params"] != self.num_params:
            return f"the number of parameters differs: {manifest['num_params']} in the store, {self.num_params} now"
        if manifest.get("projection_layout") != self.projection_layout:
            return (
                f"the {self.config.proj_kind} projection layout differs: the store was built with layout "
                f"{manifest.get('projection_layout')}, this program uses {self.projection_layout}; rebuild the store"
            )
        return None


class Store:
    """A feature store directory; see the module doc for the layout."""

    def __init__(self, root: Path, manifest: dict[str, Any], writable: bool):
        self.root = root
        self.manifest = manifest
        self.writable = writable
        self._features: dict[int, np.memmap] = {}
        self._done: dict[int, np.memmap] = {}
        self._kernels: dict[int, np.ndarray] = {}
        self._checksums: dict[int, np.memmap] = {}
        self._verified: dict[int, np.ndarray] = {}  # (N,) bool: rows whose checksum was checked
        self.kernel_cache: Path | None = None  # where kernels computed from Phi are kept (kernel_cache.py)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create_or_open(cls, root: str | Path, spec: StoreSpec) -> "Store":
        """Open the store at ``root`` for writing, creating it if absent.

        Raises:
            StoreError: the existing store was built for another spec (the message says what differs).
        """
        root = Path(root)
        if (root / "manifest.json").exists():
            store = cls.open(root, spec, writable=True)
            remove_stale_tmp(root)
            return store
        root.mkdir(parents=True, exist_ok=True)
        n, d = spec.dataset["num_train"], spec.proj_dim
        dtype = np.dtype(spec.config.store_dtype)
        arrays: dict[str, Any] = {}
        for m in range(len(spec.checkpoints)):
            for name, shape, dt in (
                (f"features_{m}.npy", (n, d), dtype),
                (f"done_{m}.npy", (n,), np.uint8),
                (f"rowcrc_{m}.npy", (n,), np.uint32),
            ):
                _allocate_npy(root / name, shape, np.dtype(dt))
                arrays[name] = {"shape": list(shape), "dtype": np.dtype(dt).str, "bytes": (root / name).stat().st_size}
        manifest = {
            "format_version": FORMAT_VERSION,
            "settings": spec.config.to_dict(),
            "checkpoints": [dict(c) for c in spec.checkpoints],
            "dataset": dict(spec.dataset),
            "num_params": spec.num_params,
            "proj_dim": d,
            "arrays": arrays,
            "kernels": {},
        }
        if spec.projection_layout is not None:
            manifest["projection_layout"] = spec.projection_layout
        if spec.objective is not None:
            manifest["objective"] = dict(spec.objective)
        _write_binding(root, manifest)
        atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode())
        return cls(root, manifest, writable=True)

    @classmethod
    def open(cls, root: str | Path, spec: StoreSpec | None = None, writable: bool = False) -> "Store":
        """Open an existing store, check its files, and (if ``spec`` is given) that it matches.

        Raises:
            StoreError: missing, from another format version, truncated arrays, or a mismatch.
        """
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise StoreError(f"no store at {root} (manifest.json missing); build one with `attribution featurize`")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path} is not valid JSON ({e}); delete the store and featurize again") from e
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise StoreError(
                f"store {root} has format version {version}, this program reads version {FORMAT_VERSION}; "
                "featurize again into a new directory"
            )
        missing = [k for k in MANIFEST_KEYS if k not in manifest]
        if missing:
            raise StoreError(f"{path} lacks {', '.join(missing)}: it was edited or cut short; delete the store and featurize again")
        for name, info in manifest["arrays"].items():
            f = root / name
            if not f.exists():
                raise StoreError(f"store {root} is missing {name}; featurize again to rebuild it")
            if f.stat().st_size != info["bytes"]:
                raise StoreError(
                    f"{f} has {f.stat().st_size} bytes, the manifest records {info['bytes']}: the file is "
                    "truncated or was replaced; delete the store and featurize again"
                )
            _check_npy_header(f, info)
        _check_binding(root, manifest)
        if spec is not None:
            why = spec.mismatch(manifest)
            if why is not None:
                raise StoreError(f"store {root} does not match: {why}. Use another --store directory or rebuild it.")
        return cls(root, manifest, writable)

    # ------------------------------------------------------------------ shape info
    @property
    def num_checkpoints(self) -> int:
        return len(self.manifest["checkpoints"])

    @property
    def num_train(self) -> int:
        return int(self.manifest["dataset"]["num_train"])

    @property
    def proj_dim(self) -> int:
        return int(self.manifest["proj_dim"])

    @property
    def config(self) -> FeaturizeConfig:
        return FeaturizeConfig.from_dict(self.manifest["settings"])

    # ------------------------------------------------------------------ arrays
    def _memmap(self, name: str) -> np.memmap:
        info = self.manifest["arrays"][name]
        try:
            arr = np.load(self.root / name, mmap_mode="r+" if self.writable else "r", allow_pickle=False)
        except ValueError as e:
            raise StoreError(f"{self.root / name} is not a valid .npy file ({e}); delete the store and featurize again") from e
        if list(arr.shape) != info["shape"] or arr.dtype.str != info["dtype"]:
            raise StoreError(f"{self.root / name} has shape {arr.shape} {arr.dtype}, manifest says {info}")
        return arr

    def features(self, m: int) -> np.memmap:
        """(N, d) memory-mapped features of checkpoint m (rows valid only where done)."""
        if m not in self._features:
            self._features[m] = self._memmap(f"features_{m}.npy")
        return self._features[m]

    def done(self, m: int) -> np.memmap:
        """(N,) uint8 done flags of checkpoint m."""
        if m not in self._done:
            self._done[m] = self._memmap(f"done_{m}.npy")
        return self._done[m]

    @property
    def has_checksums(self) -> bool:
        """True when the store records a CRC-32 per row (stores from before checksums do not)."""
        return "rowcrc_0.npy" in self.manifest["arrays"]

    def checksums(self, m: int) -> np.memmap:
        """(N,) uint32 recorded CRC-32 of each written row of checkpoint m."""
        if m not in self._checksums:
            self._checksums[m] = self._memmap(f"rowcrc_{m}.npy")
        return self._checksums[m]

    def bad_rows(self, m: int, start: int, rows: np.ndarray) -> np.ndarray:
        """Indices (absolute) among rows [start, start + len(rows)) marked done whose bytes fail their checksum."""
        stop = start + len(rows)
        done = np.asarray(self.done(m)[start:stop]) == 1
        got = row_checksums(rows)
        want = np.asarray(self.checksums(m)[start:stop])
        return start + np.flatnonzero(done & (got != want))

    def _verify(self, m: int, start: int, rows: np.ndarray) -> None:
        """Check rows [start, start + len(rows)) against their checksums, once per open store."""
        if not self.has_checksums:
            return
        seen = self._verified.setdefault(m, np.zeros(self.num_train, dtype=bool))
        stop = start + len(rows)
        if seen[start:stop].all():
            return
        bad = self.bad_rows(m, start, rows)
        if len(bad):
            raise StoreError(
                f"store {self.root}: {len(bad)} row(s) of features_{m}.npy marked done do not match their "
                f"checksums (e.g. row {int(bad[0])}): the file was edited or rows were never written. "
                f"Run `attribution featurize` with the same arguments to recompute them "
                f"(or `attribution doctor --store {self.root}` for a full report)"
            )
        seen[start:stop] |= np.asarray(self.done(m)[start:stop]) == 1

    def verify_all(self, m: int, chunk_rows: int = 8192) -> np.ndarray:
        """Indices of every done row of checkpoint m that fails its checksum (reads the whole array)."""
        if not self.has_checksums:
            return np.zeros(0, dtype=np.int64)
        bad = [self.bad_rows(m, s, self._read(m, s, s + chunk_rows)) for s in range(0, self.num_train, chunk_rows)]
        return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)

    def unmark(self, m: int, indices: np.ndarray) -> None:
        """Clear the done flags of rows ``indices`` (so featurize computes them again)."""
        if not self.writable:
            raise StoreError("store opened read-only")
        done = self.done(m)
        done[indices] = 0
        done.flush()
        if m in self._verified:
            self._verified[m][indices] = False

    def record_checksums(self, force: bool = False, chunk_rows: int = 8192) -> None:
        """Record the checksums of the rows as they are now (trusts the contents).

        For stores written without checksums, or (``force``) by a tool that wrote
        rows without :meth:`write_rows`.
        """
        if not self.writable:
            raise StoreError("store opened read-only")
        if self.has_checksums and not force:
            return
        self._checksums.clear()
        self._verified.clear()
        for m in range(self.num_checkpoints):
            name = f"rowcrc_{m}.npy"
            crc = np.concatenate(
                [row_checksums(self._read(m, s, s + chunk_rows)) for s in range(0, self.num_train, chunk_rows)]
            )
            atomic_save_npy(self.root / name, crc)
            self.manifest["arrays"][name] = {"shape": [self.num_train], "dtype": crc.dtype.str,
                                             "bytes": (self.root / name).stat().st_size}
        atomic_write_bytes(self.root / "manifest.json", json.dumps(self.manifest, indent=2).encode())

    @property
    def has_binding(self) -> bool:
        """True when the store records the settings its rows were built with (:data:`BINDING_FILE`)."""
        return "settings_sha256" in self.manifest

    def bind_settings(self) -> None:
        """Record the manifest's settings as those the rows were built with (trusts them: verify rows first)."""
        if not self.writable:
            raise StoreError("store opened read-only")
        _write_binding(self.root, self.manifest)
        atomic_write_bytes(self.root / "manifest.json", json.dumps(self.manifest, indent=2).encode())

    def read_rows(self, m: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of features_{m}: (stop - start, d), in the store's dtype.

        Read with ``os.pread`` rather than through the memory map, so streaming a
        store larger than memory keeps the resident set at one chunk (pages touched
        through a memmap stay mapped and count toward RSS). Done rows are checked
        against their recorded checksums the first time they are read. ``out``: a
        C-contiguous buffer of at least stop - start rows to read into (reused across
        chunks to avoid a fresh allocation and its page faults); the filled rows are returned.

        Raises:
            StoreError: a done row does not match its checksum, or the file is short.
        """
        out = self._read(m, start, stop, out)
        self._verify(m, start, out)
        return out

    def _read(self, m: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of features_{m}, unverified (see :meth:`read_rows`)."""
        feats = self.features(m)
        stop = min(stop, feats.shape[0])
        row_bytes = feats.dtype.itemsize * feats.shape[1]
        if out is None:
            out = np.empty((stop - start, feats.shape[1]), dtype=feats.dtype)
        elif out.dtype != feats.dtype or out.shape[1:] != feats.shape[1:] or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous (rows, {feats.shape[1]}) {feats.dtype} array")
        out = out[: stop - start]
        fd = os.open(self.root / f"features_{m}.npy", os.O_RDONLY)
        try:
            view = memoryview(out).cast("B")
            offset, done = feats.offset + start * row_bytes, 0
            while done < view.nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise StoreError(f"features_{m}.npy ended early; the store is truncated")
                done += n
        finally:
            os.close(fd)
        return out

    def iter_chunks(
        self, m: int, chunk_rows: int = STREAM_CHUNK_ROWS, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream features_{m} as (start, (rows, d) tensor of ``dtype``) in chunks of ``chunk_rows``.

        Two buffers are allocated once and reused (a raw one in the store's dtype and
        the converted one, converted by torch, several times faster than numpy's
        float16 cast): the memory held is chunk_rows * d * (itemsize + 4) bytes, e.g.
        16,384 x 4,096 -> 384 MiB. The yielded tensor is overwritten by the next chunk.
        """
        n, d = self.num_train, self.proj_dim
        rows = max(1, min(chunk_rows, n))
        raw = np.empty((rows, d), dtype=self.features(m).dtype)
        conv = torch.empty((rows, d), dtype=dtype)
        for start in range(0, n, rows):
            got = self.read_rows(m, start, start + rows, out=raw)
            block = conv[: got.shape[0]]
            block.copy_(torch.from_numpy(got))
            yield start, block

    def pending(self, m: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Indices of rows of checkpoint m not done yet, in this rank's shard (i % world_size == rank)."""
        idx = np.flatnonzero(np.asarray(self.done(m)) == 0)
        return idx[idx % world_size == rank]

    def write_rows(self, m: int, indices: np.ndarray, rows: np.ndarray) -> None:
        """Write finished rows, flush them, record their checksums, then mark them done and flush the flags."""
        if not self.writable:
            raise StoreError("store opened read-only")
        feats = self.features(m)
        stored = np.ascontiguousarray(rows.astype(feats.dtype, copy=False))
        feats[indices] = stored
        feats.flush()
        if self.has_checksums:
            crc = self.checksums(m)
            crc[indices] = row_checksums(stored)
            crc.flush()
        done = self.done(m)
        done[indices] = 1
        done.flush()

    def is_complete(self, m: int | None = None) -> bool:
        ms = range(self.num_checkpoints) if m is None else [m]
        return all(bool(np.all(np.asarray(self.done(k)) == 1)) for k in ms)

    # ------------------------------------------------------------------ kernel
    def finalize(self, progress: Progress | None = None, chunk_rows: int = 8192) -> None:
        """Compute and save K_m = Phi_m^T Phi_m (float64) for every checkpoint."""
        if not self.is_complete():
            raise StoreError(f"store {self.root} is unfinished; run featurize again to complete it")
        for m in range(self.num_checkpoints):
            name = f"kernel_{m}.npy"
            if name in self.manifest["kernels"] and (self.root / name).exists():
                continue
            kernel = self.compute_kernel(m, chunk_rows)
            if progress:
                progress(m + 1, self.num_checkpoints)
            atomic_save_npy(self.root / name, kernel)
            self.manifest["kernels"][name] = sha256_file(self.root / name)
            atomic_write_bytes(self.root / "manifest.json", json.dumps(self.manifest, indent=2).encode())

    def kernel(self, m: int) -> np.ndarray:
        """(d, d) float64 K_m = Phi_m^T Phi_m.

        Read from ``kernel_{m}.npy`` when :meth:`finalize` wrote it (verified against
        its recorded sha256); a complete store without kernel files (e.g. a read-only
        shipped store) gets it computed from Phi once and kept in memory, and, when
        ``kernel_cache`` names a directory, on disk for the next process
        (:func:`~attribution.features.kernel_cache.cached_kernel`).
        """
        if m in self._kernels:
            return self._kernels[m]
        name = f"kernel_{m}.npy"
        recorded = self.manifest["kernels"].get(name)
        path = self.root / name
        if recorded is not None:
            if not self.is_complete(m):
                raise StoreError(f"store {self.root} has a kernel but rows not marked done; run `attribution featurize` again")
            if not path.exists() or sha256_file(path) != recorded:
                raise StoreError(f"{path} is missing or does not match its checksum; delete it and rerun featurize")
            kernel = np.load(path, allow_pickle=False)
        else:
            if not self.is_complete(m):
                raise StoreError(f"store {self.root} is unfinished; run `attribution featurize` again to complete it")
            if self.kernel_cache is not None:
                kernel = cached_kernel(self.kernel_cache_key(m), self.proj_dim, lambda: self.compute_kernel(m),
                                       self.kernel_cache)
            else:
                kernel = self.compute_kernel(m)
        self._kernels[m] = kernel
        return kernel

    def kernel_cache_key(self, m: int) -> str:
        """The key of checkpoint ``m``'s kernel in a kernel cache (bound to its rows' contents)."""
        crcs = np.asarray(self.checksums(m)) if self.has_checksums else None
        return kernel_cache_key(self.manifest, m, crcs, np.asarray(self.done(m)), self.root / f"features_{m}.npy")

    def compute_kernel(self, m: int, chunk_rows: int = 8192) -> np.ndarray:
        """(d, d) float64 Phi_m^T Phi_m, from one streaming pass over the rows."""
        kernel = torch.zeros((self.proj_dim, self.proj_dim), dtype=torch.float64)
        for _, block in self.iter_chunks(m, chunk_rows, torch.float64):
            kernel.addmm_(block.T, block)
        return kernel.numpy()
