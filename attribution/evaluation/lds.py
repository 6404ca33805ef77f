"""Linear datamodeling score (LDS) per step (journey-TRAK Section 3.2, D-TRAK's protocol).

For a query q at step s, with scores tau (N,) (positive = the example makes the
sample more likely, i.e. lowers the loss-type output f_s), the datamodel predicts

    f_s(theta(S_j)) ~ const - sign * sum_{i in S_j} tau[i]

and the LDS is Spearman's rho between the predictions and the true outputs across
the m subsets. ``sign`` = +1 is the convention above; the benchmark also reports
which sign a method needed on the validation split (a check of the convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..m along the last axis (average ranks for ties, as scipy), float64."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[-1] + 1, dtype=np.float64) * np.ones_like(x), axis=-1)
    # average the ranks of ties
    flat_x = x.reshape(-1, x.shape[-1])
    flat_r = ranks.reshape(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):
        vals, inv, counts = np.unique(flat_x[row], return_inverse=True, return_counts=True)
        if len(vals) < flat_x.shape[1]:
            sums = np.bincount(inv, weights=flat_r[row])
            flat_r[row] = (sums / counts)[inv]
    return flat_r.reshape(x.shape)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis of two arrays of the same shape (..., m) -> (...).

    A constant row gives nan (no ranking to correlate).
    """
    ra, rb = rankdata(a), rankdata(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)


def predicted_outputs(scores: np.ndarray, subsets: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """Datamodel predictions: scores (..., N), subsets (m, N) bool -> (..., m) = -sign * scores @ subsets^T."""
    return -sign * (np.asarray(scores, dtype=np.float64) @ subsets.T.astype(np.float64))


def lds(scores: np.ndarray, subsets: np.ndarray, truth: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """LDS of every query and step.

    Args:
        scores: (Q, S, N) scores of Q queries at S steps.
        subsets: (m, N) bool masks S_j.
        truth: (m, Q, S) true outputs f_s(theta(S_j)).

    Returns:
        (Q, S) Spearman's rho across the m subsets.
    """
    if scores.ndim != 3 or truth.shape != (subsets.shape[0], *scores.shape[:2]):
        raise ValueError(f"shapes do not fit: scores {scores.shape}, subsets {subsets.shape}, truth {truth.shape}")
    pred = predicted_outputs(scores, subsets, sign)  # (Q, S, m)
    return spearman(pred, np.moveaxis(truth, 0, -1))


def query_specific_lds(scores: np.ndarray, subsets: np.ndarray, truth: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """LDS of the query-specific part: predictions and true outputs minus their mean over the queries.

    What one subset does to every query alike (a better or worse model overall) cancels, so
    this asks whether the scores predict which subsets help *this* sample more than others.

    Args: as :func:`lds` (Q >= 2).

    Returns:
        (Q, S) Spearman's rho across the m subsets.
    """
    if scores.shape[0] < 2:
        raise ValueError("the query-specific LDS needs at least 2 queries")
    pred = predicted_outputs(scores, subsets, sign)  # (Q, S, m)
    true = np.moveaxis(truth, 0, -1)
    return spearman(pred - pred.mean(0, keepdims=True), true - true.mean(0, keepdims=True))


def subset_bootstrap(
    scores: np.ndarray, subsets: np.ndarray, truth: np.ndarray, sign: float = 1.0, num: int = 200, seed: int = 0
) -> np.ndarray:
    """Overall LDS (mean over queries and steps) of ``num`` bootstrap resamples of the subsets: (num,).

    The subsets, not the queries, are the benchmark's independent draws: one subset's model is
    better or worse for most queries at once (its truth is strongly correlated across queries),
    so the spread over queries understates the uncertainty. Resamples reuse the full-sample
    ranks (Pearson of ranks on the resampled subsets), a standard fast approximation of
    re-ranking. The same ``seed`` gives the same resamples for every method, so differences of
    two methods' outputs are paired.

    Args: as :func:`lds`.
    """
    m = subsets.shape[0]
    rp = rankdata(predicted_outputs(scores, subsets, sign))  # (Q, S, m)
    rt = rankdata(np.moveaxis(truth, 0, -1))
    idx = np.random.default_rng([seed, 7919]).integers(0, m, size=(num, m))
    out = np.empty(num)
    for b in range(num):
        a, c = rp[..., idx[b]], rt[..., idx[b]]
        a = a - a.mean(-1, keepdims=True)
        c = c - c.mean(-1, keepdims=True)
        den = np.sqrt((a * a).sum(-1) * (c * c).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b] = np.nanmean(np.where(den > 0, (a * c).sum(-1) / np.where(den > 0, den, 1), np.nan))
    return out


@dataclass
class LdsSummary:
    """Mean LDS per step over queries, with standard errors: mean, se (S,), overall mean/se (scalars)."""

    mean: np.ndarray
    se: np.ndarray
    overall: float
    overall_se: float


def summarize(values: np.ndarray) -> LdsSummary:
    """(Q, S) LDS values -> per-step mean and standard error over queries (nan ignored).

    The overall figure averages the steps per query first, so its standard error
    reflects the spread across queries.
    """
    v = np.asarray(values, dtype=np.float64)
    n = np.sum(~np.isnan(v), axis=0)
    mean = np.nanmean(v, axis=0)
    se = np.nanstd(v, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1))
    per_query = np.nanmean(v, axis=1)
    overall_se = float(np.nanstd(per_query, ddof=1) / np.sqrt(max(np.sum(~np.isnan(per_query)), 1)))
    return LdsSummary(mean=mean, se=se, overall=float(np.nanmean(per_query)), overall_se=overall_se)
