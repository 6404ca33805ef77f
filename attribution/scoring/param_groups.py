"""Per-parameter-group TRAK scores and their learned weights (Li, Le, Xu, Salzmann, ICLR 2026, arXiv 2506.05647).

With per-group train features Phi_g (N, d) and query features q_g (d,)
(:class:`~attribution.features.projection.grouped.GroupedSketch`; sum_g Phi_g is the store's Phi),
each group g has its own TRAK score (its own kernel):

    s_g(q, i) = phi_{g,i}^T (Phi_g^T Phi_g + lambda_g I)^-1 q_g,   lambda_g = ridge * tr(Phi_g^T Phi_g) / d

and the weighted score is tau_w(q, i) = sum_g w_g s_g(q, i) with non-negative weights w
(:class:`ParamGroupWeights`). A single checkpoint is scored here; an ensemble averages tau_w
over its checkpoints, as :class:`~attribution.scoring.scorer.Scorer` does.

The weights are learned without labels (:func:`fit_self_retrieval_weights`): a training image x_i
queried as a step's x0_hat (Eq. 3 at x_i, a sampling timestep, K fresh noises) should retrieve
itself; w maximizes the mean z-score of the self-score among the N scores of such self-queries,

    z_w(q) = (tau_w(q, i) - mean_j tau_w(q, j)) / std_j tau_w(q, j) = w^T a_q / sqrt(w^T C_q w)

with a_q = s(q, i) - mean_j s(q, j) (G,) and C_q = cov_j s(q, j) (G, G) (:func:`self_moments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["GroupedTrak", "ParamGroupWeights", "fit_simplex_weights", "fit_self_retrieval_weights", "self_moments",
           "zscores"]


@dataclass(frozen=True)
class ParamGroupWeights:
    """Non-negative weights w_g of named parameter groups (their scale does not change rankings).

    Attributes:
        names: (G,) group names, in gradient order.
        weights: (G,) w_g >= 0, not all 0.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights):
            raise ValueError(f"{len(self.names)} group names but {len(self.weights)} weights")
        w = np.asarray(self.weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"group weights must be finite, non-negative and not all zero: {list(self.weights)}")

    @classmethod
    def uniform(cls, names: Sequence[str]) -> "ParamGroupWeights":
        return cls(tuple(names), tuple(1.0 / len(names) for _ in names))

    @classmethod
    def only(cls, names: Sequence[str], name: str) -> "ParamGroupWeights":
        """Weight 1 on group ``name``, 0 elsewhere: that group's score alone."""
        if name not in names:
            raise ValueError(f"no group {name!r} among {list(names)}")
        return cls(tuple(names), tuple(float(n == name) for n in names))

    def to_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> "ParamGroupWeights":
        return cls(tuple(d), tuple(float(v) for v in d.values()))

    def combine(self, group_scores: torch.Tensor) -> torch.Tensor:
        """tau_w = sum_g w_g s_g: (G, S, N) -> (S, N)."""
        if group_scores.shape[0] != len(self.weights):
            raise ValueError(f"{group_scores.shape[0]} group scores for {len(self.weights)} weights")
        w = torch.tensor(self.weights, dtype=group_scores.dtype)
        return torch.einsum("g,gsn->sn", w, group_scores)


class GroupedTrak:
    """Per-group TRAK scores of one checkpoint from per-group train features.

    phi: (G, N, d) float32 per-group train features. One Cholesky factor (float64) of
    Phi_g^T Phi_g + lambda_g I per (group, ridge), and of the joint kernel of sum_g Phi_g (the
    plain journey-TRAK score, for comparison)."""

    def __init__(self, phi: torch.Tensor, ridges: Sequence[float]):
        self.phi = phi
        self.joint_phi = phi.sum(0)
        self.chol: dict[tuple[int, float], torch.Tensor] = {}
        for g, p in enumerate([*phi, self.joint_phi]):  # index G: the joint kernel
            k = p.double().T @ p.double()
            for r in ridges:
                lam = r * float(torch.trace(k)) / k.shape[0]
                self.chol[(g, float(r))] = torch.linalg.cholesky(k + lam * torch.eye(k.shape[0], dtype=k.dtype))

    @staticmethod
    def _trak(phi: torch.Tensor, chol: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Phi (K + lambda I)^-1 q: phi (N, d), q (S, d) -> (S, N)."""
        return (phi @ torch.cholesky_solve(q.double().T, chol).float()).T

    def group_scores(self, q: torch.Tensor, ridge: float) -> torch.Tensor:
        """s_g(q, i): per-group query features q (S, G, d) -> (G, S, N)."""
        return torch.stack([self._trak(self.phi[g], self.chol[(g, float(ridge))], q[:, g])
                            for g in range(self.phi.shape[0])])

    def scores(self, q: torch.Tensor, weights: ParamGroupWeights, ridge: float) -> torch.Tensor:
        """tau_w(q, i) = sum_g w_g s_g(q, i): (S, G, d) -> (S, N)."""
        return weights.combine(self.group_scores(q, ridge))

    def joint_scores(self, q: torch.Tensor, ridge: float) -> torch.Tensor:
        """The plain journey-TRAK score of phi = sum_g phi_g and q = sum_g q_g: (S, G, d) -> (S, N)."""
        return self._trak(self.joint_phi, self.chol[(self.phi.shape[0], float(ridge))], q.sum(1))


def self_moments(s: torch.Tensor, self_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of self-queries' per-group scores s (G, Q, N), query q being training example ``self_idx[q]``:
    a (Q, G) = s(q, i_q) - mean_j s(q, j) and C (Q, G, G) = cov_j s(q, j), float64 (see :func:`zscores`)."""
    centred = s.double() - s.double().mean(2, keepdim=True)
    a = centred[:, torch.arange(s.shape[1]), self_idx].T
    c = torch.einsum("gqn,hqn->qgh", centred, centred) / s.shape[2]
    return a, c


def zscores(w: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(Q,) z-scores w^T a_q / sqrt(w^T C_q w) of the self-score under weights w (G,) (:func:`self_moments`)."""
    return (a @ w) / torch.einsum("g,qgh,h->q", w, c, w).clamp_min(1e-30).sqrt()


def fit_simplex_weights(objective: Callable[[torch.Tensor], torch.Tensor], num_groups: int, steps: int = 400,
                        lr: float = 0.05) -> np.ndarray:
    """argmax of the scalar ``objective(w)`` over the simplex, w = softmax(theta), by Adam from uniform w: (G,)."""
    theta = torch.zeros(num_groups, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-objective(torch.softmax(theta, 0))).backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).numpy()


def fit_self_retrieval_weights(a: torch.Tensor, c: torch.Tensor, names: Sequence[str], steps: int = 400,
                               lr: float = 0.05) -> ParamGroupWeights:
    """The weights maximizing the mean self z-score of self-queries with moments (a, C) (:func:`self_moments`)."""
    w = fit_simplex_weights(lambda w: zscores(w, a, c).mean(), len(names), steps, lr)
    return ParamGroupWeights(tuple(names), tuple(float(x) for x in w))
