"""DAS, the Diffusion Attribution Score (arXiv 2410.18639), as row weights over a D-TRAK store.

DAS linearizes eps_theta (not the loss) around the trained weights and removes a
train example by one Newton step with a Sherman-Morrison correction. Written in
TRAK's features this is the D-TRAK kernel score of the square output, with every
train example i of checkpoint m weighted by

    w_{m,i} = r_{m,i} / mean_j r_{m,j}              (normalized residual error)
    w_{m,i} = r_{m,i} / mean_j r_{m,j} / (1 - h_{m,i})^2     (with the leverage correction)

where r_{m,i} = sqrt(mean_d ||y_d - p_theta_m(x_t, t_d)||^2 / pixels) (y_d the target of the
model's objective, eps_d for an epsilon model; p its prediction) is the root training loss of example i over its stored (timestep, noise) draws, and
h_{m,i} = phi_i^T (Phi^T Phi + lambda I)^-1 phi_i its leverage (in [0, 1)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.datasets import ImageDataset
from ..features.featurize import draw_timesteps_and_noise
from ..features.latents import model_space_dataset
from ..features.outputs import loss_output
from ..features.store import Store
from ..models.base import DiffusionModel
from ..tools.files import atomic_save_npy

RESIDUALS_FILE = "das_residuals.npy"


@torch.no_grad()
def residual_errors(model: DiffusionModel, dataset: ImageDataset, store: Store, batch_size: int = 128) -> np.ndarray:
    """r_i of every train example under ``model`` with the store's draws: (N,) float32 (pixel models)."""
    config = store.config
    data = model_space_dataset(dataset, model, None)
    n = len(dataset)
    out = np.empty(n, dtype=np.float32)
    objective = model.objective
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        x0 = data.images(idx).to(model.device)  # (B, C, H, W)
        ts, noises = draw_timesteps_and_noise(idx, config, model.num_train_timesteps, model.image_shape)
        b, d = ts.shape
        ts, noises = ts.to(model.device), noises.to(model.device)
        t = ts.reshape(-1)
        ca, cb = objective.coefficients(t)
        x0_rows, eps = x0.repeat_interleave(d, 0), noises.reshape(b * d, *noises.shape[2:])
        x_t = objective.noised(x0_rows, eps, ca, cb)
        prediction = model.prediction(model.unet(x_t, objective.model_timesteps(t)).sample)
        loss = loss_output(prediction, objective.target(x0_rows, eps, ca, cb)).view(b, d).mean(1)
        out[idx] = loss.sqrt().cpu().numpy()
    return out


def store_residuals(store: Store, models: list[DiffusionModel], dataset: ImageDataset) -> np.ndarray:
    """(M, N) residual errors, cached in the store directory (recomputed if the cache is stale)."""
    path = Path(store.root) / RESIDUALS_FILE
    shape = (store.num_checkpoints, store.num_train)
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        if cached.shape == shape:
            return cached
    if len(dataset) != store.num_train:
        raise ValueError(f"the dataset has {len(dataset)} examples, the store {store.num_train}")
    res = np.stack([residual_errors(m, dataset, store) for m in models])
    try:
        atomic_save_npy(path, res)
    except OSError:
        pass  # read-only store: keep the weights in memory only
    return res


def leverages(rows: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """h_i = phi_i^T (K + lambda I)^-1 phi_i for rows (B, d) given the Cholesky factor (d, d) -> (B,)."""
    solved = torch.cholesky_solve(rows.double().T, chol)  # (d, B)
    return (rows.double() * solved.T).sum(1).float()


def das_weights(residuals: np.ndarray, leverage: np.ndarray | None = None) -> np.ndarray:
    """Row weights of one checkpoint: residuals (N,), leverage (N,) or None -> (N,) float32."""
    w = residuals / max(float(np.mean(residuals)), 1e-12)
    if leverage is not None:
        w = w / np.clip(1.0 - leverage, 1e-3, None) ** 2
    return w.astype(np.float32)
