"""Timestep-anchored stores with matched query noises (attribution.scoring.anchored)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
from attribution.features import StoreError, draw_timesteps_and_noise, get_output, looped_grads, select_params
from attribution.sampling import sample_trajectory
from attribution.scoring.anchored import (
    AnchoredScorer,
    AnchoredStore,
    featurize_anchored,
    is_anchored,
    nearest_anchor,
    open_scorer,
)

SMALL_PARAMS = ("conv_in", "conv_out")  # 77 parameters: the identity projection stays tiny


def test_nearest_anchor_is_nearest_in_log_timestep():
    anchors = (0, 20, 240, 480, 980)
    assert [nearest_anchor(anchors, t) for t in (0, 5, 12, 100, 250, 600, 999)] == [0, 0, 1, 2, 2, 3, 4]


def test_anchored_scores_equal_the_explicit_trak_formula_with_matched_noises(tiny_models, tiny_dataset, tmp_path):
    models = tiny_models
    base = FeaturizeConfig(proj_kind="identity", num_draws=3, param_filter=SMALL_PARAMS, store_dtype="float32")
    anchored = featurize_anchored(models, tiny_dataset, tmp_path / "anch", [10, 60], base)
    assert is_anchored(tmp_path / "anch") and anchored.anchors == (10, 60)
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=6, seed=1))
    query = QueryConfig(ridge=1e-2)
    steps = list(range(6))
    got = AnchoredScorer(anchored, models, "journey", query).score(traj, steps).scores
    assert got.shape == (6, len(tiny_dataset))
    want = np.zeros_like(got)
    for r, s in enumerate(steps):
        t = int(traj.timesteps[s])
        j = nearest_anchor(anchored.anchors, t)
        a = anchored.anchors[j]
        total = 0
        for m, model in enumerate(models):
            params = select_params(model, SMALL_PARAMS)
            cfg = anchored.stores[j].config
            ts, eps = draw_timesteps_and_noise(np.arange(len(tiny_dataset)), cfg, model.num_train_timesteps, model.image_shape)
            assert (ts == a).all() and torch.equal(eps[0], eps[-1])  # every example: D draws at the anchor, shared
            phi = looped_grads(model, params, get_output("loss"), tiny_dataset.images(range(len(tiny_dataset))), ts, eps).double()
            g = looped_grads(model, params, get_output("loss"), traj.x0_hat[[s]], torch.full((1, 3), t), eps[:1]).double()
            kern = phi.T @ phi
            lam = query.ridge * torch.trace(kern) / kern.shape[0]
            total = total + phi @ torch.linalg.solve(kern + lam * torch.eye(kern.shape[0], dtype=kern.dtype), g[0])
        want[r] = (total / len(models)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_open_scorer_refuses_an_anchored_store_of_other_models_and_a_wrong_anchor(tiny_models, tiny_dataset, tmp_path):
    base = FeaturizeConfig(proj_dim=16, num_draws=1)
    featurize_anchored(tiny_models[:1], tiny_dataset, tmp_path / "a", [30], base)
    with pytest.raises(StoreError, match="checkpoint"):
        open_scorer(tmp_path / "a", tiny_models[1:], "journey", dataset=tiny_dataset)
    assert isinstance(open_scorer(tmp_path / "a", tiny_models[:1], "journey", dataset=tiny_dataset), AnchoredScorer)
    meta = json.loads((tmp_path / "a" / "anchors.json").read_text())
    meta["anchors"] = [31]
    (tmp_path / "a" / "anchors.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError):
        AnchoredStore.open(tmp_path / "a")
    with pytest.raises(StoreError, match="holds anchors"):
        featurize_anchored(tiny_models[:1], tiny_dataset, tmp_path / "a", [30], base)
    with pytest.raises(ValueError, match="outside"):
        featurize_anchored(tiny_models[:1], tiny_dataset, tmp_path / "b", [100], base)
