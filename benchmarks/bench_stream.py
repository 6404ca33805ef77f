"""Scoring against a store too large for memory: time and peak RSS of the streamed pass.

Builds a synthetic store in the :class:`attribution.features.store.Store` layout (default
1,000,000 train examples x 4,096 dims, float16: ~8 GB on disk under /tmp), then
scores a 50-step query with ``Scorer.scores_from_features`` (which streams Phi in
chunks of 16,384 rows through two reused buffers, ``Store.iter_chunks``) in a fresh subprocess, and reports its wall time and peak
RSS next to the raw sequential read bandwidth of the same file.

The synthetic rows are cheap to make *and* have an exactly known kernel: a base
block B (float16) is written again and again with its rows permuted, their signs
flipped and the block scaled by a power of two a_c (all exact in float16), so
``K = sum_c a_c^2 B^T B`` needs one small product instead of the full
N x d x d pass of ``Store.finalize`` (33 TFLOP at 1M x 4096). The kernel file and
its checksum are written the way ``finalize`` writes them.

Variants (each in its own process, so peaks do not mix):

* ``core``    -- ``Scorer.scores_from_features`` as shipped: ``Store.iter_chunks`` (os.pread
  into one reused buffer, converted to float32 by torch into a second reused buffer);
* ``memmap``  -- the loop before ``read_rows`` existed: float32 copies of ``np.memmap``
  slices (the touched pages stay mapped and count toward RSS);
* ``madvise`` -- the memmap loop, dropping each chunk's pages from the mapping
  (``mmap.madvise(MADV_DONTNEED)``) once used;
* ``pread``   -- the same reused-buffer loop written out in this script (the reference
  the shipped loop was modelled on).

Every variant runs with 16,384-row chunks unless named ``name@rows`` (e.g. ``core@65536``).

``--cold`` evicts the file from the page cache first (``posix_fadvise(DONTNEED)``,
no root needed) so the pass really reads the disk.

Usage::

    python benchmarks/bench_stream.py                          # 1M x 4096, ~8 GB in /tmp
    python benchmarks/bench_stream.py --rows 200000 --dim 256  # small
    python benchmarks/bench_stream.py --keep --dir /tmp/stream_store   # reuse the store next time

Writes ``benchmarks/results/bench_stream.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
RIDGE = 1e-2
CHUNK_ROWS = 16384  # attribution.features.store.STREAM_CHUNK_ROWS, Scorer.scores_from_features' default


# ====================================================================== building the store
def build_store(root: Path, rows: int, dim: int, seed: int = 0, base_rows: int = 15625, log=print) -> dict[str, Any]:
    """Write a complete, finalized synthetic store of ``rows`` x ``dim`` float16 features at ``root``."""
    import numpy as np

    from attribution.config import FeaturizeConfig
    from attribution.features import Store, StoreSpec
    from attribution.tools import atomic_save_npy, atomic_write_bytes, sha256_file

    t_start = time.perf_counter()
    spec = StoreSpec(
        config=FeaturizeConfig(proj_dim=dim, store_dtype="float16"),
        checkpoints=({"path": "synthetic", "hash": f"synthetic-{seed}"},),
        dataset={"name": "synthetic", "fingerprint": f"synthetic-{rows}x{dim}-{seed}", "num_train": rows,
                 "image_shape": [1, 32, 32]},
        num_params=max(dim * 4, 1),
    )
    if (root / "manifest.json").exists():
        store = Store.open(root, spec)
        if store.is_complete() and "kernel_0.npy" in store.manifest["kernels"]:
            log(f"reusing the finished store at {root}")
            return {"reused": True, "bytes": (root / "features_0.npy").stat().st_size}
        shutil.rmtree(root)
    store = Store.create_or_open(root, spec)
    rng = np.random.default_rng(seed)
    base_rows = min(base_rows, rows)
    base = (rng.standard_normal((base_rows, dim), dtype=np.float32) * 0.05).astype(np.float16)
    base64 = base.astype(np.float64)
    btb = base64.T @ base64
    kernel = np.zeros((dim, dim))
    path = root / "features_0.npy"
    offset = header_offset(path)
    t0 = time.perf_counter()
    with open(path, "r+b") as f:
        f.seek(offset)
        for start in range(0, rows, base_rows):
            n = min(base_rows, rows - start)
            scale = np.float16(2.0 ** int(rng.integers(0, 3)))  # 1, 2 or 4: exact in float16
            perm = rng.permutation(base_rows)[:n]
            signs = np.where(rng.random(n) < 0.5, -1, 1).astype(np.float16)[:, None]
            block = base[perm] * signs * scale
            f.write(block.tobytes())
            if n == base_rows:
                kernel += float(scale) ** 2 * btb
            else:
                b = block.astype(np.float64)
                kernel += b.T @ b
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    done = store.done(0)
    done[:] = 1
    done.flush()
    store.record_checksums(force=True)  # rows were written directly, not through write_rows
    atomic_save_npy(root / "kernel_0.npy", kernel)
    store.manifest["kernels"]["kernel_0.npy"] = sha256_file(root / "kernel_0.npy")
    atomic_write_bytes(root / "manifest.json", json.dumps(store.manifest, indent=2).encode())
    size = path.stat().st_size
    return {"reused": False, "bytes": size, "write_s": write_s, "write_gb_per_s": size / write_s / 1e9,
            "build_s": time.perf_counter() - t_start}


def header_offset(npy_path: Path) -> int:
    """Byte offset of the data in a .npy file."""
    import numpy as np

    with open(npy_path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


# ====================================================================== scoring
def stream_scorer(store, ridge: float = RIDGE):
    """A :class:`attribution.scoring.scorer.Scorer` for the ``journey`` method without models
    (enough for ``scores_from_features``); the Cholesky factor is built as ``Scorer.__init__`` does."""
    import torch

    from attribution.config import QueryConfig
    from attribution.features import get_method
    from attribution.scoring import Scorer

    sc = Scorer.__new__(Scorer)
    sc.store, sc.models, sc.params, sc.projectors = store, [], [], []
    sc.method = get_method("journey")
    sc.query = QueryConfig(ridge=ridge)
    sc._row_norms = None
    sc.row_weights = None  # no DAS weighting
    sc.chol = []
    for m in range(store.num_checkpoints):
        k = torch.from_numpy(store.kernel(m))
        lam = ridge * float(torch.trace(k)) / k.shape[0]
        sc.chol.append(torch.linalg.cholesky(k + lam * torch.eye(k.shape[0], dtype=k.dtype)))
    return sc


def query_features(steps: int, dim: int, seed: int = 1):
    import torch

    return [torch.randn(steps, dim, generator=torch.Generator().manual_seed(seed))]


def scores_memmap(sc, feats, chunk_rows: int = CHUNK_ROWS):
    """The loop of ``scores_from_features`` (trak branch) as it was first written: np.memmap slices."""
    import numpy as np
    import torch

    n = sc.store.num_train
    out = np.zeros((feats[0].shape[0], n), dtype=np.float32)
    for m, g in enumerate(feats):
        w = torch.cholesky_solve(g.double().T, sc.chol[m]).float()
        phi = sc.store.features(m)
        for start in range(0, n, chunk_rows):
            block = torch.from_numpy(np.asarray(phi[start : start + chunk_rows], dtype=np.float32))
            out[:, start : start + chunk_rows] += (block @ w).T.numpy()
    return out / len(feats)


def scores_madvise(sc, feats, chunk_rows: int = CHUNK_ROWS):
    """The memmap loop, releasing each chunk's pages after use."""
    import numpy as np
    import torch

    n = sc.store.num_train
    out = np.zeros((feats[0].shape[0], n), dtype=np.float32)
    page = mmap.PAGESIZE
    for m, g in enumerate(feats):
        w = torch.cholesky_solve(g.double().T, sc.chol[m]).float()
        phi = sc.store.features(m)
        mm = phi._mmap  # noqa: SLF001 - np.memmap's mapping; it starts at offset rounded down
        off0 = phi.offset % mmap.ALLOCATIONGRANULARITY  # data offset inside the mapping
        row_bytes = phi.shape[1] * phi.itemsize
        for start in range(0, n, chunk_rows):
            block = torch.from_numpy(np.asarray(phi[start : start + chunk_rows], dtype=np.float32))
            out[:, start : start + chunk_rows] += (block @ w).T.numpy()
            a = (off0 + start * row_bytes) // page * page
            b = off0 + min(n, start + chunk_rows) * row_bytes
            mm.madvise(mmap.MADV_DONTNEED, a, b - a)
    return out / len(feats)


def scores_pread(sc, feats, chunk_rows: int = CHUNK_ROWS):
    """The same product with chunks read by ``os.preadv`` into one reused buffer (no mapping)."""
    import numpy as np
    import torch

    n, d = sc.store.num_train, sc.store.proj_dim
    out = np.zeros((feats[0].shape[0], n), dtype=np.float32)
    for m, g in enumerate(feats):
        w = torch.cholesky_solve(g.double().T, sc.chol[m]).float()
        path = sc.store.root / f"features_{m}.npy"
        dtype = np.dtype(sc.store.manifest["arrays"][path.name]["dtype"])
        off0 = header_offset(path)
        buf = np.empty((chunk_rows, d), dtype=dtype)
        fbuf = torch.empty((chunk_rows, d), dtype=torch.float32)
        fd = os.open(path, os.O_RDONLY)
        try:
            for start in range(0, n, chunk_rows):
                rows = min(chunk_rows, n - start)
                view = memoryview(buf[:rows]).cast("B")
                got = 0
                while got < len(view):
                    k = os.preadv(fd, [view[got:]], off0 + start * d * dtype.itemsize + got)
                    if k == 0:
                        raise EOFError(f"{path} ends early")
                    got += k
                block = fbuf[:rows]
                block.copy_(torch.from_numpy(buf[:rows]))
                out[:, start : start + rows] += (block @ w).T.numpy()
        finally:
            os.close(fd)
    return out / len(feats)


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def parse_variant(variant: str) -> tuple[str, int]:
    """``"pread@65536"`` -> ("pread", 65536); without ``@``: CHUNK_ROWS."""
    name, _, chunk = variant.partition("@")
    return name, int(chunk) if chunk else CHUNK_ROWS


def worker_score(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from attribution.features import Store

    root = Path(spec["store"])
    store = Store.open(root)
    sc = stream_scorer(store)
    feats = query_features(spec["steps"], store.proj_dim)
    if spec.get("cold"):
        evict(root / "features_0.npy")
    name, chunk = parse_variant(spec["variant"])
    before = proc_status()
    t0 = time.perf_counter()
    if name == "core":
        scores = sc.scores_from_features(feats, chunk_rows=chunk)
    elif name == "memmap":
        scores = scores_memmap(sc, feats, chunk_rows=chunk)
    elif name == "madvise":
        scores = scores_madvise(sc, feats, chunk_rows=chunk)
    elif name == "pread":
        scores = scores_pread(sc, feats, chunk_rows=chunk)
    else:
        raise ValueError(spec["variant"])
    dt = time.perf_counter() - t0
    after = proc_status()
    res: dict[str, Any] = {"variant": spec["variant"], "cold": bool(spec.get("cold")), "score_s": dt,
                           "gb_per_s": (root / "features_0.npy").stat().st_size / dt / 1e9,
                           "status_before": before, "status_after": after,
                           "peak_rss_bytes": common.peak_rss_bytes(), "rss_before_bytes": before["VmRSS"]}
    if spec.get("scores_out"):
        np.save(spec["scores_out"], scores)
    if spec.get("check_rows"):
        res["check"] = check_rows(store, sc, feats, scores, spec["check_rows"])
    return res


def dense_scores(store, ridge: float, feats, rows=None):
    """In-memory reference: Phi[rows] (K + lambda I)^-1 g in float64 (all rows when ``rows`` is None)."""
    import numpy as np

    phi = np.load(store.root / "features_0.npy", mmap_mode="r")
    phi = np.asarray(phi if rows is None else phi[rows], dtype=np.float64)
    k = store.kernel(0)
    lam = ridge * np.trace(k) / k.shape[0]
    w = np.linalg.solve(k + lam * np.eye(k.shape[0]), feats[0].double().numpy().T)
    return (phi @ w).T  # (S, rows)


def check_rows(store, sc, feats, scores, count: int) -> dict[str, float]:
    """Max relative error of the streamed scores against the float64 reference on ``count`` random rows."""
    import numpy as np

    rows = np.sort(np.random.default_rng(0).choice(store.num_train, size=min(count, store.num_train), replace=False))
    ref = dense_scores(store, RIDGE, feats, rows)
    err = np.abs(scores[:, rows] - ref).max() / np.abs(ref).max()
    return {"rows_checked": int(len(rows)), "max_rel_err": float(err)}


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS *growth* of one ``scores_from_features`` call (the test's measurement).

    Warms up the kernels it will use (Cholesky solve, a matmul of the chunk's shape) on
    other data, resets the peak (clear_refs), then scores; growth = VmHWM - VmRSS before.
    """
    import numpy as np
    import torch

    from attribution.features import Store

    root = Path(spec["store"])
    store = Store.open(root)
    sc = stream_scorer(store)
    feats = query_features(spec["steps"], store.proj_dim)
    chunk = spec["chunk_rows"]
    w = torch.cholesky_solve(feats[0].double().T, sc.chol[0]).float()
    _ = (torch.randn(min(chunk, store.num_train), store.proj_dim) @ w).T.numpy().sum()
    res: dict[str, Any] = {"hwm_reset": reset_peak_rss()}
    before = proc_status()
    t0 = time.perf_counter()
    variant = spec.get("variant", "core")
    if variant == "core":
        scores = sc.scores_from_features(feats, chunk_rows=chunk)
    else:
        fns = {"memmap": scores_memmap, "madvise": scores_madvise, "pread": scores_pread}
        scores = fns[variant](sc, feats, chunk_rows=chunk)
    res["score_s"] = time.perf_counter() - t0
    after = proc_status()
    res |= {"status_before": before, "status_after": after, "growth_bytes": after["VmHWM"] - before["VmRSS"],
            "store_bytes": (root / "features_0.npy").stat().st_size}
    np.save(spec["scores_out"], scores)
    np.save(spec["feats_out"], feats[0].numpy())
    return res


def worker_read(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential read of the features file: buffered (page cache) and O_DIRECT (the disk)."""
    path = Path(spec["store"]) / "features_0.npy"
    size = path.stat().st_size
    res: dict[str, Any] = {"bytes": size}
    block = 64 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    if spec.get("cold"):
        evict(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    res["buffered_s"] = time.perf_counter() - t0
    res["buffered_gb_per_s"] = size / res["buffered_s"] / 1e9
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError) as e:
        res["direct_error"] = str(e)
        return res
    try:
        t0 = time.perf_counter()
        off = 0
        while off < size:
            k = os.preadv(fd, [buf], off)
            if k <= 0:
                break
            off += k
        res["direct_s"] = time.perf_counter() - t0
        res["direct_gb_per_s"] = off / res["direct_s"] / 1e9
    except OSError as e:
        res["direct_error"] = str(e)
    finally:
        os.close(fd)
    return res


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    fn = {"score": worker_score, "read": worker_read, "probe": worker_probe}[spec["kind"]]
    common.emit_result(fn(spec))


# ====================================================================== driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dir", type=Path, help="store directory (default: a fresh one under /tmp, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the store (reused by the next run with the same --dir)")
    p.add_argument("--variants", nargs="+", default=["core", "core@65536", "memmap@65536", "pread"],
                   help="core | memmap | madvise | pread, optionally @CHUNK_ROWS (default 16384)")
    p.add_argument("--cold", action="store_true", help="also run every variant after evicting the file from the page cache")
    p.add_argument("--check-rows", type=int, default=2000, help="rows checked against a float64 reference")
    p.add_argument("--out", type=Path, default=common.RESULTS / "bench_stream.json")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    root = args.dir or Path("/tmp") / f"bench_stream_{args.rows}x{args.dim}"
    need = args.rows * args.dim * 2
    root.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root.parent).free
    if free < need * 1.1 and not (root / "manifest.json").exists():
        print(f"error: {root.parent} has {free / 1e9:.1f} GB free, the store needs {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"machine": common.machine_info(), "other_cpu_users": common.other_cpu_users(),
                               "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                               "rows": args.rows, "dim": args.dim, "steps": args.steps, "chunk_rows": CHUNK_ROWS,
                               "store_dir": str(root), "free_disk_bytes_before": free}
    log(f"building {args.rows} x {args.dim} float16 store at {root} ({need / 1e9:.2f} GB)")
    results["build"] = build_store(root, args.rows, args.dim, log=log)
    log(f"store ready: {results['build']}")
    runs = []
    plan = [(v, False) for v in args.variants] + ([(v, True) for v in args.variants] if args.cold else [])
    plan.append(("read", False))
    if args.cold:
        plan.append(("read", True))
    for variant, cold in plan:
        spec = {"store": str(root), "steps": args.steps, "cold": cold}
        if variant == "read":
            spec["kind"] = "read"
        else:
            spec |= {"kind": "score", "variant": variant, "check_rows": args.check_rows if not cold else 0}
        r = common.run_worker(SCRIPT, spec)
        r["variant"], r["cold"] = variant, cold
        runs.append(r)
        if variant == "read":
            log(f"read{' (cold)' if cold else ''}: buffered {r['buffered_gb_per_s']:.2f} GB/s, "
                f"O_DIRECT {r.get('direct_gb_per_s', float('nan')):.2f} GB/s")
        else:
            log(f"{variant}{' (cold)' if cold else ''}: {r['score_s']:.2f} s ({r['gb_per_s']:.2f} GB/s), peak RSS "
                f"{common.fmt_bytes(r['peak_rss_bytes'])} (before {common.fmt_bytes(r['rss_before_bytes'])}), "
                f"check {r.get('check')}")
    results["runs"] = runs
    reads = [r for r in runs if r["variant"] == "read" and not r["cold"]]
    rows = []
    for r in runs:
        if r["variant"] == "read":
            continue
        rows.append([r["variant"] + (" (cold cache)" if r["cold"] else ""), f"{r['score_s']:.2f}",
                     f"{r['gb_per_s']:.2f}", common.fmt_bytes(r["peak_rss_bytes"]),
                     common.fmt_bytes(r["status_after"]["RssFile"]), "yes" if r["peak_rss_bytes"] < 2 << 30 else "NO",
                     f"{r['check']['max_rel_err']:.1e}" if r.get("check") else "-"])
    for r in runs:
        if r["variant"] == "read":
            rows.append([f"sequential read{' (cold cache)' if r['cold'] else ''}: buffered / O_DIRECT",
                         f"{r['buffered_s']:.2f} / {r.get('direct_s', float('nan')):.2f}",
                         f"{r['buffered_gb_per_s']:.2f} / {r.get('direct_gb_per_s', float('nan')):.2f}", "-", "-", "-", "-"])
    print()
    results["table_markdown"] = common.print_table(
        rows, ["pass", "seconds", "GB/s", "peak RSS", "RssFile at end", "< 2 GiB", "max rel err"])
    if reads:
        results["read_buffered_gb_per_s"] = reads[0]["buffered_gb_per_s"]
    results["total_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    log(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
