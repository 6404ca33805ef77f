"""Many clients on one Workspace (what the app's sessions share): 8 threads generating, uploading and
scoring different samples at once get exactly the sequential answers, and the caches stay bounded."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from attribution.config import FeaturizeConfig, QueryConfig
from attribution.features import featurize
from attribution.workspace import Bundle, Workspace

CLIENTS = 8
STEPS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def bundle(tiny_models, tiny_model_dirs, tiny_dataset, tmp_path_factory) -> Bundle:
    root = tmp_path_factory.mktemp("concurrency")
    np.savez(root / "data.npz", images=tiny_dataset.array, labels=tiny_dataset.labels)
    featurize(tiny_models, tiny_dataset, root / "store", FeaturizeConfig(proj_dim=16, num_draws=1))
    return Bundle(name="tiny", model_dirs=tuple(tiny_model_dirs), data=str(root / "data.npz"),
                  stores={"loss": root / "store"}, classifier_dir=None)


def _upload(i: int) -> bytes:
    img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _client(ws: Workspace, i: int) -> dict[str, np.ndarray]:
    """What one session does: make its sample (odd clients upload one), score its steps with two methods."""
    key, _ = ws.upload(_upload(i), num_steps=len(STEPS)) if i % 2 else ws.generate(i, num_steps=len(STEPS))
    return {m: ws.scores(key, m, STEPS) for m in ("journey", "tracin", "baseline-pixel")}


def test_concurrent_clients_get_sequential_results_with_bounded_caches(bundle):
    query = QueryConfig(num_resamples=2)
    sequential = Workspace(bundle, query=query)
    want = [_client(sequential, i) for i in range(CLIENTS)]

    shared = Workspace(bundle, query=query)
    shared._scores.max_items = 6  # < 8 clients x 3 methods x 4 steps: rows are evicted while others compute
    shared._trajectories.max_items = CLIENTS
    cache_get = shared._scores.get

    def slow_get(key):  # widen the window between a cache write and the caller's read
        time.sleep(0.002)
        return cache_get(key)

    shared._scores.get = slow_get
    got: list[dict | None] = [None] * CLIENTS
    errors: list[BaseException] = []
    barrier = threading.Barrier(CLIENTS)

    def run(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(2):  # the second round mostly hits (or misses, when evicted) the cache
                got[i] = _client(shared, i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i in range(CLIENTS):
        for method, rows in want[i].items():
            np.testing.assert_array_equal(got[i][method], rows, err_msg=f"client {i} {method}")
    assert len(shared._scores) <= 6 and len(shared._trajectories) <= CLIENTS
    # every client got its own sample's scores: no two clients' rows are the same
    rows = [got[i]["journey"][-1] for i in range(CLIENTS)]
    assert all(not np.array_equal(rows[a], rows[b]) for a in range(CLIENTS) for b in range(a))
