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
from .baselines import (
    BASELINES,
    BASELINE_NOTES,
    SimilarityBaseline,
)

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
