"""Scores: query features and per-step TRAK scores, masks, DAS, similarity baselines."""

from .baselines import (
    BASELINE_NOTES,
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
from .masks import (
    FULL,
    PatchMask,
    downsample_mask,
    mask_from_selection,
    mask_key,
    mask_values,
    prepare_mask,
)
from .scorer import (
    FINAL_SAMPLE_KEY,
    Attribution,
    Scorer,
    query_noises,
    top_k,
)

__all__ = [
    "Attribution",
    "BASELINES",
    "BASELINE_NOTES",
    "FINAL_SAMPLE_KEY",
    "FULL",
    "PatchMask",
    "RESIDUALS_FILE",
    "Scorer",
    "SimilarityBaseline",
    "das_weights",
    "downsample_mask",
    "leverages",
    "mask_from_selection",
    "mask_key",
    "mask_values",
    "prepare_mask",
    "query_noises",
    "residual_errors",
    "store_residuals",
    "top_k",
]
