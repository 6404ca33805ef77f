"""Scores of every method on the benchmark's queries, cached so that LDS is recomputed in seconds.

Gradient methods share query features by (output, query target, projection):
journey-TRAK, TracIn and ReTrac use the same loss features; D-TRAK's square output
serves D-TRAK and DAS. Train features come from stores built with a
:class:`~attribution.config.FeaturizeConfig` given by the caller (so variants,
e.g. the number of (timestep, noise) draws, can be compared).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import FeaturizeConfig, QueryConfig
from ..data.datasets import ArrayDataset
from ..features.featurize import featurize
from ..features.outputs import get_method
from ..features.store import Store
from ..models.base import DiffusionModel
from ..scoring.baselines import SimilarityBaseline
from ..scoring.scorer import Scorer
from ..tools.files import atomic_save_npy
from .queries import QuerySet, QuerySpec

Log = Callable[[str], None]

SIMILARITY = ("pixel", "embedding")


def store_name(config: FeaturizeConfig) -> str:
    """Directory name of a store variant, e.g. ``loss-d16-stratified-sjlt2048`` (``...-t40_41-...`` with a timestep
    range, ``...-crn-...`` with common random numbers)."""
    span = f"-t{config.timestep_range[0]}_{config.timestep_range[1]}" if config.timestep_range else ""
    crn = "-crn" if config.draw_sharing == "common" else ""
    return (f"{config.output}-d{config.num_draws}-{config.effective_timestep_sampling}{span}{crn}-"
            f"{config.proj_kind}{config.proj_dim}")


def build_store(root: Path, models: list[DiffusionModel], dataset: ArrayDataset, config: FeaturizeConfig, log: Log = print) -> Store:
    """Featurize (or reopen) the store of ``config`` under ``root/stores``."""
    path = root / "stores" / store_name(config)
    return featurize(models, dataset, path, config, log=log)


def query_feature_cache(
    root: Path,
    store: Store,
    models: list[DiffusionModel],
    method: str,
    queries: QuerySet,
    spec: QuerySpec,
    log: Log = print,
) -> np.ndarray:
    """Projected query gradients (M, Q, S, d) of ``method``'s query output, cached on disk.

    The cache key is what the features depend on: query output and target, projection, K, steps.
    """
    m = get_method(method)
    cfg = store.config
    key = f"{m.query_output}-{m.query_target}-{cfg.proj_kind}{cfg.proj_dim}-p{cfg.proj_seed}-K{spec.num_resamples}-n{spec.noise_seed}"
    path = root / "features" / f"{key}.npy"
    Q, S = queries.x0_hat.shape[0], len(spec.steps)
    if path.exists():
        feats = np.load(path, allow_pickle=False)
        if feats.shape[:3] == (len(models), Q, S):
            return feats
    # Query features do not depend on DAS's train-row weights: skip computing them (they need the dataset).
    scorer = Scorer(store, models, replace(m, row_weights=None),
                    QueryConfig(num_resamples=spec.num_resamples, noise_seed=spec.noise_seed))
    out = np.zeros((len(models), Q, S, cfg.proj_dim), dtype=np.float32)
    for q in range(Q):
        traj = queries.trajectory(q, spec.num_inference_steps)
        for mi, f in enumerate(scorer.query_features(traj, spec.steps)):
            out[mi, q] = f.numpy()
        if (q + 1) % 10 == 0:
            log(f"query features {key}: {q + 1}/{Q}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(path, out)
    return out


def gradient_scores(
    store: Store,
    models: list[DiffusionModel],
    method: str,
    feats: np.ndarray,
    ridge: float,
    dataset: ArrayDataset,
) -> np.ndarray:
    """Scores (Q, S, N) of a store method from cached query features (M, Q, S, d)."""
    scorer = Scorer(store, models, method, QueryConfig(ridge=ridge), dataset=dataset)
    M, Q, S, d = feats.shape
    flat = [torch.from_numpy(feats[m].reshape(Q * S, d)) for m in range(M)]
    return scorer.scores_from_features(flat).reshape(Q, S, -1)


def classifier_embed(size: int = 32) -> Callable[[torch.Tensor], torch.Tensor]:
    """The digit classifier's embedding, resizing (B, 1, h, w) images to the classifier's 32x32."""
    from ..models.classifier import load_classifier

    clf = load_classifier()

    def embed(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return clf.embed(x)

    return embed


def similarity_scores(name: str, dataset: ArrayDataset, queries: QuerySet, spec: QuerySpec) -> np.ndarray:
    """Pixel or embedding cosine similarity of x0_hat at every query and step: (Q, S, N)."""
    if name not in SIMILARITY:
        raise ValueError(f"unknown baseline {name!r}; choose one of {SIMILARITY}")
    base = SimilarityBaseline(dataset, classifier_embed() if name == "embedding" else None, name)
    x0 = queries.x0_hat[:, list(spec.steps)]
    Q, S = x0.shape[:2]
    return base.scores(x0.reshape(Q * S, *x0.shape[2:])).reshape(Q, S, -1)


def featurize_variants(base: FeaturizeConfig, outputs: Sequence[str], num_draws: Sequence[int]) -> list[FeaturizeConfig]:
    """Every (output, num_draws) variant of ``base``."""
    return [replace(base, output=o, num_draws=d) for o in outputs for d in num_draws]
