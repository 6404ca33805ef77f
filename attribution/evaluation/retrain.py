"""Resumable retraining of the benchmark's models (full-data checkpoints and subset models).

Each model is trained by :func:`attribution.models.training.train_ddpm` (what ``attribution
train --subset-mask`` runs); a finished model directory is skipped and a killed run
resumes at its last finished epoch, so the driver can be rerun at will.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import TrainConfig
from ..data.datasets import ArrayDataset
from ..models.training import train_ddpm

Log = Callable[[str], None]


def train_jobs(
    jobs: list[tuple[Path, np.ndarray | None, int]],
    dataset: ArrayDataset,
    train: TrainConfig,
    log: Log = print,
    coupled: bool = False,
    device: str | torch.device = "cpu",
) -> float:
    """Train every (out_dir, subset mask or None, seed) job whose ``out_dir`` does not exist yet.

    ``coupled``: subset models replay the full-data run of their seed (see :func:`train_ddpm`).
    ``device``: where the models train (same random stream on every device, see :func:`train_ddpm`).

    Returns:
        Seconds spent training in this call.
    """
    images = dataset.images(np.arange(len(dataset)))
    spent = 0.0
    todo = [j for j in jobs if not j[0].exists()]
    if len(todo) < len(jobs):
        log(f"found {len(jobs) - len(todo)} finished models, skipping them")
    for n, (out, mask, seed) in enumerate(todo):
        t0 = time.perf_counter()
        train_ddpm(images, out, replace(train, seed=seed), subset=mask, coupled=coupled, device=device)
        spent += time.perf_counter() - t0
        log(f"[{n + 1}/{len(todo)}] trained {out.name} in {time.perf_counter() - t0:.1f} s")
    return spent


def lds_jobs(
    paths, config, subsets: np.ndarray, limit: int | None = None, replicates: int = 1
) -> list[tuple[Path, np.ndarray | None, int]]:
    """Full-data checkpoints first (they are needed for attribution), then every subset model of
    replicate 0, then of replicate 1, ... (``replicates`` training seeds per subset). A subset model
    whose ground truth is cached already is left out: the truth is all the LDS needs of it."""
    jobs: list[tuple[Path, np.ndarray | None, int]] = [(paths.checkpoint(s), None, s) for s in config.checkpoint_seeds]
    for r in range(replicates):
        jobs += [(paths.subset_model(j, r), subsets[j], config.replicate_seed(r))
                 for j in range(len(subsets)) if not paths.truth_cache(j, r).exists()]
    return jobs if limit is None else jobs[:limit]
