"""journey-TRAK with one kernel per parameter group (``journey-groups``) and its label-free group weights.

On a ``block-sjlt`` store (:mod:`attribution.features.projection.block_sjlt`) the rows R_g of every
feature belong to parameter group g (the UNet's blocks), and the store's kernel K_m = Phi_m^T Phi_m
has the per-group kernels K_{m,g} = Phi_{m,g}^T Phi_{m,g} as diagonal blocks. The score of step s
(Eq. 3 query features g_{s,m}) is

    tau_s = (1/M) sum_m sum_g w_g Phi_{m,g} (K_{m,g} + lambda_{m,g} I)^-1 g_{s,m}[R_g],
    lambda_{m,g} = ridge * tr(K_{m,g}) / d_g

i.e. TRAK with a block-diagonal kernel, each block scaled by w_g >= 0 (sum 1). With one kernel
over all parameters (journey-TRAK), the full-resolution layers, which hold about 94 % of the
train features' squared norm on the bundled digits, decide the ranking; per-group kernels let
each block count by its weight (Li et al., "Learning to Weight Parameters for Training Data
Attribution", ICLR 2026).

**The weights are fitted without labels** (:func:`~attribution.scoring.group_fit.fit_group_weights`): a training image x_i,
queried as if it were a step's x0_hat (Eq. 3 at x_i, a timestep of the sampling schedule, K
fresh noises), should retrieve itself; w maximizes the mean z-score of its self-score among
the N scores (:func:`~attribution.scoring.param_groups.fit_self_retrieval_weights`), fitted on
half of the self-queries and reported on the other half. The fit is written next to the store
(``group_weights.json``), bound to the store's settings and checkpoints, one fit per ridge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..features.store import Store, StoreError
from .param_groups import ParamGroupWeights

__all__ = ["GROUP_WEIGHTS_FILE", "GroupKernels", "GroupWeightsFit", "group_weights_status", "load_group_weights",
           "save_group_weights"]

GROUP_WEIGHTS_FILE = "group_weights.json"
FORMAT_VERSION = 1


class GroupKernels:
    """The Cholesky factors of K_g + lambda_g I of one checkpoint's per-group kernels (float64).

    kernel: (d, d) the store's Phi^T Phi; row_slices: (G,) the rows R_g of each group."""

    def __init__(self, kernel: np.ndarray, row_slices: Sequence[slice], ridge: float):
        self.row_slices = list(row_slices)
        k = torch.from_numpy(np.asarray(kernel, dtype=np.float64))
        self.chol = []
        for rows in self.row_slices:
            kg = k[rows, rows]
            lam = ridge * float(torch.trace(kg)) / kg.shape[0]
            if lam == 0:  # a group with no gradient (e.g. frozen): its block is zero
                lam = 1.0
            self.chol.append(torch.linalg.cholesky(kg + lam * torch.eye(kg.shape[0], dtype=kg.dtype)))

    def solve_groups(self, q: torch.Tensor) -> list[torch.Tensor]:
        """(K_g + lambda_g I)^-1 q[:, R_g] for every group: q (S, d) -> G tensors (d_g, S) float32."""
        q = q.double()
        return [torch.cholesky_solve(q[:, rows].T, c).float() for rows, c in zip(self.row_slices, self.chol)]

    def solve(self, q: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
        """The (d, S) vector whose product with Phi gives sum_g w_g Phi_g (K_g + lambda_g I)^-1 q_g: q (S, d)."""
        return torch.cat([w * x for w, x in zip(weights, self.solve_groups(q))])


@dataclass(frozen=True)
class GroupWeightsFit:
    """One label-free fit of the group weights (see module doc).

    Attributes:
        weights: the fitted w_g, one per group (names in gradient order).
        ridge: the relative ridge the per-group kernels were factored with.
        num_self, self_seed, fit_share: the self-queries (count, seed) and the share fitted on.
        held_out_zscore: mean self z-score of the held-out self-queries under ``weights``;
            ``held_out_zscore_uniform`` / ``held_out_zscore_joint`` the same with w_g = 1/G and
            with the store's one joint kernel (journey-TRAK), for comparison.
    """

    weights: ParamGroupWeights
    ridge: float
    num_self: int
    self_seed: int
    fit_share: float
    held_out_zscore: float
    held_out_zscore_uniform: float
    held_out_zscore_joint: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.to_dict()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "GroupWeightsFit":
        return cls(**{**d, "weights": ParamGroupWeights.from_dict(d["weights"])})


def _binding(store: Store) -> dict:
    """What a fit is bound to: the store's settings and checkpoints."""
    return {"settings_sha256": store.manifest.get("settings_sha256"),
            "checkpoints": [c["hash"] for c in store.manifest["checkpoints"]]}


def _read(store: Store) -> dict:
    path = store.root / GROUP_WEIGHTS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is not a readable group-weights file ({e}); run "
                         f"`attribution fit-group-weights --store {store.root}` again") from None
    return data if isinstance(data, dict) else {}


def group_weights_status(store: Store, ridge: float) -> str | None:
    """Why ``journey-groups`` cannot score from ``store`` at ``ridge`` (one line), or None when it can."""
    if store.config.proj_kind != "block-sjlt":
        return (f"journey-groups needs a block-sjlt store (featurize --projection block-sjlt), but {store.root} "
                f"holds {store.config.proj_kind} features")
    try:
        data = _read(store)
    except StoreError as e:
        return str(e)
    fix = f"run `attribution fit-group-weights --store {store.root} --ridge {ridge:g}`"
    if not data:
        return f"store {store.root} has no fitted group weights; {fix}"
    if data.get("format_version") != FORMAT_VERSION or data.get("binding") != _binding(store):
        return f"the group weights of {store.root} were fitted for other features or checkpoints; {fix}"
    if _ridge_key(ridge) not in data.get("fits", {}):
        return f"store {store.root} has no group weights fitted at ridge {ridge:g}; {fix}"
    return None


def _ridge_key(ridge: float) -> str:
    return f"{float(ridge):.6g}"


def load_group_weights(store: Store, ridge: float) -> GroupWeightsFit:
    """The fit of ``store`` at ``ridge``.

    Raises:
        StoreError: no such fit, a stale one (other settings or checkpoints), or a corrupt file (one line each).
    """
    why = group_weights_status(store, ridge)
    if why is not None:
        raise StoreError(why)
    try:
        return GroupWeightsFit.from_json(_read(store)["fits"][_ridge_key(ridge)])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{store.root / GROUP_WEIGHTS_FILE} holds a malformed fit ({e}); run "
                         f"`attribution fit-group-weights --store {store.root}` again") from None


def save_group_weights(store: Store, fit: GroupWeightsFit) -> Path:
    """Add (or replace) the fit at ``fit.ridge`` in ``store``'s group-weights file (atomically); its path.
    Fits bound to other settings or checkpoints, or an unreadable file, are replaced."""
    try:
        data = _read(store)
    except StoreError:
        data = {}
    if data.get("binding") != _binding(store) or data.get("format_version") != FORMAT_VERSION:
        data = {}
    data.update(format_version=FORMAT_VERSION, binding=_binding(store))
    data.setdefault("fits", {})[_ridge_key(fit.ridge)] = fit.to_json()
    path = store.root / GROUP_WEIGHTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path
