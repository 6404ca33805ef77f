"""The factorized (LoGra-style) projection: exact with identity factors, the same linear map on both paths,
inner products preserved in expectation, and usable as a store's proj_kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.features import (
    DrawBatch,
    FactorizedProjector,
    GradientTarget,
    conv_weight_grads,
    draw_timesteps_and_noise,
    featurize,
    get_output,
    hooks,
    hooks_support,
    make_projector,
    per_example_grads,
    per_step_grads,
    select_params,
)
from attribution.features.projection.factorized import example_grads_from_hooks
from attribution.models import load_models
from attribution.sampling import sample_trajectory
from attribution.scoring import Scorer, query_noises


def _shapes(params):
    return {k: tuple(v.shape) for k, v in params.items()}


def _inputs(model, n=4, draws=3):
    x0 = torch.rand(n, *model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ts, noises = draw_timesteps_and_noise(np.arange(n), FeaturizeConfig(num_draws=draws), model.num_train_timesteps,
                                          model.image_shape)
    return x0, ts, noises


@pytest.fixture(scope="module")
def attn_model(tmp_path_factory):
    """A tiny UNet with a mid-block attention (Linear layers over a sequence, GroupNorm in attention)."""
    d = tmp_path_factory.mktemp("attn")
    torch.manual_seed(3)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, add_attention=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], '
                                        '"scheduler": ["diffusers", "DDPMScheduler"]}')
    return load_models([d])[0]


@pytest.mark.parametrize("masked", [False, True])
def test_identity_factors_give_exact_per_example_gradients(tiny_models, masked):
    model = tiny_models[0]
    params = select_params(model)
    x0, ts, noises = _inputs(model)
    mask = None
    if masked:
        mask = torch.zeros(1, 8, 8)
        mask[:, 2:6, 1:5] = 1
    exact = per_example_grads(model, params, get_output("loss"), x0, ts, noises, mask)
    proj = FactorizedProjector(_shapes(params), 0, seed=0, exact=True)
    got = proj.project_examples(model, params, get_output("loss"), x0, ts, noises, mask)
    assert got.shape == exact.shape and exact.abs().max() > 0
    # every block at its parameter's place: the features are the gradient itself
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    torch.testing.assert_close(proj.project(exact), exact)


@pytest.mark.parametrize("which", ["tiny", "attention"])
def test_one_backward_equals_projecting_full_gradients(tiny_models, attn_model, which):
    model = tiny_models[1] if which == "tiny" else attn_model
    params = select_params(model)
    x0, ts, noises = _inputs(model, n=5)
    proj = FactorizedProjector(_shapes(params), 96, seed=4)
    for output in ("loss", "square"):
        full = proj.project(per_example_grads(model, params, get_output(output), x0, ts, noises))
        fast = proj.example_features(GradientTarget(model, params, get_output(output)), DrawBatch(x0, ts, noises), chunk_size=2)
        assert fast.shape == (5, 96) and full.abs().max() > 0
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))


@pytest.mark.parametrize("which", ["tiny", "attention"])
def test_hook_gradients_equal_vmap_per_example_gradients(tiny_models, attn_model, which):
    """The sjlt/gaussian featurize path takes per-example gradients from hooks: the same (B, P) rows as vmap."""
    model = tiny_models[1] if which == "tiny" else attn_model
    params = select_params(model)
    assert hooks_support(model, params)
    x0, ts, noises = _inputs(model, n=5)
    for output in ("loss", "square"):
        ref = per_example_grads(model, params, get_output(output), x0, ts, noises)
        got = example_grads_from_hooks(model, params, get_output(output), x0, ts, noises, chunk_size=2)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("kernel,stride,padding,draws", [(3, 1, 1, 1), (3, 2, 1, 2), (1, 1, 0, 3), (3, 1, 0, 1)])
def test_conv_weight_grads_and_unsupported_parameters(tiny_models, kernel, stride, padding, draws):
    """The grouped per-example convolution gradient matches autograd, summed over each example's draws; a
    parameter the hooks cannot form sends featurize back to vmap."""
    conv = torch.nn.Conv2d(2, 4, kernel, stride=stride, padding=padding)
    B = 3
    x = torch.randn(B * draws, 2, 7, 9)
    g = torch.randn_like(conv(x))
    got = conv_weight_grads(conv, x, g, draws)
    assert got.shape == (B, 4, 2, kernel, kernel)
    wide = torch.nn.Conv2d(128, 3, kernel, stride=stride, padding=padding)  # fan-in >= 1024 on a small map: im2col path
    xw = torch.randn(B * draws, 128, 5, 4)
    gw = torch.randn_like(wide(xw))
    assert kernel == 1 or hooks.use_unfold(wide, gw)
    got_wide = conv_weight_grads(wide, xw, gw, draws)
    for n in range(B):
        rows = slice(n * draws, (n + 1) * draws)
        (ref,) = torch.autograd.grad((conv(x[rows]) * g[rows]).sum(), conv.weight)
        torch.testing.assert_close(got[n], ref, rtol=1e-5, atol=1e-5)
        (ref,) = torch.autograd.grad((wide(xw[rows]) * gw[rows]).sum(), wide.weight)
        torch.testing.assert_close(got_wide[n], ref, rtol=1e-4, atol=1e-4)
    model = tiny_models[0]
    params = dict(select_params(model))
    assert hooks_support(model, params)
    params["time_embedding.no_such_layer.weight"] = torch.zeros(2, 2)
    assert not hooks_support(model, params)


def test_inner_products_are_preserved_in_expectation(tiny_models):
    params = select_params(tiny_models[0])
    shapes = _shapes(params)
    p = sum(v.numel() for v in params.values())
    a, b = torch.randn(2, p, generator=torch.Generator().manual_seed(1))
    b = 0.6 * a + 0.8 * b  # correlated: <a, b> is far from 0
    est = np.array([float(FactorizedProjector(shapes, 128, seed=s).project(torch.stack([a, b])).prod(0).sum())
                    for s in range(60)])
    exact = float(a @ b)
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est)), (est.mean(), exact, est.std())
    assert est.std() < exact  # and each estimate is informative


def test_refuses_mismatched_params_and_tiny_dims(tiny_models):
    model = tiny_models[0]
    params = select_params(model)
    with pytest.raises(ValueError, match="too small"):
        FactorizedProjector(_shapes(params), 8, seed=0)
    proj = FactorizedProjector(_shapes(params), 64, seed=0)
    x0, ts, noises = _inputs(model, n=1)
    with pytest.raises(ValueError, match="params differ"):
        proj.project_examples(model, select_params(model, ("conv_in",)), get_output("loss"), x0, ts, noises)


def test_factorized_store_features_and_scores(tiny_models, tiny_dataset, tmp_path):
    cfg = FeaturizeConfig(proj_dim=64, num_draws=2, proj_kind="factorized", store_dtype="float32")
    store = featurize(tiny_models, tiny_dataset, tmp_path / "s", cfg)
    scorer = Scorer(store, tiny_models, "journey", QueryConfig(num_resamples=2))
    model, params = tiny_models[1], scorer.params[1]
    idx = np.arange(5)
    ts, noises = draw_timesteps_and_noise(idx, cfg, model.num_train_timesteps, model.image_shape)
    want = scorer.projectors[1].project(per_example_grads(model, params, get_output("loss"), tiny_dataset.images(idx), ts, noises))
    np.testing.assert_allclose(np.asarray(store.features(1))[idx], want.numpy(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    traj = sample_trajectory(tiny_models[0], SamplingConfig(num_inference_steps=3, seed=0))
    mask = torch.zeros(1, 8, 8)
    mask[:, 3:7] = 1
    feats = scorer.query_features(traj, [0, 2], mask)  # one batched backward per chunk of steps
    qn = query_noises([0, 2], 2, 0, (1, 8, 8))
    qt = traj.timesteps[[0, 2]][:, None].expand(-1, 2)
    want = scorer.projectors[1].project(per_step_grads(model, params, get_output("loss"), traj.x0_hat[[0, 2]], qt, qn, mask))
    torch.testing.assert_close(feats[1], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    scores = scorer.score(traj, [0, 2]).scores
    assert scores.shape == (2, len(tiny_dataset)) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_store_of_another_factorized_layout_is_refused(tiny_models, tiny_dataset, tmp_path):
    import json

    from attribution.features import StoreError
    from attribution.features.projection.factorized import LAYOUT_VERSION

    cfg = FeaturizeConfig(proj_dim=64, num_draws=1, proj_kind="factorized", store_dtype="float32")
    featurize(tiny_models[:1], tiny_dataset, tmp_path / "s", cfg)
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["projection_layout"] == LAYOUT_VERSION
    del manifest["projection_layout"]  # as written before layouts were versioned (and settings were bound)
    del manifest["settings_sha256"]
    (tmp_path / "s" / "built_with.json").unlink()
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="layout differs"):
        featurize(tiny_models[:1], tiny_dataset, tmp_path / "s", cfg)


def test_sjlt_takes_each_layer_gradient_from_its_hook(tiny_models, attn_model):
    """Fused featurize: the sjlt sketch built with parameter edges projects every hook's gradient on its own;
    the rows equal projecting the vmap per-example gradients with the same matrix."""
    for model in (tiny_models[0], attn_model):
        params = select_params(model)
        shapes = _shapes(params)
        p = sum(v.numel() for v in params.values())
        fused_proj = make_projector("sjlt", p, 64, seed=3, shapes=shapes)
        plain_proj = make_projector("sjlt", p, 64, seed=3)
        torch.testing.assert_close(fused_proj.matrix(), plain_proj.matrix(), rtol=0, atol=0)  # same matrix
        assert len(fused_proj.column_blocks) > len(plain_proj.column_blocks)  # an edge at every parameter
        x0, ts, noises = _inputs(model, n=5)
        ref = plain_proj.project(per_example_grads(model, params, get_output("loss"), x0, ts, noises))
        got = fused_proj.example_features(GradientTarget(model, params, get_output("loss")), DrawBatch(x0, ts, noises), chunk_size=2)
        assert got.shape == (5, 64) and ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_sjlt_projects_wide_convolutions_in_row_tiles(tiny_models, monkeypatch):
    """On the CPU the im2col path hands a convolution's per-example gradient to the sketch in tiles of whole
    output rows, each projected on its own; the rows equal projecting the vmap gradients with the same matrix."""
    from attribution.features import SparseSignProjector
    from attribution.features.projection import row_block_edges

    model = tiny_models[0]
    params = select_params(model)
    shapes = _shapes(params)
    p = sum(v.numel() for v in params.values())
    # every convolution on the im2col path, blocks of a few rows, one block per tile
    monkeypatch.setattr(hooks, "UNFOLD_MIN_FAN_IN", 1)
    monkeypatch.setattr(hooks, "UNFOLD_MAX_POSITIONS", 1 << 20)
    monkeypatch.setattr(hooks, "TILE_BYTES", 1)
    monkeypatch.setattr(SparseSignProjector, "COLUMN_BLOCK", 100)
    tiled = make_projector("sjlt", p, 64, seed=3, shapes=shapes)
    plain = make_projector("sjlt", p, 64, seed=3)
    torch.testing.assert_close(tiled.matrix(), plain.matrix(), rtol=0, atol=0)
    assert [a for a, _, _ in tiled.column_blocks] == row_block_edges(list(shapes.values()), 100)[:-1]
    wide = next(k for k, s in shapes.items() if len(s) == 4 and s[0] * np.prod(s[1:]) > 200)
    n_in = int(np.prod(shapes[wide][1:]))
    assert tiled.row_block(n_in) == max(1, 100 // n_in) < shapes[wide][0]  # this weight comes in several tiles

    starts = []
    seen = tiled.accumulate_columns
    monkeypatch.setattr(tiled, "accumulate_columns", lambda part, start, acc: (starts.append(start), seen(part, start, acc)))
    x0, ts, noises = _inputs(model, n=3)
    ref = plain.project(per_example_grads(model, params, get_output("loss"), x0, ts, noises))
    got = tiled.example_features(GradientTarget(model, params, get_output("loss")), DrawBatch(x0, ts, noises), chunk_size=2)
    w0 = sum(int(np.prod(s)) for k, s in list(shapes.items())[: list(shapes).index(wide)])
    rows = tiled.row_block(n_in)
    assert [s for s in starts if w0 <= s < w0 + np.prod(shapes[wide])] == [w0 + r * n_in for r in range(0, shapes[wide][0], rows)] * 2
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_row_block_edges():
    """Blocks start at every parameter, cut weights after whole rows, and rows wider than a block inside."""
    from attribution.features.projection import row_block_edges

    # (4, 3 x 1 x 1): 2 rows of 3 per block -> 0, 6; (5,): every 7 -> 12; (2, 10): every row (17, 27), each cut at +7
    assert row_block_edges([(4, 3, 1, 1), (5,), (2, 10)], 7) == [0, 6, 12, 17, 24, 27, 34, 37]
