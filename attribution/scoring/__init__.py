"""Scores: query features and per-step TRAK scores, masks, DAS, similarity baselines."""

from .baselines import (
    BASELINES,
    SimilarityBaseline,
)
from .das import (
    RESIDUALS_FILE,
    das_weights,
    leverages,
    residual_errors,
    store_residuals,
)
from .scorer import (
    FINAL_SAMPLE_KEY,
    Attribution,
    Scorer,
    downsample_mask,
    prepare_mask,
    query_noises,
    top_k,
)

__all__ = [
    "Attribution",
    "BASELINES",
    "FINAL_SAMPLE_KEY",
    "RESIDUALS_FILE",
    "Scorer",
    "SimilarityBaseline",
    "das_weights",
    "downsample_mask",
    "leverages",
    "prepare_mask",
    "query_noises",
    "residual_errors",
    "store_residuals",
    "top_k",
]
