"""Core math against brute force on tiny models (see docs/design.md, Testing)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from trak_checks import explicit_scores

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.data import ArrayDataset
from attribution.features import (
    GaussianProjector,
    SparseSignProjector,
    Store,
    StoreError,
    draw_timesteps_and_noise,
    featurize,
    get_output,
    looped_grads,
    make_projector,
    per_example_grads,
    select_params,
    store_spec,
)
from attribution.models import load_models
from attribution.sampling import invert_image, sample_trajectory
from attribution.scoring import Scorer, top_k

SMALL_PARAMS = ("conv_in", "conv_out")  # 77 parameters: identity projection stays tiny


def _draws(model, n, d=3, seed=0):
    cfg = FeaturizeConfig(num_draws=d, draw_seed=seed)
    return draw_timesteps_and_noise(np.arange(n), cfg, model.num_train_timesteps, model.image_shape)


@pytest.mark.parametrize("output", ["loss", "square", "l2"])
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_grads_equal_looped_autograd(tiny_models, tiny_dataset, output, masked):
    model = tiny_models[0]
    params = select_params(model)
    x0 = tiny_dataset.images(range(5))
    ts, noises = _draws(model, 5)
    mask = None
    if masked:
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 1:5] = 1
    fast = per_example_grads(model, params, get_output(output), x0, ts, noises, mask, chunk_size=2)
    slow = looped_grads(model, params, get_output(output), x0, ts, noises, mask)
    assert fast.shape == (5, sum(p.numel() for p in params.values()))
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5 * float(slow.abs().max()))


def test_mask_gradients_are_additive(tiny_models, tiny_dataset):
    """f_mask + f_(1-mask) = f for the loss output, so their gradients add up."""
    model = tiny_models[0]
    params = select_params(model)
    x0 = tiny_dataset.images(range(3))
    ts, noises = _draws(model, 3)
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    out = get_output("loss")
    full = per_example_grads(model, params, out, x0, ts, noises)
    parts = per_example_grads(model, params, out, x0, ts, noises, mask) + per_example_grads(
        model, params, out, x0, ts, noises, 1 - mask
    )
    torch.testing.assert_close(parts, full, rtol=1e-4, atol=1e-6)


def test_draws_do_not_depend_on_chunking(tiny_models):
    model = tiny_models[0]
    cfg = FeaturizeConfig(num_draws=4, timestep_sampling="stratified")
    t_all, n_all = draw_timesteps_and_noise(np.arange(6), cfg, 100, model.image_shape)
    t_one, n_one = draw_timesteps_and_noise(np.array([4]), cfg, 100, model.image_shape)
    assert torch.equal(t_all[4], t_one[0]) and torch.equal(n_all[4], n_one[0])
    # stratified: one draw per quarter of [0, T)
    assert all(((t_all[:, k] >= 25 * k) & (t_all[:, k] < 25 * (k + 1))).all() for k in range(4))



@pytest.mark.parametrize("sampling", ["stratified", "log-stratified", "uniform", "even"])
def test_timestep_range_confines_the_draws(tiny_models, sampling):
    shape = tiny_models[0].image_shape
    t, _ = draw_timesteps_and_noise(np.arange(8), FeaturizeConfig(num_draws=4, timestep_sampling=sampling,
                                                                   timestep_range=(40, 60)), 100, shape)
    assert ((t >= 40) & (t < 60)).all() and t.shape == (8, 4)
    one, _ = draw_timesteps_and_noise(np.arange(3), FeaturizeConfig(num_draws=4, timestep_sampling=sampling,
                                                                     timestep_range=(7, 8)), 100, shape)
    assert (one == 7).all()
    # the whole range spelled out draws exactly what the default does
    full = FeaturizeConfig(num_draws=4, timestep_sampling=sampling, timestep_range=(0, 100))
    a, na = draw_timesteps_and_noise(np.arange(5), full, 100, shape)
    b, nb = draw_timesteps_and_noise(np.arange(5), FeaturizeConfig(num_draws=4, timestep_sampling=sampling), 100, shape)
    assert torch.equal(a, b) and torch.equal(na, nb)
    with pytest.raises(ValueError, match="exceeds"):
        draw_timesteps_and_noise(np.arange(1), FeaturizeConfig(timestep_range=(90, 120)), 100, shape)
    with pytest.raises(ValueError, match="lo < hi"):
        FeaturizeConfig(timestep_range=(5, 5))
    assert FeaturizeConfig.from_dict(FeaturizeConfig(timestep_range=(3, 9)).to_dict()).timestep_range == (3, 9)


def test_log_stratified_draws_are_dense_at_small_timesteps(tiny_models):
    """One draw per stratum of equal width in log(t + T/200): every example gets draws at the late
    sampling steps (t < 30 of T = 1000), which equal strata in t rarely give."""
    shape = tiny_models[0].image_shape
    cfg = FeaturizeConfig(num_draws=16, timestep_sampling="log-stratified")
    t, _ = draw_timesteps_and_noise(np.arange(64), cfg, 1000, shape)
    assert t.shape == (64, 16) and (t >= 0).all() and (t < 1000).all()
    assert (t.diff(dim=1) >= 0).all()  # strata in increasing order
    assert ((t < 30).sum(1) >= 4).all() and (t[:, -1] >= 700).all()
    edges = np.exp(np.linspace(np.log(5), np.log(1005), 17)) - 5  # the strata
    assert ((t.numpy() >= np.floor(edges[:-1])) & (t.numpy() <= np.ceil(edges[1:]))).all()
    again, _ = draw_timesteps_and_noise(np.arange(64), cfg, 1000, shape)
    assert torch.equal(t, again)
    plain, _ = draw_timesteps_and_noise(np.arange(64), replace(cfg, timestep_sampling="stratified"), 1000, shape)
    assert ((plain < 30).sum(1) <= 1).all()


def test_auto_timestep_sampling_resolves_per_output_and_is_recorded(tiny_models, tiny_dataset, tmp_path):
    """"auto" (the default) is log-stratified for the loss output and stratified for the D-TRAK outputs;
    stores record the resolved value, so a store built with explicit equal strata is told apart."""
    assert FeaturizeConfig().timestep_sampling == "auto"
    assert FeaturizeConfig().effective_timestep_sampling == "log-stratified"
    assert FeaturizeConfig(output="square").effective_timestep_sampling == "stratified"
    shape = tiny_models[0].image_shape
    for output, sampling in (("loss", "log-stratified"), ("square", "stratified")):
        a, _ = draw_timesteps_and_noise(np.arange(4), FeaturizeConfig(output=output), 100, shape)
        b, _ = draw_timesteps_and_noise(np.arange(4), FeaturizeConfig(output=output, timestep_sampling=sampling), 100, shape)
        assert torch.equal(a, b)
    cfg = FeaturizeConfig(proj_dim=16, num_draws=2)
    store = featurize(tiny_models, tiny_dataset, tmp_path / "s", cfg)
    assert store.manifest["settings"]["timestep_sampling"] == "log-stratified"
    Store.open(tmp_path / "s", store_spec(tiny_models, tiny_dataset, cfg))  # auto matches what it resolved to
    with pytest.raises(StoreError, match="timestep_sampling"):
        Store.open(tmp_path / "s", store_spec(tiny_models, tiny_dataset, replace(cfg, timestep_sampling="stratified")))

def test_projections_are_seeded_and_blockwise(monkeypatch):
    g = torch.randn(3, 5000)
    a = SparseSignProjector(5000, 64, seed=3, nnz=4)
    b = SparseSignProjector(5000, 64, seed=3, nnz=4)
    c = SparseSignProjector(5000, 64, seed=4, nnz=4)
    assert torch.equal(a.project(g), b.project(g))
    assert not torch.equal(a.project(g), c.project(g))
    dense = a.matrix()
    assert ((dense != 0).sum(0) == 4).all()  # nnz non-zeros per input coordinate
    torch.testing.assert_close(a.project(g), g @ dense.T)
    # applied in column blocks: the same matrix, the same projection
    monkeypatch.setattr(SparseSignProjector, "COLUMN_BLOCK", 1200)
    blocked = SparseSignProjector(5000, 64, seed=3, nnz=4)
    assert len(blocked.column_blocks) == 5 and torch.equal(blocked.matrix(), dense)
    torch.testing.assert_close(blocked.project(g), a.project(g))

    ga = GaussianProjector(5000, 32, seed=1, block_rows=1000, cache_bytes=0)  # regenerated per call
    gb = GaussianProjector(5000, 32, seed=1, block_rows=1000)
    torch.testing.assert_close(ga.project(g), gb.project(g))
    torch.testing.assert_close(gb.project(g), g @ gb.matrix(), rtol=1e-4, atol=1e-4)
    # inner products approximately preserved (JL): relative error of norms small at d = 2048
    big = make_projector("sjlt", 5000, 2048, seed=0)
    ratio = big.project(g).norm(dim=1) / g.norm(dim=1)
    assert ((ratio - 1).abs() < 0.15).all()


@pytest.mark.parametrize("num_models", [1, 2])
def test_identity_projection_scores_equal_explicit_solve(tiny_models, tiny_dataset, tmp_path, num_models):
    models = tiny_models[:num_models]
    cfg = FeaturizeConfig(proj_kind="identity", num_draws=2, param_filter=SMALL_PARAMS, store_dtype="float32")
    store = featurize(models, tiny_dataset, tmp_path / "store", cfg)
    assert store.proj_dim == 77
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=6, seed=1))
    query = QueryConfig(num_resamples=4, ridge=1e-2)
    steps = [0, 3, 5]
    got = Scorer(store, models, "journey", query).score(traj, steps).scores
    want = explicit_scores(models, tiny_dataset.images(range(len(tiny_dataset))), cfg, traj, steps, query)
    assert got.shape == (3, len(tiny_dataset))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_same_seed_same_scores(tiny_models, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=1)
    s1 = featurize(tiny_models, tiny_dataset, tmp_path / "a", cfg)
    s2 = featurize(tiny_models, tiny_dataset, tmp_path / "b", cfg)
    assert np.array_equal(np.asarray(s1.features(1)), np.asarray(s2.features(1)))
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=5, seed=2))
    q = QueryConfig(num_resamples=3)
    a = Scorer(s1, tiny_models, "journey", q).score(traj, [1, 4]).scores
    b = Scorer(s2, tiny_models, "journey", q).score(traj, [1, 4]).scores
    np.testing.assert_array_equal(a, b)


class _Interrupt(Exception):
    pass


def test_interrupted_featurize_resumes_byte_identical(tiny_models, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2)
    one_go = featurize(tiny_models, tiny_dataset, tmp_path / "one", cfg, batch_size=5)

    calls = []

    def stop_after_three(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        featurize(tiny_models, tiny_dataset, tmp_path / "resumed", cfg, batch_size=5, progress=stop_after_three)
    partial = Store.open(tmp_path / "resumed", writable=False)
    assert 0 < int(np.asarray(partial.done(0)).sum()) < len(tiny_dataset)
    assert not partial.is_complete()
    with pytest.raises(StoreError, match="unfinished"):
        partial.kernel(1)

    seen = []
    resumed = featurize(tiny_models, tiny_dataset, tmp_path / "resumed", cfg, batch_size=5, progress=lambda d, t: seen.append(t))
    assert seen[-1] == 2 * len(tiny_dataset) - 15  # only the 33 unfinished rows were computed
    for m in range(2):
        assert np.asarray(resumed.features(m)).tobytes() == np.asarray(one_go.features(m)).tobytes()
        np.testing.assert_array_equal(resumed.kernel(m), one_go.kernel(m))


def test_chunk_size_changes_speed_not_features(tiny_models, tiny_dataset, tmp_path):
    """The auto chunk size follows the gradient memory and the rows per pass; features do not depend on it."""
    from attribution.features import auto_chunk_size

    assert auto_chunk_size(263_000, 1) == 64 and auto_chunk_size(263_000, 16) == 32  # 512 rows per pass
    assert auto_chunk_size(10_300_000, 1) == 26 and auto_chunk_size(10**10, 1) == 1  # 1 GiB of gradients
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2)
    auto = featurize(tiny_models, tiny_dataset, tmp_path / "auto", cfg, batch_size=16)
    small = featurize(tiny_models, tiny_dataset, tmp_path / "small", cfg, batch_size=16, chunk_size=3)
    for m in range(2):
        np.testing.assert_allclose(np.asarray(small.features(m), dtype=np.float32),
                                   np.asarray(auto.features(m), dtype=np.float32), rtol=1e-3, atol=1e-6)


def test_mismatched_store_is_refused(tiny_models, tiny_dataset, tiny_model_dirs, tmp_path):
    cfg = FeaturizeConfig(proj_dim=32, num_draws=1)
    featurize(tiny_models, tiny_dataset, tmp_path / "s", cfg)
    with pytest.raises(StoreError, match="proj_dim"):
        featurize(tiny_models, tiny_dataset, tmp_path / "s", replace(cfg, proj_dim=64))
    swapped = load_models(tiny_model_dirs[::-1])
    with pytest.raises(StoreError, match="checkpoint 0 differs"):
        featurize(swapped, tiny_dataset, tmp_path / "s", cfg)
    other = ArrayDataset(tiny_dataset.array[::-1].copy(), name="reversed")
    with pytest.raises(StoreError, match="dataset differs"):
        Store.open(tmp_path / "s", store_spec(tiny_models, other, cfg))
    store = Store.open(tmp_path / "s")
    with pytest.raises(StoreError, match="weights differ"):
        Scorer(store, swapped)
    with pytest.raises(StoreError, match="output 'square'"):
        Scorer(store, tiny_models, "dtrak-square")


def test_truncated_store_array_is_refused(tiny_models, tiny_dataset, tmp_path):
    featurize(tiny_models, tiny_dataset, tmp_path / "s", FeaturizeConfig(proj_dim=32, num_draws=1))
    path = tmp_path / "s" / "features_1.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match="truncated"):
        Store.open(tmp_path / "s")


def test_trajectory_is_reproducible_and_consistent(tiny_models):
    model = tiny_models[0]
    for sched in ("ddim", "ddpm"):
        cfg = SamplingConfig(num_inference_steps=7, seed=5, scheduler=sched)
        a, b = sample_trajectory(model, cfg), sample_trajectory(model, cfg)
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.sample, b.sample)
        assert a.x_t.shape == (7, 1, 8, 8) and a.timesteps[0] > a.timesteps[-1]
        ab = model.alphas_cumprod[a.timesteps].view(-1, 1, 1, 1)
        torch.testing.assert_close(ab.sqrt() * a.x0_hat + (1 - ab).sqrt() * a.eps, a.x_t, rtol=1e-4, atol=1e-4)
    c = sample_trajectory(model, SamplingConfig(num_inference_steps=7, seed=6))
    assert not torch.equal(c.x_t[0], a.x_t[0])


def test_inversion_builds_a_trajectory_ending_at_the_image(tiny_models, tiny_dataset):
    image = tiny_dataset.images([3])[0]
    traj = invert_image(tiny_models[0], image, num_inference_steps=5)
    assert traj.x_t.shape == (5, 1, 8, 8) and traj.source == "upload"
    assert torch.equal(traj.sample, image)
    with pytest.raises(ValueError, match="shape"):
        invert_image(tiny_models[0], torch.zeros(3, 8, 8), 5)


def test_refined_inversion_is_a_fixed_point_of_the_sampler(tiny_models, tiny_dataset):
    """With refinement, the DDIM step from each inverted x_t lands on the next recorded state
    (and the last step on the image): the inversion is consistent with the sampler, unlike the
    plain one-pass inversion (refine_iters=0)."""
    model, image = tiny_models[0], tiny_dataset.images([3])[0]
    abar = model.alphas_cumprod

    def step_errors(traj) -> torch.Tensor:
        ab_t = abar[traj.timesteps].reshape(-1, 1, 1, 1)
        ab_prev = torch.cat([abar[traj.timesteps[1:]], torch.ones(1)]).reshape(-1, 1, 1, 1)
        landed = ab_prev.sqrt() * traj.x0_hat + (1 - ab_prev).sqrt() * traj.eps  # DDIM step, eta = 0, no clipping
        targets = torch.cat([traj.x_t[1:], image[None]])
        return (landed - targets).abs().amax(dim=(1, 2, 3))

    plain = invert_image(model, image, num_inference_steps=6, refine_iters=0)
    refined = invert_image(model, image, num_inference_steps=6, refine_iters=8)
    assert torch.equal(refined.sample, image) and refined.x_t.shape == plain.x_t.shape
    e_plain, e_refined = step_errors(plain), step_errors(refined)
    assert e_refined.max() < 1e-3 * max(1.0, e_plain.max().item())
    assert e_plain.max() > 10 * e_refined.max()
    with pytest.raises(ValueError, match="refine_iters"):
        invert_image(model, image, 6, refine_iters=-1)


def test_tracin_retrac_and_topk(tiny_models, tiny_dataset, tmp_path):
    store = featurize(tiny_models, tiny_dataset, tmp_path / "s", FeaturizeConfig(proj_dim=32, num_draws=1))
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=4, seed=0))
    q = QueryConfig(num_resamples=2)
    scorer = Scorer(store, tiny_models, "tracin", q)
    feats = scorer.query_features(traj, [2])
    tracin = scorer.score(traj, [2]).scores
    phi = [torch.from_numpy(np.asarray(store.features(m), dtype=np.float32)) for m in range(2)]
    want = sum(p @ g[0] for p, g in zip(phi, feats)).numpy()
    np.testing.assert_allclose(tracin[0], want, rtol=1e-4, atol=1e-6)
    retrac = Scorer(store, tiny_models, "retrac", q).score(traj, [2]).scores
    assert np.abs(retrac).max() <= 2 + 1e-4  # sum of two cosines
    pos, neg = top_k(tracin, 3)
    assert tracin[0, pos[0, 0]] == tracin.max() and tracin[0, neg[0, 0]] == tracin.min()


def test_masks_are_validated(tiny_models, tiny_dataset, tmp_path):
    store = featurize(tiny_models, tiny_dataset, tmp_path / "s", FeaturizeConfig(proj_dim=32, num_draws=1))
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=3, seed=0))
    scorer = Scorer(store, tiny_models, "journey", QueryConfig(num_resamples=2))
    with pytest.raises(ValueError, match="no pixel"):
        scorer.score(traj, [1], mask=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shape"):
        scorer.score(traj, [1], mask=np.ones((4, 4)))
    mask = np.zeros((8, 8))
    mask[:4] = 1
    masked = scorer.score(traj, [1], mask=mask).scores
    full = scorer.score(traj, [1]).scores
    assert masked.shape == full.shape and not np.allclose(masked, full)
