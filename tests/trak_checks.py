"""Brute-force references shared by the core tests (pixel, latent, every training objective).

* :func:`explicit_scores`: the TRAK formula by ``torch.linalg.solve`` on looped-autograd gradients.
* :func:`assert_self_attribution`: a training example queried with its own draws ranks itself first.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution.features import draw_timesteps_and_noise, get_output, looped_grads, per_example_grads, select_params
from attribution.scoring import query_noises


def explicit_scores(models, x_train, cfg, traj, steps, query, mask=None, captions=None):
    """tau_s = (1/M) sum_m Phi_m (Phi_m^T Phi_m + lambda_m I)^-1 g_{s,m}, by torch.linalg.solve.

    x_train (N, C, H, W) in model space; conditional models condition the train gradients on
    ``captions`` and the query on the trajectory's prompt.
    """
    total = 0
    out = get_output("loss")
    for model in models:
        params = select_params(model, cfg.param_filter)
        ts, noises = draw_timesteps_and_noise(np.arange(len(x_train)), cfg, model.num_train_timesteps, model.image_shape)
        train_cond = model.encode_prompts(captions) if model.is_conditional else None
        phi = looped_grads(model, params, out, x_train, ts, noises, cond=train_cond).double()
        K = query.num_resamples
        qn = query_noises(steps, K, query.noise_seed, model.image_shape)
        qt = traj.timesteps[steps][:, None].expand(-1, K)
        query_cond = model.encode_prompts([traj.prompt]) if model.is_conditional else None
        g = looped_grads(model, params, out, traj.x0_hat[steps], qt, qn, mask, cond=query_cond).double()
        kern = phi.T @ phi
        lam = query.ridge * torch.trace(kern) / kern.shape[0]
        total = total + (phi @ torch.linalg.solve(kern + lam * torch.eye(kern.shape[0], dtype=kern.dtype), g.T)).T
    return (total / len(models)).numpy()


def assert_self_attribution(scorer, cfg, x_train, captions=None):
    """Each training example, queried with its own (t, eps) draws (and caption), ranks itself first.

    The query gradient then *is* its train feature phi_j; with the identity projection and p > N,
    Phi (Phi^T Phi + lambda I)^-1 phi_j -> e_j as lambda -> 0, whatever the weights: score_j ~ 1, the
    others ~ 0. This checks the train path, the store and the TRAK solve end to end.
    """
    model = scorer.models[0]
    n = len(x_train)
    ts, noises = draw_timesteps_and_noise(np.arange(n), cfg, model.num_train_timesteps, model.image_shape)
    cond = model.encode_prompts(captions) if model.is_conditional else None
    g = per_example_grads(model, scorer.params[0], get_output("loss"), x_train, ts, noises, cond=cond)
    scores = scorer.scores_from_features([scorer.projectors[0].project(g)])
    assert (scores.argmax(1) == np.arange(n)).all()
    assert np.diag(scores).min() > 0.9 and np.abs(scores - np.diag(np.diag(scores))).max() < 0.1
