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
from .anchored import (
    AnchoredScorer,
    AnchoredStore,
    checkpoint_dirs,
    featurize_anchored,
    is_anchored,
    open_scorer,
    reference_store,
)
from .groups import GroupInfluence, class_share_over_steps, group_influence

__all__ = [
    "AnchoredScorer",
    "AnchoredStore",
    "GroupInfluence",
    "checkpoint_dirs",
    "class_share_over_steps",
    "featurize_anchored",
    "group_influence",
    "is_anchored",
    "open_scorer",
    "reference_store",
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
