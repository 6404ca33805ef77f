"""Ablations of the TRAK-type methods on the LDS benchmark: timesteps of the train draws
(matched to each step, or their sampling), number of checkpoints M, projection dimension
and kind, and the number K of query noises.

Timesteps (train features drawn over all timesteps vs matched to the query's step):

journey-TRAK (Algorithm 1 line 3) averages each train example's loss gradient over
(timestep, noise) draws from all of [0, T), while the query of step s (Eq. 3) is the
loss gradient at the one timestep t_s. Mean loss gradients of one image at two
timesteps are nearly orthogonal once they are more than a few tens of timesteps
apart, so with D draws only the draws that land near t_s carry signal for step s.
This module scores every step against train features whose draws are confined to a
window around t_s (``FeaturizeConfig.timestep_range``), one store per reported step,
so the LDS of the two designs can be compared on the same ground truth.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from ..features.outputs import get_method
from .run import LdsRun
from .scores import gradient_scores, query_feature_cache


def step_window(t: int, half_width: int, num_train_timesteps: int) -> tuple[int, int]:
    """Timestep range ``[t - half_width, t + half_width]`` clipped to ``[0, T)``, as ``(lo, hi)``."""
    return max(0, t - half_width), min(num_train_timesteps, t + half_width + 1)


def matched_candidates(run: LdsRun, method: str, num_draws: Sequence[int], half_width: int) -> dict[tuple, np.ndarray]:
    """{(num_draws, ridge): scores (Q, S, N)} where step s is scored against a store drawn around t_s.

    Args:
        method: a TRAK-type store method (journey, dtrak-square, das, ...).
        half_width: the draws of step s come from ``step_window(t_s, half_width, T)``; 0 puts
            every draw exactly at t_s.
    """
    m = get_method(method)
    if m.combine != "trak":
        raise ValueError(f"the timestep ablation needs a TRAK-type method, not {method!r}")
    T = run.models[0].num_train_timesteps
    steps = list(run.spec.steps)
    timesteps = run.queries.timesteps[steps].tolist()
    Q, N = run.queries.x0_hat.shape[0], len(run.dataset)
    out: dict[tuple, np.ndarray] = {}
    for d in num_draws:
        for c, t in enumerate(timesteps):
            store = run.store(m.train_output, d, step_window(int(t), half_width, T))
            feats = query_feature_cache(run.paths.root, store, run.models, method, run.queries, run.spec, run.log)
            for r in run.grid.ridges:
                scores = out.setdefault((d, r), np.zeros((Q, len(steps), N), dtype=np.float32))
                scores[:, c] = gradient_scores(store, run.models, method, feats[:, :, c : c + 1], r, run.dataset)[:, 0]
    return out


def checkpoint_candidates(run: LdsRun, method: str, num_checkpoints: int) -> dict[tuple, np.ndarray]:
    """:meth:`LdsRun.candidate_scores` with only the first ``num_checkpoints`` checkpoints averaged (M ablation)."""
    m = get_method(method)
    if m.combine != "trak":
        raise ValueError(f"the checkpoint ablation needs a TRAK-type method, not {method!r}")
    if not 1 <= num_checkpoints <= len(run.models):
        raise ValueError(f"num_checkpoints must be in 1..{len(run.models)}")
    return run.candidate_scores(method, num_checkpoints)


def resample_candidates(run: LdsRun, method: str, num_resamples: int) -> dict[tuple, np.ndarray]:
    """:meth:`LdsRun.candidate_scores` with query features averaged over ``num_resamples`` noises (K of Eq. 3)
    instead of the K the ground truth uses. The noises of step s are the first K' of one fixed stream, so
    K' < K uses a subset of the truth's noises and K' > K adds noises the truth does not use."""
    if num_resamples < 1:
        raise ValueError("num_resamples must be >= 1")
    return replace(run, spec=replace(run.spec, num_resamples=num_resamples)).candidate_scores(method)


def featurize_candidates(run: LdsRun, method: str, **changes) -> dict[tuple, np.ndarray]:
    """:meth:`LdsRun.candidate_scores` with other featurize settings, e.g. ``proj_dim``, ``proj_kind``
    or ``timestep_sampling`` (the d, projection and timestep-sampling ablations)."""
    return replace(run, base=replace(run.base, **changes)).candidate_scores(method)
