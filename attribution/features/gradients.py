"""Per-example gradients of averaged model outputs, vectorized with torch.func.

One function serves train features and query features: for each example b,

    F_b(theta) = (1/D) sum_d out(model_theta(x_bd, tau(t_bd)), y_bd, mask),
    x_bd = a_{t_bd} x0_b + b_{t_bd} eps_bd,   y_bd = y_{t_bd}(x0_b, eps_bd)

with the noising (a_t, b_t), the regression target y_t and the timestep input tau(t) of the
model's training objective (:mod:`attribution.models.objective`: for an epsilon model
a = sqrt(abar), b = sqrt(1 - abar), y = eps, tau(t) = t), and we return grad_theta F_b
flattened over the selected parameters. For train
features x0_b is a training image and (t_bd, eps_bd) its D draws; for the query of
Eq. (3) x0_b is the one-step prediction x0_hat at step b, t_bd its timestep
repeated K times and eps_bd the K fresh noises. Examples are vmapped
(``torch.func.vmap`` over ``grad`` of a ``functional_call``); the D draws of an
example are one inner batch of the UNet.

Conditional models take one conditioning ``c_b`` per example (a
:class:`~attribution.models.conditioning.Conditioning`: the caption's or class's of a
train example, the prompt's of a query), handed to the denoiser by
``model.predict`` and repeated for the D draws. For latent
models x0_b and eps_bd live in latent space.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.func import grad, vmap

from ..models.base import DiffusionModel
from ..models.conditioning import Conditioning, as_conditioning
from .outputs import OutputFn


@dataclass(frozen=True)
class GradientTarget:
    """What is differentiated: ``output`` of ``model``'s prediction, by the parameters ``params``
    (name -> tensor, in gradient order: :func:`select_params`)."""

    model: DiffusionModel
    params: dict[str, torch.Tensor]
    output: OutputFn


@dataclass(frozen=True)
class DrawBatch:
    """B examples and their D (timestep, noise) draws: the inputs of one gradient pass.

    Attributes:
        x0: (B, C, H, W) clean inputs: training images, or the one-step predictions x0_hat of query steps.
        timesteps: (B, D) training timesteps of the draws.
        noises: (B, D, C, H, W) their noises.
        mask: (1|C, H, W) pixel weights of the output (a patch), or None.
        cond: conditioning of B (or 1) examples for conditional models (:class:`Conditioning`; a bare
            (B|1, L, D) tensor is a text sequence), or None.
    """

    x0: torch.Tensor
    timesteps: torch.Tensor
    noises: torch.Tensor
    mask: torch.Tensor | None = None
    cond: Conditioning | torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x0.shape[0])


def param_matcher(param_filter: tuple[str, ...]) -> Callable[[str], bool]:
    """Predicate on parameter names: an entry matches names it prefixes, or, written
    ``"re:<pattern>"``, names in which the regular expression is found (``re.search``).

    E.g. ``("conv_in", "re:lora_")`` selects ``conv_in.*`` and every LoRA parameter.
    """
    prefixes = tuple(p for p in param_filter if not p.startswith("re:"))
    regexes = [re.compile(p[3:]) for p in param_filter if p.startswith("re:")]
    return lambda name: name.startswith(prefixes) or any(r.search(name) for r in regexes)


def select_params(
    model: DiffusionModel, param_filter: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """Parameters to differentiate (``None``: all), in module order; see :func:`param_matcher`."""
    named = dict(model.unet.named_parameters())
    if param_filter is None:
        return {k: v.detach() for k, v in named.items()}
    match = param_matcher(tuple(param_filter))
    chosen = {k: v.detach() for k, v in named.items() if match(k)}
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
    """Build F(theta_sel; x0, a, b, tau, eps, mask[, cond]) for one example (no batch dim)."""
    others = {k: v.detach() for k, v in model.unet.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in model.unet.named_buffers()}
    objective = model.objective

    def fn(
        sel: dict[str, torch.Tensor],
        x0: torch.Tensor,  # (C, H, W)
        a: torch.Tensor,  # (D,) noising coefficients of x0 ...
        b: torch.Tensor,  # (D,) ... and of eps
        t: torch.Tensor,  # (D,) the model's timestep input tau(t)
        eps: torch.Tensor,  # (D, C, H, W)
        mask: torch.Tensor,  # (1 or C, H, W)
        cond: Conditioning | None = None,  # one example's (fields without the batch dim)
    ) -> torch.Tensor:
        x_t = objective.noised(x0[None], eps, a, b)
        c = None if cond is None else cond.per_draw(t.shape[0])
        prediction = model.predict((sel, others, buffers), x_t, t, c)
        return output(prediction, objective.target(x0[None], eps, a, b), mask[None]).mean()

    return fn


def _check_cond(model: DiffusionModel, cond: Conditioning | torch.Tensor | None, batch: int) -> Conditioning | None:
    """Validate conditioning of B or 1 examples (a bare (B, L, D) tensor is text) and broadcast it to B
    examples on the model's device."""
    cond = as_conditioning(cond)
    if cond is None:
        if model.is_conditional:
            raise ValueError("a conditional model needs cond; use model.encode_prompts")
        return None
    if not model.is_conditional:
        raise ValueError(f"{model.path} is not conditional; cond must be None")
    if cond.text is not None and cond.text.ndim != 3:
        raise ValueError(f"cond.text has shape {tuple(cond.text.shape)}; expected ({batch} or 1, L, D)")
    sizes = {k: int(v.shape[0]) if v.ndim else -1 for k, v in cond.present().items()}
    if not sizes or any(n not in (1, batch) for n in sizes.values()):
        raise ValueError(f"cond has batch sizes {sizes}; expected {batch} or 1 for every field")
    return cond.to(model.device).expand(batch)


#: The vmap fallbacks known and accepted: no batching rule for CPU flash attention (forward, backward),
#: so torch loops over the examples there (still faster on CPU than unfused attention).
KNOWN_VMAP_FALLBACKS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
_FALLBACK = re.compile(r"There is a performance drop because we have not yet implemented the batching rule for (\w+::\w+)")
_warned_fallbacks: set[str] = set()
_reemitted: dict = {}  # the warnings registry of re-emitted warnings: the filters' "default"/"once" still apply


@contextmanager
def vmap_fallbacks_reported() -> Iterator[None]:
    """Run a vmapped pass; warn once per process for each operator it ran without a batching rule
    (other than :data:`KNOWN_VMAP_FALLBACKS`), naming it. Other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        found = _FALLBACK.search(str(w.message))
        if found is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_reemitted)
        elif found.group(1) not in KNOWN_VMAP_FALLBACKS and found.group(1) not in _warned_fallbacks:
            _warned_fallbacks.add(found.group(1))
            warnings.warn(f"per-example gradients: {found.group(1)} has no vmap batching rule, so torch runs it "
                          f"one example at a time (a slow path) in this model", RuntimeWarning, stacklevel=3)


def per_example_grads(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 32,
    cond: Conditioning | torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradients of the draw-averaged output, one row per example.

    Args:
        x0: (B, C, H, W) clean images (train images, or x0_hat of query steps); latents
            for latent models.
        timesteps: (B, D) integer training timesteps.
        noises: (B, D, C, H, W) Gaussian noises.
        mask: (1 or C, H, W) pixel weights shared by all examples, or None.
        chunk_size: examples per vmapped call (memory grows linearly with it).
        cond: conditioning of B or 1 examples (:class:`Conditioning`, or a (B|1, L, D) text tensor),
            required for conditional models and refused for unconditional ones.

    Returns:
        (B, P) float32 gradients, P = number of selected parameters.
    """
    device = model.device
    fn = _averaged_output_fn(model, params, output)
    cond = _check_cond(model, cond, x0.shape[0])
    dims = (None, 0, 0, 0, 0, 0, None) + ((0,) if cond is not None else ())
    per_ex = vmap(grad(fn), in_dims=dims)
    if mask is None:
        mask = torch.ones((1, *x0.shape[-2:]), device=device)
    mask = mask.to(device=device, dtype=torch.float32)
    a, b, tau = objective_terms(model, timesteps)
    rows = []
    for start in range(0, x0.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        extra = (cond[sl],) if cond is not None else ()
        with vmap_fallbacks_reported():
            g = per_ex(
                params,
                x0[sl].to(device),
                a[sl],
                b[sl],
                tau[sl],
                noises[sl].to(device),
                mask,
                *extra,
            )
        rows.append(flatten_grads(g, g[next(iter(g))].shape[0]))
    return torch.cat(rows, dim=0)


def objective_terms(model: DiffusionModel, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, tau(t)) of the model's objective for integer ``timesteps`` (B, D), each (B, D) on the model's device.

    Gathered outside any vmap: indexing with a batched tensor fails inside it.
    """
    timesteps = timesteps.to(model.device)
    a, b = model.objective.coefficients(timesteps)
    return a, b, model.objective.model_timesteps(timesteps)


def per_step_grads(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    mask: torch.Tensor | None = None,
    cond: Conditioning | torch.Tensor | None = None,
) -> torch.Tensor:
    """The same (B, P) gradients as :func:`per_example_grads`, with plain autograd one example at a time.

    Each example's D draws are one batch of the UNet and one backward pass. For the
    query of Eq. (3) (one example per step, D = K = 20 noises) this is faster than
    vmap over steps: the forward+backward of a batch of K is what the physical
    limit does anyway, while vmap's per-example convolution backward is slower
    than the batched one. Also the reference implementation of the tests.

    Args: as :func:`per_example_grads` (``cond`` (B or 1, L, D)).
    """
    fn = _averaged_output_fn(model, params, output)
    device = model.device
    cond = _check_cond(model, cond, x0.shape[0])
    if mask is None:
        mask = torch.ones((1, *x0.shape[-2:]), device=device)
    mask = mask.to(device=device, dtype=torch.float32)
    a, b, tau = objective_terms(model, timesteps)
    sel = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # leaves, shared by every example
    leaves = list(sel.values())
    out = torch.empty(x0.shape[0], num_params(params), device=device)
    for i in range(x0.shape[0]):
        c = cond[i] if cond is not None else None
        value = fn(sel, x0[i].to(device), a[i], b[i], tau[i], noises[i].to(device), mask, c)
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, leaves)], out=out[i])
    return out


looped_grads = per_step_grads  # the name the tests use for the plain-autograd reference
