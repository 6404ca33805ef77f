"""The fast paths compute the same numbers as the straightforward ones.

* query gradients: plain autograd per step (``per_step_grads``, used by
  ``Scorer.query_features``) == vmap over steps (``per_example_grads``);
* the sjlt sketch's CSR matrix built by a sort == the COO ``coalesce`` build;
* streamed chunks with reused buffers == the features, and scores do not depend on the chunk size.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.features import SparseSignProjector, featurize, per_example_grads
from attribution.features.projection import sjlt_csr
from attribution.sampling import sample_trajectory
from attribution.scoring import Scorer, query_noises


@pytest.fixture(scope="module")
def store(tiny_models, tiny_dataset, tmp_path_factory):
    return featurize(tiny_models, tiny_dataset, tmp_path_factory.mktemp("fast") / "s",
                     FeaturizeConfig(proj_dim=32, num_draws=1))


@pytest.mark.parametrize("masked", [False, True])
def test_query_features_equal_vmap_path(tiny_models, store, masked):
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=6, seed=1))
    q = QueryConfig(num_resamples=3, chunk_size=4)
    scorer = Scorer(store, tiny_models, "journey", q)
    steps = [0, 2, 3, 5, 1]
    mask = None
    if masked:
        mask = torch.zeros(1, 8, 8)
        mask[:, 1:5, 2:7] = 1
    feats = scorer.query_features(traj, steps, mask)
    noises = query_noises(steps, 3, q.noise_seed, (1, 8, 8))
    ts = traj.timesteps[steps][:, None].expand(-1, 3)
    for m, model in enumerate(tiny_models):
        g = per_example_grads(model, scorer.params[m], scorer.output, traj.x0_hat[steps], ts, noises, mask, chunk_size=2)
        want = scorer.projectors[m].project(g)
        assert feats[m].shape == (5, 32) and want.abs().max() > 0
        torch.testing.assert_close(feats[m], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("nnz", [1, 3, 4])
def test_sjlt_csr_equals_coalesced_coo(nnz):
    p, d = 5003, 24
    g = torch.Generator().manual_seed(nnz)
    index = torch.randint(0, d // nnz, (nnz, p), generator=g) + torch.arange(nnz)[:, None] * (d // nnz)
    sign = (torch.randint(0, 2, (nnz, p), generator=g).float() * 2 - 1) / nnz**0.5
    coo = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), torch.arange(p).repeat(nnz)]), sign.reshape(-1), (d, p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = coo.coalesce().to_sparse_csr()
    got = sjlt_csr(index, sign, d)
    for a, b in ((got.crow_indices(), want.crow_indices()), (got.col_indices(), want.col_indices()),
                 (got.values(), want.values())):
        assert torch.equal(a, b)
    x = torch.randn(p, 3, generator=g)
    torch.testing.assert_close(got @ x, want.to_dense() @ x)


def test_sjlt_projection_preserves_inner_products_in_expectation():
    a, b = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    est = [float(SparseSignProjector(4000, 64, seed=s).project(torch.stack([a, b])).prod(0).sum()) for s in range(200)]
    exact = float(a @ b)
    scale = float(a.norm() * b.norm())
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / np.sqrt(len(est)) + 1e-3 * scale


def test_streamed_chunks_and_chunk_size_invariance(tiny_models, store):
    phi = np.asarray(store.features(0), dtype=np.float32)
    got = np.concatenate([b.numpy().copy() for _, b in store.iter_chunks(0, chunk_rows=5)])
    np.testing.assert_array_equal(got, phi)
    buf = np.empty((7, store.proj_dim), dtype=store.features(0).dtype)
    assert store.read_rows(0, 20, 30, out=buf).shape == (4, store.proj_dim)  # clipped at N = 24
    with pytest.raises(ValueError, match="C-contiguous"):
        store.read_rows(0, 0, 3, out=np.empty((3, store.proj_dim), dtype=np.float64))
    feats = [torch.randn(3, store.proj_dim, generator=torch.Generator().manual_seed(m)) for m in range(2)]
    for method in ("journey", "tracin", "retrac"):
        sc = Scorer(store, tiny_models, method, QueryConfig(num_resamples=2))
        big = sc.scores_from_features(feats)
        sc._row_norms = None
        small = sc.scores_from_features(feats, chunk_rows=5)
        assert big.shape == (3, 24) and np.abs(big).max() > 0
        # float32 sums in another order: rounding ~1e-6 of the largest score; a chunking bug is O(1)
        np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-5 * np.abs(big).max())


def test_sjlt_column_slices_need_block_edges():
    """``accumulate_columns`` projects a slice that starts and ends on block edges, and refuses any other."""
    proj = SparseSignProjector(40_000, 64, seed=1, boundaries=[5, 17_000])
    assert [(a, b) for a, b, _ in proj.column_blocks] == [(0, 5), (5, 16_384), (16_384, 17_000), (17_000, 32_768),
                                                          (32_768, 40_000)]
    part = torch.randn(3, 17_000 - 5, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(64, 3)
    proj.accumulate_columns(part, 5, acc)
    torch.testing.assert_close(acc, proj.matrix()[:, 5:17_000] @ part.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="column 6 is not a block edge"):
        proj.accumulate_columns(part[:, 1:], 6, acc)
    with pytest.raises(ValueError, match="column 17001 is not a block edge"):
        proj.accumulate_columns(torch.randn(3, 16_996), 5, acc)
