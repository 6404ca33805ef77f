"""Scoring streams the store: memory stays far below the store's size, scores equal a dense product.

A 200,000 x 256 float16 store (~98 MiB) in the Store layout is scored for a 5-step
query in a fresh subprocess (``benchmarks/bench_stream.py``'s probe worker) that
resets its peak RSS right before ``Scorer.scores_from_features`` and reports the
peak's growth. Loading the store -- or reading it through a memory map, whose
touched pages stay resident (measured: +117 MiB for this 98 MiB store) -- grows
the peak by at least the store's size; streaming chunks of 8,192 rows with
``Store.read_rows`` (os.pread) needs ~20 MiB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_stream  # noqa: E402
import common  # noqa: E402

ROWS, DIM, STEPS, CHUNK = 200_000, 256, 5, 8192


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "store"
    bench_stream.build_store(root, ROWS, DIM, base_rows=10_000, log=lambda s: None)
    out = root.parent
    spec = {"kind": "probe", "store": str(root), "steps": STEPS, "chunk_rows": CHUNK,
            "scores_out": str(out / "scores.npy"), "feats_out": str(out / "feats.npy")}
    res = common.run_worker(BENCH / "bench_stream.py", spec, timeout=120)
    return root, res, np.load(out / "scores.npy"), np.load(out / "feats.npy")


def test_synthetic_store_kernel_is_exact(probe):
    """The builder's closed-form kernel equals Phi^T Phi computed from the file."""
    from attribution.features import Store

    root, *_ = probe
    store = Store.open(root)
    phi = np.asarray(np.load(root / "features_0.npy", mmap_mode="r"), dtype=np.float64)
    np.testing.assert_allclose(store.kernel(0), phi.T @ phi, rtol=1e-9, atol=1e-9)


def test_streamed_scores_equal_dense(probe):
    from attribution.features import Store

    root, res, scores, feats = probe
    store = Store.open(root)
    ref = bench_stream.dense_scores(store, bench_stream.RIDGE, [torch.from_numpy(feats)])
    assert scores.shape == (STEPS, ROWS)
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_streaming_peak_rss_growth_is_far_below_store_size(probe):
    _, res, _, _ = probe
    if not res["hwm_reset"]:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    store_bytes = res["store_bytes"]
    assert store_bytes > 90 << 20
    # chunk buffers (8192 x 256 x (2 + 4) B) + scores (5 x 200,000 x 4 B) are ~16 MiB; allow half the store
    assert res["growth_bytes"] < store_bytes // 2, (
        f"peak RSS grew by {res['growth_bytes'] / 2**20:.0f} MiB while scoring a {store_bytes / 2**20:.0f} MiB store"
    )
