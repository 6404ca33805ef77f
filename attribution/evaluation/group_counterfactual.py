"""Group counterfactuals: retrain without a class or a style cluster, compare with the summed scores.

For a removed group G, the scores predict the change of the Eq. (3) output

    predicted Delta f_s(G) = sum_{i in G} tau_s[i]          (positive tau: the example lowers f_s)

and the measured change is ``f_s(theta(D \\ G)) - f_s(theta(D))``, both models of the same
training seed (coupled retraining: the same run replayed without G). Reported per step:
Spearman's rho across the groups (the LDS of the ``groups`` design up to a constant), and
the sign agreement, the share of (group, query) pairs where the predicted and the measured
change have the same sign.
"""

from __future__ import annotations

import numpy as np

from .lds import spearman


def group_predictions(scores: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """scores (Q, S, N), removed (G, N) bool -> predicted changes (Q, S, G) = sum of the removed scores."""
    return np.asarray(scores, dtype=np.float64) @ removed.T.astype(np.float64)


def measured_changes(group_truth: np.ndarray, full_truth: np.ndarray) -> np.ndarray:
    """group_truth (R, G, Q, S) and full_truth (R, Q, S) of R training seeds -> mean change (Q, S, G)."""
    return (group_truth - full_truth[:, None]).mean(0).transpose(1, 2, 0)


def group_metrics(scores: np.ndarray, removed: np.ndarray, delta: np.ndarray) -> dict[str, list[float]]:
    """Per step: mean Spearman across groups, its standard error over queries, and the sign agreement.

    Args:
        scores: (Q, S, N); removed: (G, N) bool; delta: (Q, S, G) measured changes.
    """
    pred = group_predictions(scores, removed)
    rho = spearman(pred, delta)  # (Q, S)
    q = rho.shape[0]
    agree = (np.sign(pred) == np.sign(delta)).mean(axis=(0, 2))
    return {
        "spearman": np.nanmean(rho, 0).tolist(),
        "spearman_se": (np.nanstd(rho, 0, ddof=1) / np.sqrt(q)).tolist() if q > 1 else [0.0] * rho.shape[1],
        "sign_agreement": agree.tolist(),
    }


def seed_agreement(group_truth: np.ndarray, full_truth: np.ndarray) -> list[float]:
    """Validity of the group truth: mean Spearman across groups between the changes of two training
    seeds, over seed pairs and queries, per step. (R, G, Q, S), (R, Q, S) -> (S,) (nan for R < 2)."""
    deltas = (group_truth - full_truth[:, None]).transpose(0, 2, 3, 1)  # (R, Q, S, G)
    r = len(deltas)
    if r < 2:
        return [float("nan")] * deltas.shape[2]
    pairs = [spearman(deltas[a], deltas[b]) for a in range(r) for b in range(a + 1, r)]
    return np.nanmean(np.stack(pairs), axis=(0, 1)).tolist()
