"""Per-example gradients of averaged model outputs, vectorized with torch.func.

One function serves train features and query features: for each example b,

    F_b(theta) = (1/D) sum_d out(eps_theta(sqrt(abar_{t_bd}) x0_b + sqrt(1 - abar_{t_bd}) eps_bd, t_bd), eps_bd, mask)

and we return grad_theta F_b flattened over the selected parameters. For train
features x0_b is a training image and (t_bd, eps_bd) its D draws; for the query of
Eq. (3) x0_b is the one-step prediction x0_hat at step b, t_bd its timestep
repeated K times and eps_bd the K fresh noises. Examples are vmapped
(``torch.func.vmap`` over ``grad`` of a ``functional_call``); the D draws of an
example are one inner batch of the UNet.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from .models import DiffusionModel
from .outputs import OutputFn


def select_params(
    model: DiffusionModel, param_filter: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Parameters to differentiate, by name prefix (``None``: all), in module order."""
    named = dict(model.unet.named_parameters())
    if param_filter is None:
        return {k: v.detach() for k, v in named.items()}
    chosen = {k: v.detach() for k, v in named.items() if any(k.startswith(p) for p in param_filter)}
    if not chosen:
        raise ValueError(f"param_filter {param_filter} matches no parameter of the model")
    return chosen


def num_params(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def flatten_grads(grads: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """dict of (B, *shape) -> (B, P), in the dict's order."""
    return torch.cat([g.reshape(batch, -1) for g in grads.values()], dim=1)


def _averaged_output_fn(
    model: DiffusionModel, params: dict[str, torch.Tensor], output: OutputFn
) -> Callable[..., torch.Tensor]:
    """Build F(theta_sel; x0, a, b, t, eps, mask) for one example (no batch dim)."""
    others = {k: v.detach() for k, v in model.unet.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in model.unet.named_buffers()}

    def fn(
        sel: dict[str, torch.Tensor],
        x0: torch.Tensor,  # (C, H, W)
        sqrt_ab: torch.Tensor,  # (D,)
        sqrt_1mab: torch.Tensor,  # (D,)
        t: torch.Tensor,  # (D,)
        eps: torch.Tensor,  # (D, C, H, W)
        mask: torch.Tensor,  # (1 or C, H, W)
    ) -> torch.Tensor:
        x_t = sqrt_ab[:, None, None, None] * x0[None] + sqrt_1mab[:, None, None, None] * eps
        eps_pred = functional_call(model.unet, (sel, others, buffers), (x_t, t)).sample
        return output(eps_pred, eps, mask[None]).mean()

    return fn


def per_example_grads(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Gradients of the draw-averaged output, one row per example.

    Args:
        x0: (B, C, H, W) clean images (train images, or x0_hat of query steps).
        timesteps: (B, D) integer training timesteps.
        noises: (B, D, C, H, W) Gaussian noises.
        mask: (1 or C, H, W) pixel weights shared by all examples, or None.
        chunk_size: examples per vmapped call (memory grows linearly with it).

    Returns:
        (B, P) float32 gradients, P = number of selected parameters.
    """
    device = model.device
    ab = model.alphas_cumprod
    fn = _averaged_output_fn(model, params, output)
    per_ex = vmap(grad(fn), in_dims=(None, 0, 0, 0, 0, 0, None))
    if mask is None:
        mask = torch.ones((1, *x0.shape[-2:]), device=device)
    mask = mask.to(device=device, dtype=torch.float32)
    timesteps = timesteps.to(device)
    # Gather alpha-bar outside vmap: indexing with a batched tensor fails inside it.
    flat_t = timesteps.reshape(-1)
    sqrt_ab = ab.index_select(0, flat_t).sqrt().reshape(timesteps.shape)
    sqrt_1mab = (1 - ab.index_select(0, flat_t)).sqrt().reshape(timesteps.shape)
    rows = []
    for start in range(0, x0.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        g = per_ex(
            params,
            x0[sl].to(device),
            sqrt_ab[sl],
            sqrt_1mab[sl],
            timesteps[sl],
            noises[sl].to(device),
            mask,
        )
        rows.append(flatten_grads(g, g[next(iter(g))].shape[0]))
    return torch.cat(rows, dim=0)


def looped_grads(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation with plain autograd, one example at a time: (B, P)."""
    fn = _averaged_output_fn(model, params, output)
    device = model.device
    ab = model.alphas_cumprod
    if mask is None:
        mask = torch.ones((1, *x0.shape[-2:]), device=device)
    rows = []
    for b in range(x0.shape[0]):
        sel = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        t = timesteps[b].to(device)
        value = fn(sel, x0[b].to(device), ab[t].sqrt(), (1 - ab[t]).sqrt(), t, noises[b].to(device), mask)
        gs = torch.autograd.grad(value, list(sel.values()))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)
