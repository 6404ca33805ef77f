"""Per-parameter-group features and scores (attribution.features.projection.grouped, attribution.scoring.param_groups).

* the per-group parts of the sjlt sketch add up to the store's projection (gradients, train features, queries);
* a weight on one group alone gives that group's TRAK score; uniform weights give the mean of the
  group scores, unit weights their sum; the joint score is plain TRAK of the summed features;
* the self z-score from the moments equals the z-score of the weighted scores, and the fit
  puts the weight on the group that carries the self signal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.config import FeaturizeConfig
from attribution.features.featurize import checkpoint_projector, draw_timesteps_and_noise
from attribution.features.gradients import DrawBatch, GradientTarget, select_params
from attribution.features.outputs import get_output
from attribution.features.projection.grouped import GroupedSketch, param_groups
from attribution.scoring.param_groups import (GroupedTrak, ParamGroupWeights, fit_self_retrieval_weights, self_moments,
                                              zscores)


@pytest.fixture(scope="module")
def grouped(tiny_models):
    model = tiny_models[0]
    params = select_params(model)
    cfg = FeaturizeConfig(proj_dim=32, num_draws=2)
    base = checkpoint_projector(cfg, sum(p.numel() for p in params.values()), 0, "cpu", params)
    return model, params, cfg, base, GroupedSketch(base, param_groups(params))


def test_groups_tile_the_parameters_and_refuse_split_groups(grouped):
    model, params, _, base, sketch = grouped
    names = [g.name for g in sketch.groups]
    assert names[:2] == ["conv_in", "time_embedding"] and "down_blocks.1" in names and names[-1] == "conv_out"
    assert sum(g.size for g in sketch.groups) == base.dim_in
    with pytest.raises(ValueError, match="not contiguous"):
        param_groups(params, group_of=lambda name: "ends" if name.startswith(("conv_in", "conv_out")) else "middle")
    with pytest.raises(ValueError, match="tile"):
        GroupedSketch(base, sketch.groups[1:])


def test_group_parts_add_up_to_the_projection(grouped, tiny_dataset):
    model, params, cfg, base, sketch = grouped
    grads = torch.randn(3, base.dim_in, generator=torch.Generator().manual_seed(0))
    parts = sketch.project_groups(grads)
    assert parts.shape == (3, len(sketch.groups), 32)
    torch.testing.assert_close(parts.sum(1), base.project(grads), rtol=1e-5, atol=1e-5)
    # each part is the projection of that group's columns alone
    g = sketch.groups[3]
    only = torch.zeros_like(grads)
    only[:, g.start : g.stop] = grads[:, g.start : g.stop]
    torch.testing.assert_close(parts[:, 3], base.project(only), rtol=1e-5, atol=1e-5)

    target = GradientTarget(model, params, get_output("loss"))
    idx = np.arange(5)
    ts, noises = draw_timesteps_and_noise(idx, cfg, model.num_train_timesteps, model.image_shape)
    batch = DrawBatch(tiny_dataset.images(idx), ts, noises)
    feats = sketch.example_features(target, batch, chunk_size=2)
    want = base.example_features(target, batch, chunk_size=2)
    assert want.abs().max() > 0
    torch.testing.assert_close(feats.sum(1), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    q = sketch.step_features(target, batch)
    want_q = base.step_features(target, batch)
    torch.testing.assert_close(q.sum(1), want_q, rtol=1e-4, atol=1e-5 * float(want_q.abs().max()))


def _toy(seed: int = 0, groups: int = 3, n: int = 40, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups, n, d, generator=g), torch.randn(4, groups, d, generator=g)


def _plain_trak(phi: torch.Tensor, q: torch.Tensor, ridge: float) -> torch.Tensor:
    """phi (N, d), q (S, d) -> (S, N): phi (phi^T phi + lambda I)^-1 q by a dense solve, in float64."""
    phi = phi.double()
    k = phi.T @ phi
    lam = ridge * float(torch.trace(k)) / k.shape[0]
    return (phi @ torch.linalg.solve(k + lam * torch.eye(k.shape[0], dtype=k.dtype), q.double().T)).T


def test_weights_of_one_group_give_its_score_and_uniform_the_mean():
    phi, q = _toy()
    ridge = 0.1
    trak = GroupedTrak(phi, [ridge])
    names = ["a", "b", "c"]
    per = trak.group_scores(q, ridge)  # (G, S, N)
    for g, name in enumerate(names):
        want = _plain_trak(phi[g], q[:, g], ridge)
        got = trak.scores(q, ParamGroupWeights.only(names, name), ridge)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trak.scores(q, ParamGroupWeights.uniform(names), ridge), per.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trak.scores(q, ParamGroupWeights(tuple(names), (1.0, 1.0, 1.0)), ridge), per.sum(0),
                               rtol=1e-5, atol=1e-6)
    # the joint score is plain TRAK of the summed features, and differs from the sum of group scores
    want = _plain_trak(phi.sum(0), q.sum(1), ridge)
    torch.testing.assert_close(trak.joint_scores(q, ridge).double(), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(trak.joint_scores(q, ridge), per.sum(0), atol=1e-3)


def test_weights_are_validated_and_round_trip():
    w = ParamGroupWeights(("a", "b"), (0.25, 0.75))
    assert ParamGroupWeights.from_dict(w.to_dict()) == w
    for bad in ((-0.1, 1.0), (0.0, 0.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="non-negative"):
            ParamGroupWeights(("a", "b"), bad)
    with pytest.raises(ValueError, match="names"):
        ParamGroupWeights(("a",), (0.5, 0.5))
    with pytest.raises(ValueError, match="no group"):
        ParamGroupWeights.only(["a"], "b")
    with pytest.raises(ValueError, match="group scores"):
        w.combine(torch.zeros(3, 1, 5))


def test_self_zscores_and_their_fit():
    g = torch.Generator().manual_seed(1)
    q, n = 30, 50
    idx = torch.randperm(n, generator=g)[:q]
    s = torch.randn(2, q, n, generator=g)
    s[0, torch.arange(q), idx] += 4.0  # group 0 retrieves the query's own example; group 1 is noise
    a, c = self_moments(s, idx)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    tau = torch.einsum("g,gqn->qn", w, s.double())
    want = (tau[torch.arange(q), idx] - tau.mean(1)) / tau.std(1, unbiased=False)
    torch.testing.assert_close(zscores(w, a, c), want)
    fitted = fit_self_retrieval_weights(a, c, ["signal", "noise"])
    assert fitted.to_dict()["signal"] > 0.9
    assert zscores(torch.tensor(fitted.weights, dtype=torch.float64), a, c).mean() > zscores(w, a, c).mean()
