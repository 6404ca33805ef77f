"""Two descriptive measures of a method's scores over many queries.

* Generally influential examples (Diffusion-ReTrac, Section 5): how often the same
  train examples appear in the top-k of different queries. A method biased by
  gradient norms ranks the same few examples first for every query.
* Score correlation across steps (journey-TRAK, Appendix B.5): Spearman's rho between
  the scores of one sample at two steps, as a function of their distance.
"""

from __future__ import annotations

import numpy as np

from ..scoring.scorer import top_k
from .lds import spearman, summarize


def top_k_overlap(scores: np.ndarray, k: int = 10, frequent: float = 0.2) -> dict:
    """Top-k recurrence over queries: scores (Q, N) at one step.

    Returns:
        ``distinct``: examples appearing in any top-k list; ``frequent``: examples in
        more than ``frequent`` of the Q lists; ``max_share``: largest share of lists
        one example appears in; ``counts``: (N,) appearances (list).
    """
    q, n = scores.shape
    pos, _ = top_k(scores, k)
    counts = np.bincount(pos.reshape(-1), minlength=n)
    return {
        "k": k,
        "num_queries": q,
        "distinct": int((counts > 0).sum()),
        "frequent": int((counts > frequent * q).sum()),
        "frequent_threshold": frequent,
        "max_share": float(counts.max() / q),
        "counts": counts.tolist(),
    }


def step_correlation(scores: np.ndarray, steps: list[int]) -> dict:
    """Mean Spearman rho between the scores of one query at two steps, by step distance.

    Args:
        scores: (Q, S, N) scores at ``steps`` (S step indices).

    Returns:
        {"distance": [...], "rho": [...], "se": [...]} over every pair of distinct steps.
    """
    by_dist: dict[int, list[float]] = {}
    for a in range(len(steps)):
        for b in range(a + 1, len(steps)):
            rho = spearman(scores[:, a], scores[:, b])  # (Q,)
            by_dist.setdefault(abs(steps[b] - steps[a]), []).extend(rho[~np.isnan(rho)].tolist())
    dists = sorted(by_dist)
    rho = [float(np.mean(by_dist[d])) for d in dists]
    se = [float(np.std(by_dist[d], ddof=1) / np.sqrt(len(by_dist[d]))) if len(by_dist[d]) > 1 else 0.0 for d in dists]
    return {"distance": dists, "rho": rho, "se": se}


def paired_margins(results: dict, reference: str = "journey") -> dict:
    """LDS of ``reference`` minus every other method on the same queries: per-step mean and s.e.

    ``results[m]["per_query"]`` is (Q, S); pairing by query removes the shared query difficulty.
    ``overall_se_subsets``: the s.e. of the overall margin over the subset bootstrap (the same resamples
    for both methods), where both results carry one.
    """
    if reference not in results:
        return {}
    ref = np.asarray(results[reference]["per_query"], dtype=float)
    out = {}
    for name, r in results.items():
        if name == reference:
            continue
        s = summarize(ref - np.asarray(r["per_query"], dtype=float))
        out[name] = {"mean": s.mean.tolist(), "se": s.se.tolist(), "overall": s.overall, "overall_se": s.overall_se}
        if "bootstrap" in r and "bootstrap" in results[reference]:
            diff = np.asarray(results[reference]["bootstrap"]) - np.asarray(r["bootstrap"])
            out[name]["overall_se_subsets"] = float(diff.std(ddof=1))
    return out


def replicate_agreement(truths: np.ndarray) -> dict | None:
    """How reproducible the ground truth is: Spearman's rho across subsets between the true outputs of
    two training seeds of the same subsets, averaged over every pair of seeds.

    It is the LDS a perfect predictor of one seed's outputs would get against another seed's, so it
    bounds what any method can reach against a one-seed truth.

    Args:
        truths: (R, m, Q, S) true outputs of R training seeds per subset.

    Returns:
        None when R < 2, else {"mean", "se" (S,), "overall", "overall_se", "pairs"}.
    """
    R = truths.shape[0]
    if R < 2:
        return None
    pairs = [(a, b) for a in range(R) for b in range(a + 1, R)]
    rho = np.mean([spearman(np.moveaxis(truths[a], 0, -1), np.moveaxis(truths[b], 0, -1)) for a, b in pairs], axis=0)
    s = summarize(rho)  # rho: (Q, S)
    return {"mean": s.mean.tolist(), "se": s.se.tolist(), "overall": s.overall, "overall_se": s.overall_se,
            "pairs": len(pairs)}


def cross_query_agreement(truth: np.ndarray) -> list[float]:
    """Mean Spearman's rho across subsets between the true outputs of two different queries, per step.

    Near 1 means one subset's model is better or worse for every query alike: the truth is then
    mostly a global subset effect, not a query-specific one.

    Args:
        truth: (m, Q, S) true outputs.

    Returns:
        (S,) mean over all pairs of distinct queries.
    """
    m, Q, S = truth.shape
    iu = np.triu_indices(Q, 1)
    out = []
    for s in range(S):
        x = truth[:, :, s].T  # (Q, m)
        rho = spearman(np.repeat(x[:, None], Q, 1), np.repeat(x[None], Q, 0))  # (Q, Q)
        out.append(float(np.nanmean(rho[iu])))
    return out
