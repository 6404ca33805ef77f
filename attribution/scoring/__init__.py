"""Scores: query features and per-step TRAK scores, masks, DAS, similarity baselines.

The names below load their submodule on first use (PEP 562), so that importing a light
submodule (``attribution.scoring.baselines``) does not import the scorer and diffusers.
"""

from __future__ import annotations

from ..lazy import lazy_exports

#: exported name -> the submodule that defines it
_EXPORTS = {
    "AnchoredScorer": "anchored",
    "AnchoredStore": "anchored",
    "GroupInfluence": "groups",
    "GroupedTrak": "param_groups",
    "ParamGroupWeights": "param_groups",
    "fit_self_retrieval_weights": "param_groups",
    "checkpoint_dirs": "anchored",
    "class_share_over_steps": "groups",
    "featurize_anchored": "anchored",
    "group_influence": "groups",
    "is_anchored": "anchored",
    "open_scorer": "anchored",
    "reference_store": "anchored",
    "Attribution": "scorer",
    "GroupKernels": "group_weights",
    "fit_group_weights": "group_fit",
    "load_group_weights": "group_weights",
    "BASELINES": "baselines",
    "BASELINE_METHODS": "baselines",
    "baseline_scores": "baselines",
    "BASELINE_NOTES": "baselines",
    "FINAL_SAMPLE_KEY": "scorer",
    "FULL": "masks",
    "PatchMask": "masks",
    "RESIDUALS_FILE": "das",
    "Scorer": "scorer",
    "SimilarityBaseline": "baselines",
    "das_weights": "das",
    "downsample_mask": "masks",
    "leverages": "das",
    "mask_from_file": "masks",
    "mask_from_selection": "masks",
    "mask_key": "masks",
    "mask_values": "masks",
    "prepare_mask": "masks",
    "query_noises": "scorer",
    "residual_errors": "das",
    "store_residuals": "das",
    "top_k": "scorer",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
