"""Query features and per-step scores for a trajectory (Algorithm 1 lines 10-17).

For a chosen set of steps s of a trajectory, with x0_hat held fixed (detached):

    g_{s,m}   = P_m grad_theta f_s(theta_m),  f_s as in Eq. (3) with K fresh noises
    tau_s     = (1/M) sum_m Phi_m (Phi_m^T Phi_m + lambda_m I)^-1 g_{s,m}

Sign convention: with the loss-type output of journey-TRAK, tau_s[i] > 0 means
training example i *lowers* f_s, i.e. makes what was generated more likely at
step s (a positive influencer); removing positive influencers should raise f_s.
This is the TRAK estimate of the change in f_s when example i is removed, so the
scores are shown as is, with that meaning.

The K noises of step s depend only on ``(noise_seed, s)`` and are reused by the
LDS ground truth (:func:`query_noises`).

Latent text-conditional models: x0_hat, the noises and the mask live in latent
space (a pixel mask is area-averaged onto the latent grid, :func:`downsample_mask`),
and f_s is conditioned on the trajectory's prompt, embedded by each checkpoint's
own text encoder (no guidance in the query: eps_theta(x, t, c_prompt)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..config import QueryConfig
from ..data.datasets import ImageDataset
from ..features.featurize import checkpoint_projector
from ..features.gradients import DrawBatch, GradientTarget, select_params
from ..features.outputs import Method, get_method, get_output
from ..features.store import STREAM_CHUNK_ROWS, Store, StoreError, objective_mismatch
from ..models.base import DiffusionModel
from .das import das_weights, leverages, store_residuals
from .group_weights import GroupKernels, load_group_weights
from .masks import prepare_mask

if TYPE_CHECKING:  # annotations only (the sampling module imports diffusers)
    from ..sampling.trajectory import Trajectory

Progress = Callable[[int, int], None]


#: Noise key of the final-sample ("destination") query; no real step index reaches it.
FINAL_SAMPLE_KEY = 1_000_000


def query_noises(steps: Sequence[int], num_resamples: int, noise_seed: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """The K noises of each step: (S, K, C, H, W), drawn on the CPU from ``(noise_seed, step)``."""
    out = []
    for s in steps:
        state = np.random.SeedSequence([int(noise_seed), 104729, int(s)]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        out.append(torch.randn((num_resamples, *image_shape), generator=g))
    return torch.stack(out)


@dataclass
class Attribution:
    """Scores of one trajectory.

    Attributes:
        scores: (S, N) float32, one row per attributed step (positive = makes the sample more likely).
        steps: (S,) indices into the trajectory.
        timesteps: (S,) the scheduler timesteps of those steps.
        method: method name.
    """

    scores: np.ndarray
    steps: np.ndarray
    timesteps: np.ndarray
    method: str

    def top_k(self, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.scores, k)


def top_k(scores: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k most positive and k most negative examples per row: ((S, k), (S, k)).

    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"top-k needs k of at least 1, not {k}")
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k], order[..., ::-1][..., :k]


class Scorer:
    """Answers queries against a finalized store for one method.

    Loads the kernels once, factors ``K_m + lambda_m I`` (Cholesky, float64), and
    keeps the projectors; each query is then gradients + one solve + a pass over Phi.
    """

    def __init__(
        self,
        store: Store,
        models: list[DiffusionModel],
        method: str | Method = "journey",
        query: QueryConfig = QueryConfig(),
        dataset: ImageDataset | None = None,
    ):
        """``dataset``: the store's training set, needed only by DAS methods (residual errors)."""
        self.store = store
        self.models = models
        self.method = get_method(method) if isinstance(method, str) else method
        self.query = query
        cfg = store.config
        if cfg.output != self.method.train_output:
            raise StoreError(
                f"method {self.method.name!r} needs train features of output {self.method.train_output!r}, "
                f"but store {store.root} holds {cfg.output!r}; featurize a store with --output {self.method.train_output}"
            )
        if len(models) != store.num_checkpoints:
            raise StoreError(f"store has {store.num_checkpoints} checkpoints, {len(models)} models were given")
        for m, model in enumerate(models):
            why = objective_mismatch(store.manifest.get("objective"), model.objective.identity)
            if why is not None:
                raise StoreError(f"model {model.path} does not fit store {store.root}: {why}")
            if model.checkpoint_hash != store.manifest["checkpoints"][m]["hash"]:
                raise StoreError(f"model {model.path} is not checkpoint {m} of store {store.root} (weights differ)")
        self.params = [select_params(model, cfg.param_filter) for model in models]
        self.projectors = [checkpoint_projector(cfg, store.manifest["num_params"], m, model.device, self.params[m])
                           for m, model in enumerate(models)]
        self.chol = []
        if self.method.combine == "trak":
            for m in range(len(models)):
                k = torch.from_numpy(store.kernel(m))
                lam = query.ridge * float(torch.trace(k)) / k.shape[0]
                k = k + lam * torch.eye(k.shape[0], dtype=k.dtype)
                self.chol.append(torch.linalg.cholesky(k))
        self.group_kernels: list[GroupKernels] = []  # journey-groups: per-group factors of each checkpoint
        self.group_weights: tuple[float, ...] = ()
        if self.method.combine == "group-trak":
            fit = load_group_weights(store, query.ridge)
            names = self.projectors[0].group_names
            if list(fit.weights.names) != names:
                raise StoreError(f"the group weights of {store.root} name groups {list(fit.weights.names)}, "
                                 f"the model has {names}; run `attribution fit-group-weights --store {store.root}`")
            self.group_weights = fit.weights.weights
            self.group_kernels = [GroupKernels(store.kernel(m), self.projectors[m].row_slices, query.ridge)
                                  for m in range(len(models))]
        self.influence = None  # ekfac / kfac: preconditioned query features (attribution.scoring.ekfac)
        if self.method.combine in ("ekfac", "kfac"):
            from .ekfac import InfluenceQuery

            self.influence = InfluenceQuery.from_store(store, models, self.method.combine, query.ridge, self.params)
        self._row_norms: list[np.ndarray] | None = None
        self.output = get_output(self.method.query_output)
        self.row_weights = self._das_weights(dataset) if self.method.row_weights else None

    def _das_weights(self, dataset: ImageDataset | None) -> list[np.ndarray]:
        """Per-checkpoint DAS row weights (N,), see :mod:`attribution.scoring.das`."""
        if dataset is None:
            raise ValueError(f"method {self.method.name!r} needs the training set (residual errors); pass dataset=")
        residuals = store_residuals(self.store, self.models, dataset)
        out = []
        for m in range(self.store.num_checkpoints):
            lev = None
            if self.method.row_weights == "das-leverage":
                lev = np.concatenate([
                    leverages(torch.from_numpy(self.store.read_rows(m, s, s + 8192).astype(np.float32)), self.chol[m]).numpy()
                    for s in range(0, self.store.num_train, 8192)
                ])
            out.append(das_weights(residuals[m], lev))
        return out

    def query_features(
        self,
        trajectory: Trajectory,
        steps: Sequence[int],
        mask: torch.Tensor | None = None,
        progress: Progress | None = None,
        prompt: str | None = None,
        pause: Callable[[], None] | None = None,
    ) -> list[torch.Tensor]:
        """Projected Eq. (3) gradients: one (S, d) float32 tensor per checkpoint (on the CPU).

        ``prompt`` (conditional models): the text f_s is conditioned on; default the
        trajectory's prompt, else ``""``. ``pause``: called between two gradient passes (a
        checkpoint's chunk of steps), where background work may give way to a user's request
        (:meth:`~attribution.workspace.jobs.PriorityLock.pause_point`).
        """
        steps = list(steps)
        if prompt is None:
            prompt = trajectory.prompt if trajectory.prompt is not None else ""
        shape = tuple(trajectory.x0_hat.shape[1:])
        if self.method.query_target == "final":
            return self._final_sample_features(trajectory, len(steps), mask, prompt)
        noises = self.step_noises(steps, shape)
        x0 = trajectory.x0_hat[steps]
        ts = trajectory.timesteps[steps][:, None].expand(-1, noises.shape[1])
        feats = []
        total = len(self.models) * len(steps)
        for m, model in enumerate(self.models):
            cond = model.encode_prompts([prompt]) if model.is_conditional else None  # (1, L, D)
            rows = []
            for c in range(0, len(steps), self.query.chunk_size):
                sl = slice(c, c + self.query.chunk_size)
                target = GradientTarget(model, self.params[m], self.output)
                batch = DrawBatch(x0[sl], ts[sl], noises[sl], mask, cond)
                if self.influence is not None:  # (1/N) P (H + lambda I)^-1 grad f_s
                    g = self.influence.features(m, self.projectors[m], target, batch)
                else:  # Plain backward passes (per step, or batched for the factorized projection), not vmap.
                    g = self.projectors[m].step_features(target, batch)
                rows.append(g.cpu())
                if progress:
                    progress(m * len(steps) + min(c + self.query.chunk_size, len(steps)), total)
                if pause:
                    pause()
            feats.append(torch.cat(rows))
        return feats

    def step_noises(self, steps: Sequence[int], image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The K noises of Eq. (3) for each step: (S, K, C, H, W) (fresh: :func:`query_noises`)."""
        return query_noises(steps, self.query.num_resamples, self.query.noise_seed, image_shape)

    def _final_sample_features(
        self, trajectory: Trajectory, num_steps: int, mask: torch.Tensor | None, prompt: str
    ) -> list[torch.Tensor]:
        """Plain TRAK of the final sample: Eq. (3) at x0 = sample with the K noises at the
        evenly spaced timesteps (k + 1/2) T / K; one row, repeated for each of ``num_steps``."""
        K = self.query.num_resamples
        shape = tuple(trajectory.sample.shape)
        noises = query_noises([FINAL_SAMPLE_KEY], K, self.query.noise_seed, shape)  # (1, K, C, H, W)
        feats = []
        for m, model in enumerate(self.models):
            T = model.num_train_timesteps
            ts = ((torch.arange(K) + 0.5) * T / K).long().clamp_(0, T - 1)[None]  # (1, K)
            cond = model.encode_prompts([prompt]) if model.is_conditional else None
            g = self.projectors[m].step_features(GradientTarget(model, self.params[m], self.output),
                                                 DrawBatch(trajectory.sample[None], ts, noises, mask, cond))
            feats.append(g.cpu().expand(num_steps, -1).contiguous())
        return feats

    def row_norms(self, chunk_rows: int = STREAM_CHUNK_ROWS) -> list[np.ndarray]:
        """(N,) norms of the train features of each checkpoint (ReTrac), computed once."""
        if self._row_norms is None:
            self._row_norms = []
            for m in range(self.store.num_checkpoints):
                norms = np.empty(self.store.num_train, dtype=np.float32)
                for start, block in self.store.iter_chunks(m, chunk_rows):
                    norms[start : start + block.shape[0]] = torch.linalg.vector_norm(block, dim=1).numpy()
                self._row_norms.append(np.maximum(norms, 1e-12))
        return self._row_norms

    def scores_from_features(
        self, feats: list[torch.Tensor], chunk_rows: int = STREAM_CHUNK_ROWS, pause: Callable[[], None] | None = None
    ) -> np.ndarray:
        """Combine query features with the store, streaming Phi in row chunks: (S, N) float32.

        trak:   tau = (1/M) sum_m Phi_m (K_m + lambda I)^-1 g_m
        tracin: tau = sum_m Phi_m g_m
        retrac: tau = sum_m (Phi_m / |rows|) (g_m / |g_m|)
        ekfac, kfac: tau = (1/M) sum_m Phi_m g_m, g_m already (1/N) P_m (H_m + lambda I)^-1 grad f
        group-trak: tau = (1/M) sum_m sum_g w_g Phi_{m,g} (K_{m,g} + lambda_{m,g} I)^-1 g_m[R_g]
            (:mod:`attribution.scoring.group_weights`)

        Memory: the (S, N) scores plus two reused chunk buffers (:meth:`Store.iter_chunks`).
        ``pause``: called after each checkpoint (see :meth:`query_features`).
        """
        n = self.store.num_train
        combine = self.method.combine
        out = torch.zeros((feats[0].shape[0], n), dtype=torch.float32)
        part = torch.empty((min(chunk_rows, n), feats[0].shape[0]), dtype=torch.float32)
        norms = self.row_norms() if combine == "retrac" else None
        for m, g in enumerate(feats):
            if combine == "trak":
                w = torch.cholesky_solve(g.double().T, self.chol[m]).float()  # (d, S)
            elif combine == "group-trak":
                w = self.group_kernels[m].solve(g, self.group_weights)  # (d, S), block by block
            elif combine == "retrac":
                w = (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
            else:
                w = g.T
            for start, block in self.store.iter_chunks(m, chunk_rows):
                rows = block.shape[0]
                p = torch.mm(block, w, out=part[:rows])  # (rows, S)
                if norms is not None:
                    p.div_(torch.from_numpy(norms[m][start : start + rows])[:, None])
                if self.row_weights is not None:
                    p.mul_(torch.from_numpy(self.row_weights[m][start : start + rows]).float()[:, None])
                out[:, start : start + rows].add_(p.T)
            if pause:
                pause()
        if combine in ("trak", "group-trak", "ekfac", "kfac"):
            out /= len(feats)
        return out.numpy()

    def score(
        self,
        trajectory: Trajectory,
        steps: Sequence[int] | None = None,
        mask: torch.Tensor | np.ndarray | None = None,
        progress: Progress | None = None,
        prompt: str | None = None,
        pause: Callable[[], None] | None = None,
    ) -> Attribution:
        """Scores for ``steps`` (default: all) of ``trajectory``, optionally for a pixel mask.

        ``prompt``: conditional models: the prompt the query is conditioned on
        (default: ``trajectory.prompt``, else ``""``). ``pause``: see :meth:`query_features`.
        """
        steps = list(range(trajectory.num_steps)) if steps is None else [int(s) for s in steps]
        if any(s < 0 or s >= trajectory.num_steps for s in steps):
            raise ValueError(f"steps must lie in [0, {trajectory.num_steps})")
        mask_t = prepare_mask(mask, tuple(trajectory.x0_hat.shape[1:]), self.models[0])
        feats = self.query_features(trajectory, steps, mask_t, progress, prompt=prompt, pause=pause)
        return Attribution(
            scores=self.scores_from_features(feats, pause=pause),
            steps=np.asarray(steps),
            timesteps=trajectory.timesteps[steps].numpy(),
            method=self.method.name,
        )
