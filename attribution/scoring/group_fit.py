"""The label-free fit of journey-groups' block weights (:mod:`attribution.scoring.group_weights`).

A training image x_i, queried as if it were a step's x0_hat (Eq. 3 at x_i, a timestep of the
sampling schedule, K fresh noises -- not the store's draws), should retrieve itself. With the
per-group scores s_g(q, j) of such self-queries (averaged over checkpoints, as the Scorer does),
w maximizes the mean z-score of the self-score among the N scores
(:func:`~attribution.scoring.param_groups.fit_self_retrieval_weights`) on a share of the
self-queries; the rest measure it (held-out mean z-score, beside uniform weights and the one
joint kernel of journey-TRAK). No label enters the fit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..config import QueryConfig, SamplingConfig
from ..features.featurize import checkpoint_projector
from ..features.gradients import DrawBatch, GradientTarget, select_params
from ..features.outputs import get_output
from ..features.store import Store, StoreError
from .group_weights import GroupKernels, GroupWeightsFit, group_weights_status
from .param_groups import fit_self_retrieval_weights, self_moments, zscores
from .scorer import query_noises

if TYPE_CHECKING:
    from ..data.datasets import ImageDataset
    from ..features.projection.block_sjlt import BlockSparseSignProjector
    from ..models.base import DiffusionModel

__all__ = ["fit_group_weights", "self_group_scores", "self_query_set"]

Progress = Callable[[int, int], None]


def self_query_set(num: int, num_train: int, schedule: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) distinct random training indices and (Q,) timesteps drawn uniformly from the sampling ``schedule``."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_train, size=num, replace=False), rng.choice(np.asarray(schedule), size=num)


def self_group_scores(store: Store, models: Sequence[DiffusionModel], projectors: Sequence[BlockSparseSignProjector],
                      params: Sequence[dict[str, torch.Tensor]], dataset: ImageDataset, idx: np.ndarray,
                      timesteps: np.ndarray, query: QueryConfig, seed: int,
                      progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scores of the self-queries, averaged over checkpoints: (G, Q, N), and the joint
    (journey-TRAK) scores (Q, N), both float32.

    Self-query k is Eq. 3 at training image ``idx[k]`` and timestep ``timesteps[k]`` with K noises
    from ``(seed, k)`` (:func:`~attribution.scoring.scorer.query_noises`, fresh: not the store's draws).
    """
    n, num_q, num_m = store.num_train, len(idx), len(models)
    groups = len(projectors[0].row_slices)
    out = torch.zeros(groups, num_q, n)
    joint = torch.zeros(num_q, n)
    output = get_output(store.config.output)
    for m, model in enumerate(models):
        if model.is_conditional:
            raise ValueError("the group-weight fit supports unconditional models only (self-queries carry no prompt)")
        rows = []
        for k, (i, t) in enumerate(zip(idx, timesteps)):
            noises = query_noises([k], query.num_resamples, seed, model.image_shape)  # (1, K, C, H, W)
            ts = torch.full((1, noises.shape[1]), int(t), dtype=torch.long)
            batch = DrawBatch(dataset.images([int(i)]), ts, noises)
            rows.append(projectors[m].step_features(GradientTarget(model, params[m], output), batch).cpu())
            if progress:
                progress(m * num_q + k + 1, num_m * num_q)
        q = torch.cat(rows)  # (Q, d)
        kernel = store.kernel(m)  # read once: its diagonal blocks for the groups, the whole for the joint score
        block_kernels = GroupKernels(kernel, projectors[m].row_slices, query.ridge)
        solved = block_kernels.solve_groups(q)  # G x (d_g, Q)
        k_full = torch.from_numpy(kernel)
        lam = query.ridge * float(torch.trace(k_full)) / k_full.shape[0]
        joint_w = torch.linalg.solve(k_full + lam * torch.eye(k_full.shape[0], dtype=k_full.dtype), q.double().T).float()
        for start, block in store.iter_chunks(m):
            stop = start + block.shape[0]
            for g, rows_g in enumerate(block_kernels.row_slices):
                out[g, :, start:stop] += (block[:, rows_g] @ solved[g]).T
            joint[:, start:stop] += (block @ joint_w).T
    return out / num_m, joint / num_m


def fit_group_weights(store: Store, models: Sequence[DiffusionModel], dataset: ImageDataset,
                      query: QueryConfig = QueryConfig(), num_self: int = 800, self_seed: int = 12345,
                      fit_share: float = 0.5, steps: int = 400, lr: float = 0.05,
                      progress: Progress | None = None) -> GroupWeightsFit:
    """Fit the group weights of ``store`` at ``query.ridge`` from ``num_self`` self-queries (see module doc).

    The self-queries' timesteps are drawn from the first model's default sampling schedule.

    Raises:
        StoreError: not a block-sjlt store, or the models are not its checkpoints.
        ValueError: ``num_self`` or ``fit_share`` leave no fit or held-out queries.
    """
    from ..sampling.steps import StepSampler  # diffusers' schedulers

    if store.config.proj_kind != "block-sjlt":
        raise StoreError(group_weights_status(store, query.ridge) or "not a block-sjlt store")
    num_fit = int(round(fit_share * num_self))
    if not 0 < num_fit < num_self or num_self > store.num_train:
        raise ValueError(f"--num-self {num_self} with --fit-share {fit_share} leaves no fit or no held-out self-queries "
                         f"(or exceeds the {store.num_train} training examples)")
    if len(models) != store.num_checkpoints or any(
            mod.checkpoint_hash != c["hash"] for mod, c in zip(models, store.manifest["checkpoints"])):
        raise StoreError(f"the models are not the {store.num_checkpoints} checkpoints of store {store.root}")
    cfg = store.config
    params = [select_params(mod, cfg.param_filter) for mod in models]
    projectors = [checkpoint_projector(cfg, store.manifest["num_params"], m, mod.device, params[m])
                  for m, mod in enumerate(models)]
    schedule = [int(t) for t in StepSampler(models[0], SamplingConfig()).timesteps]
    idx, ts = self_query_set(num_self, store.num_train, schedule, self_seed)
    s, joint = self_group_scores(store, models, projectors, params, dataset, idx, ts, query, self_seed, progress)
    a, c = self_moments(s, torch.from_numpy(idx))
    names = projectors[0].group_names
    weights = fit_self_retrieval_weights(a[:num_fit], c[:num_fit], names, steps, lr)
    held = slice(num_fit, None)
    ja, jc = self_moments(joint[None], torch.from_numpy(idx))

    def mean_z(w: Sequence[float], a_: torch.Tensor, c_: torch.Tensor) -> float:
        return float(zscores(torch.tensor(list(w), dtype=torch.float64), a_[held], c_[held]).mean())

    z = mean_z(weights.weights, a, c)
    if not math.isfinite(z):
        raise ValueError("the group-weight fit gave a non-finite self z-score (are all train features zero?)")
    return GroupWeightsFit(weights, float(query.ridge), num_self, self_seed, fit_share, z,
                           mean_z([1.0 / len(names)] * len(names), a, c), mean_z([1.0], ja, jc))
