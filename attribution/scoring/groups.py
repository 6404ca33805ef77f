"""Group influence of one step: the summed score of every group of training examples.

For scores tau (N,) of a step and a grouping of the training set (its class labels, or
clusters of captions), the group influence of group G is ``sum_{i in G} tau[i]``: exactly
the change of f_t that removing G predicts (positive: removing G would make what was
generated *less* likely at that step). Also reported: each group's share of the total
positive influence ``sum_i max(tau_i, 0)`` and of the total negative influence, and the
group make-up of the top-k positive and negative influencers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupInfluence:
    """Group influence of one step over G groups.

    Attributes:
        names: (G,) group names.
        sums: (G,) summed scores.
        positive_share: (G,) share of the total positive influence held by each group.
        negative_share: (G,) share of the total negative influence held by each group.
        top_positive_counts: (G,) how many of the top-k positive influencers are in each group.
        top_negative_counts: (G,) the same for the k most negative.
        top_k: k.
    """

    names: list[str]
    sums: np.ndarray
    positive_share: np.ndarray
    negative_share: np.ndarray
    top_positive_counts: np.ndarray
    top_negative_counts: np.ndarray
    top_k: int

    @property
    def strongest(self) -> int:
        """Index of the group with the largest summed score."""
        return int(np.argmax(self.sums))


def group_influence(scores: np.ndarray, groups: np.ndarray, names: list[str], top_k: int = 8) -> GroupInfluence:
    """Group influence of scores (N,) for group ids (N,) in [0, G) with G = len(names)."""
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    g = len(names)
    if scores.shape != groups.shape:
        raise ValueError(f"scores {scores.shape} and groups {groups.shape} must have the same shape")
    if groups.size and (groups.min() < 0 or groups.max() >= g):
        raise ValueError(f"group ids must lie in [0, {g})")
    pos, neg = np.maximum(scores, 0.0), np.maximum(-scores, 0.0)
    order = np.argsort(-scores, kind="stable")
    k = min(top_k, len(scores))
    return GroupInfluence(
        names=list(names),
        sums=np.bincount(groups, weights=scores, minlength=g),
        positive_share=np.bincount(groups, weights=pos, minlength=g) / max(pos.sum(), 1e-300),
        negative_share=np.bincount(groups, weights=neg, minlength=g) / max(neg.sum(), 1e-300),
        top_positive_counts=np.bincount(groups[order[:k]], minlength=g),
        top_negative_counts=np.bincount(groups[order[::-1][:k]], minlength=g),
        top_k=k,
    )


def class_share_over_steps(scores: np.ndarray, groups: np.ndarray, group: int, top_k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """journey-TRAK Figure 3: share of ``group`` among the top-k positive and the top-k negative
    influencers at every step. scores (S, N) -> ((S,), (S,))."""
    order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
    groups = np.asarray(groups)
    return (groups[order[:, :top_k]] == group).mean(1), (groups[order[:, ::-1][:, :top_k]] == group).mean(1)
