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
from attribution.workspace import Bundle, PriorityLock, Workspace

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


def _background_worker(lock: PriorityLock, units: list[int], stop: threading.Event, started: threading.Event) -> threading.Thread:
    """A background holder that never releases the lock by itself: only its pause points can."""

    def run() -> None:
        with lock.hold(background=True):
            started.set()
            while not stop.is_set():
                units.append(len(units))
                time.sleep(0.002)
                lock.pause_point()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_background_holder_gives_the_lock_up_at_a_pause_point():
    lock, units, stop, started = PriorityLock(max_pause=30.0), [], threading.Event(), threading.Event()
    worker = _background_worker(lock, units, stop, started)
    assert started.wait(10)
    acquired = threading.Event()

    def foreground() -> None:
        with lock.hold(background=False):
            acquired.set()

    fg = threading.Thread(target=foreground, daemon=True)
    fg.start()
    assert acquired.wait(10), "a foreground request waited for the whole background hold"
    assert lock.pauses >= 1 and worker.is_alive()
    n = len(units)
    stop.set()
    worker.join(10)
    assert not worker.is_alive() and len(units) >= n  # the background work went on after the request


def test_background_work_waits_while_a_page_renders():
    lock, units, stop, started = PriorityLock(max_pause=30.0), [], threading.Event(), threading.Event()
    worker = _background_worker(lock, units, stop, started)
    assert started.wait(10)
    with lock.foreground():
        time.sleep(0.05)  # the worker reaches its next pause point and stops there
        during = len(units)
        time.sleep(0.3)
        assert len(units) - during <= 1
    deadline = time.time() + 10
    while len(units) <= during + 1 and time.time() < deadline:
        time.sleep(0.01)
    assert len(units) > during + 1, "background work did not resume after the page run"
    stop.set()
    worker.join(10)


def test_pause_point_is_a_no_op_outside_the_background_holder():
    lock = PriorityLock()
    with lock.hold(background=False):
        lock.pause_point()  # the foreground holder keeps its lock
        assert lock.pauses == 0
    lock.pause_point()
    assert lock.pauses == 0
