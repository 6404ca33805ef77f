"""The disk cache of kernels for stores that do not keep them (attribution.features.kernel_cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from attribution.config import FeaturizeConfig
from attribution.features import Store, featurize

CFG = FeaturizeConfig(proj_dim=16, num_draws=1, store_dtype="float32")


@pytest.fixture(scope="module")
def unfinalized(tiny_models, tiny_dataset, tmp_path_factory) -> Path:
    """A complete store without kernel files, as the bundled one is shipped."""
    root = tmp_path_factory.mktemp("kcache") / "store"
    featurize(tiny_models, tiny_dataset, root, CFG, finalize=False)
    return root


def _open(root: Path, cache: Path) -> Store:
    store = Store.open(root)
    store.kernel_cache = cache
    return store


def test_kernel_is_computed_once_then_read_from_the_cache(unfinalized, tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    first = _open(unfinalized, cache).kernel(0)
    np.testing.assert_array_equal(first, Store.open(unfinalized).compute_kernel(0))
    assert len(list(cache.glob("kernel-*.npy"))) == 1

    def no_compute(self, m, chunk_rows=8192):
        raise AssertionError("the cached kernel should have been read")

    monkeypatch.setattr(Store, "compute_kernel", no_compute)
    np.testing.assert_array_equal(_open(unfinalized, cache).kernel(0), first)


def test_checkpoints_and_changed_rows_get_their_own_key(unfinalized, tmp_path, tiny_models, tiny_dataset):
    store = Store.open(unfinalized)
    assert store.kernel_cache_key(0) != store.kernel_cache_key(1)
    edited = Path(shutil.copytree(unfinalized, tmp_path / "edited"))
    writable = Store.open(edited, writable=True)
    row = np.asarray(writable.features(0)[3]).copy()
    writable.write_rows(0, np.array([3]), (row + 1)[None])  # a recomputed row: new bytes, new CRC
    assert Store.open(edited).kernel_cache_key(0) != store.kernel_cache_key(0)
    cache = tmp_path / "kernels"
    k_old, k_new = _open(unfinalized, cache).kernel(0), _open(edited, cache).kernel(0)
    assert not np.allclose(k_old, k_new)
    np.testing.assert_array_equal(k_new, Store.open(edited).compute_kernel(0))


def test_corrupt_cache_file_is_recomputed_and_replaced(unfinalized, tmp_path):
    cache = tmp_path / "kernels"
    want = _open(unfinalized, cache).kernel(1)
    (path,) = cache.glob("kernel-*.npy")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    np.testing.assert_array_equal(_open(unfinalized, cache).kernel(1), want)
    np.testing.assert_array_equal(np.load(path), want)


def test_unwritable_cache_only_costs_the_computation(unfinalized, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    np.testing.assert_array_equal(_open(unfinalized, blocker / "kernels").kernel(0),
                                  Store.open(unfinalized).compute_kernel(0))
