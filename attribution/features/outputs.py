"""Model-output functions by name.

Each function maps the model's prediction p of a batch of noised images, and the
regression target y of its training objective (:mod:`attribution.models.objective`:
eps, v, x0 or eps - x0), to one scalar per image; features and queries both average
it over (timestep, noise) draws:

  * ``"loss"`` -- the training loss ``||y - p||^2`` (mean over pixels; for an epsilon
    model ``||eps - eps_theta(x_t, t)||^2``). At a train example it is Algorithm 1
    line 3 of journey-TRAK; at the one-step prediction x0_hat of a sampling step, with
    K fresh noises, it is the step-specific output f_t of Eq. (3).
  * ``"square"``, ``"l1"``, ``"l2"``, ``"mean"`` -- the D-TRAK alternatives
    (squared L2 norm, L1 norm, L2 norm and mean of the prediction p), which ignore y.

An optional pixel mask M (patch attribution) weights the per-pixel terms; the sum
is divided by the total pixel count, so f_mask + f_(1-mask) = f for the additive
outputs. Methods pair a train output with a query output: see :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

OutputFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _weighted_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """values (B, C, H, W), mask broadcastable to it or None -> (B,) mean over C, H, W."""
    if mask is not None:
        values = values * mask
    return values.flatten(1).mean(1)


def loss_output(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Training loss per image ||y - p||^2: prediction and target (B, C, H, W) -> (B,)."""
    return _weighted_mean((target - pred) ** 2, mask)


def square_output(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D-TRAK's L_square: squared L2 norm of the prediction (per pixel mean), (B,)."""
    return _weighted_mean(pred**2, mask)


def l1_output(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D-TRAK's L1 norm of the prediction (per pixel mean), (B,)."""
    return _weighted_mean(pred.abs(), mask)


def l2_output(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D-TRAK's L2 norm of the prediction, (B,)."""
    sq = pred**2 if mask is None else pred**2 * mask
    return (sq.flatten(1).sum(1) + 1e-12).sqrt()


def mean_output(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """D-TRAK's mean of the prediction, (B,)."""
    return _weighted_mean(pred, mask)


OUTPUTS: dict[str, OutputFn] = {
    "loss": loss_output,
    "square": square_output,
    "l1": l1_output,
    "l2": l2_output,
    "mean": mean_output,
}


def get_output(name: str) -> OutputFn:
    try:
        return OUTPUTS[name]
    except KeyError:
        raise ValueError(f"unknown model output {name!r}; choose one of {sorted(OUTPUTS)}") from None


@dataclass(frozen=True)
class Method:
    """A gradient-based attribution method answered from a feature store.

    Attributes:
        train_output / query_output: output functions of train and query features.
        combine: ``"trak"`` -- Phi (Phi^T Phi + lambda I)^-1 g (journey-TRAK, D-TRAK);
            ``"tracin"`` -- Phi g, summed over checkpoints (Diffusion-TracIn);
            ``"retrac"`` -- rows of Phi and g normalized to unit norm first
            (Diffusion-ReTrac's fix of the timestep-induced gradient-norm bias).
        query_target: ``"x0_hat"`` -- the query output is Eq. (3) at the step's x0_hat
            (step-specific); ``"final"`` -- at the final sample, its K noises spread
            evenly over the timesteps (plain TRAK, the "destination" baseline: the
            same scores at every step).
        row_weights: ``None``, or ``"das"`` / ``"das-leverage"``: every train row of
            checkpoint m is weighted by its normalized residual error (DAS, arXiv
            2410.18639), optionally with the leverage correction 1/(1 - h_i)^2;
            see :mod:`attribution.scoring.das`.
        short: a short name for table headers and legends ("" for methods not offered in the app).
        blurb: one line saying what the method is, for pickers.
        ``combine="group-trak"``: one TRAK kernel per parameter group of a block-sjlt
            store, the groups weighted by a label-free fit (``journey-groups``,
            :mod:`attribution.scoring.group_weights`).
        ``combine="ekfac"`` / ``"kfac"``: influence functions with the (E)K-FAC Hessian
            approximation fitted by kronfluence, see :mod:`attribution.scoring.ekfac`.
    """

    name: str
    train_output: str
    query_output: str
    label: str
    combine: str = "trak"
    query_target: str = "x0_hat"
    row_weights: str | None = None
    short: str = ""
    blurb: str = ""


#: Methods answered from a store (train features use ``train_output``).
METHODS: dict[str, Method] = {
    "journey": Method("journey", "loss", "loss", "journey-TRAK (Eq. 3)", short="journey-TRAK",
                      blurb="step-specific TRAK on the denoising loss (the paper's method)"),
    "journey-groups": Method("journey-groups", "loss", "loss", "journey-TRAK, per-block kernels",
                             combine="group-trak", short="journey-TRAK/blocks",
                             blurb="one kernel per network block, weighted by a label-free fit "
                                   "(block-sjlt store, `attribution fit-group-weights`)"),
    "dtrak-square": Method("dtrak-square", "square", "square", "D-TRAK, ||eps||^2", short="D-TRAK ‖ε‖²",
                           blurb="TRAK on ||ε||² instead of the loss"),
    "dtrak-l1": Method("dtrak-l1", "l1", "l1", "D-TRAK, L1 norm", short="D-TRAK L1", blurb="TRAK on the L1 norm of ε"),
    "dtrak-l2": Method("dtrak-l2", "l2", "l2", "D-TRAK, L2 norm", short="D-TRAK L2", blurb="TRAK on the L2 norm of ε"),
    "dtrak-mean": Method("dtrak-mean", "mean", "mean", "D-TRAK, mean", short="D-TRAK mean", blurb="TRAK on the mean of ε"),
    "tracin": Method("tracin", "loss", "loss", "Diffusion-TracIn", combine="tracin", short="TracIn",
                     blurb="sum of gradient dot products over checkpoints"),
    "retrac": Method("retrac", "loss", "loss", "Diffusion-ReTrac", combine="retrac", short="ReTrac",
                     blurb="TracIn with normalized gradients (less bias to a few large-gradient images)"),
    "das": Method("das", "square", "square", "DAS (residual-weighted D-TRAK)", row_weights="das"),
    "das-leverage": Method(
        "das-leverage", "square", "square", "DAS with leverage correction", row_weights="das-leverage"
    ),
    "ekfac": Method("ekfac", "loss", "loss", "EK-FAC influence (kronfluence)", combine="ekfac"),
    "kfac": Method("kfac", "loss", "loss", "K-FAC influence (kronfluence)", combine="kfac"),
    "trak-final": Method("trak-final", "loss", "loss", "TRAK on the final sample (destination)", query_target="final"),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
