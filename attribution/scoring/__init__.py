"""Scores: query features and per-step TRAK scores, masks, DAS, similarity baselines."""

from .masks import (
    FULL,
    mask_from_selection,
    PatchMask,
    mask_key,
    mask_values,
    downsample_mask,
    prepare_mask,
)
from .scorer import (
    FINAL_SAMPLE_KEY,
    query_noises,
    Attribution,
    top_k,
    Scorer,
)
from .das import (
    RESIDUALS_FILE,
    residual_errors,
    store_residuals,
    leverages,
    das_weights,
)
from .baselines import (
    BASELINES,
    BASELINE_NOTES,
    SimilarityBaseline,
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
