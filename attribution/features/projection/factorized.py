"""The factorized per-layer projection (LoGra-style) and exact per-example gradients, both from one backward.

The projection P (``proj_kind="factorized"``) is block diagonal over parameters:

* the weight W_l of every Conv2d / Linear layer, viewed as a (C_out, n_in) matrix
  (n_in = C_in * kh * kw for a convolution, in PyTorch's weight order), is mapped
  to ``P_out,l G P_in,l^T`` (r_out,l x r_in,l), i.e. by the Kronecker product
  ``P_out,l (x) P_in,l`` with Gaussian factors of variance 1/r_out,l and 1/r_in,l;
* every other selected parameter (biases, norm scales/shifts: few) is collected
  into one vector and projected by a dense Gaussian matrix (variance 1/d_s).

Each block preserves inner products in expectation (E[P^T P] = I), like a dense
Gaussian projection, but it never needs the full per-example gradient. The
per-example gradient of a layer is a sum over positions of output-gradient x input
outer products, ``G_b = sum_pos g_pos a_pos^T``, so

    P_out G_b P_in^T = sum_pos (P_out g_pos) (P_in a_pos)^T,

where ``P_in a_pos`` over all positions is a convolution of the layer's input with
P_in reshaped as a (r_in, C_in, kh, kw) kernel. :meth:`FactorizedProjector.project_examples`
runs one batched forward and backward of the (mask-weighted, draw-averaged) outputs
with hooks that project each layer's input and output gradient and contract them
per example; parameters do not require gradients, so no weight gradient is formed.
Biases and norm parameters get their exact per-example gradients from the same
hooks. :meth:`FactorizedProjector.project` applies the same linear map to full
gradient vectors (queries, tests).

Exact mode (``exact=True``, :func:`example_grads_from_hooks`): every factor is the
identity, so the same hooks form the exact per-example gradients, each block at its
parameter's place. This is how the sjlt / gaussian featurize paths get per-example
gradients (one batched pass instead of vmap): convolutions by
:func:`conv_weight_grads` (the layer's weight-gradient convolution with one group per
example, summed over each example's draws inside it; no im2col copy), Linear layers by
one batched matmul.

Dimension budget: d_s = min(p_small, d / 16) for the small block (more if the layer
blocks leave dimensions over), the rest split over layers in proportion to
sqrt(numel), each as r_out x r_in with r_out ~ r_in (r_out <= C_out).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ...config import ProjectionKind
from ...models.base import DiffusionModel
from ...models.conditioning import Conditioning, as_conditioning
from ..gradients import DrawBatch, GradientTarget, _check_cond, objective_terms
from ..hooks import LayerBlock, LayerHooks, Sink, hooks_support
from ..outputs import OutputFn
from .base import Projector, block_generator

__all__ = ["LAYOUT_VERSION", "FactorizedProjector", "example_grads_from_hooks", "hooks_support"]

#: Version of the factor shapes and draw order; recorded in factorized stores (``projection_layout``)
#: so that a store built by another layout is refused instead of scored with a different map.
#: 2: square-ish factors (r_out ~ r_in).
LAYOUT_VERSION = 2


def _allocate(shapes: dict[str, tuple[int, ...]], dim_out: int) -> tuple[list[LayerBlock], list[str], int]:
    """Split ``dim_out`` into per-layer r_out x r_in blocks and a small-parameter block (see module doc).

    Returns (layer blocks, names of the small parameters in order, d_s).
    """
    weights = {k: s for k, s in shapes.items() if len(s) in (2, 4)}
    small = [k for k, s in shapes.items() if len(s) not in (2, 4)]
    p_small = sum(math.prod(shapes[k]) for k in small)
    d_small = min(p_small, max(1, dim_out // 16)) if small else 0
    if len(weights) + (1 if small else 0) > dim_out:
        raise ValueError(f"proj_dim {dim_out} is too small for a factorized projection of {len(weights)} layers")
    budget = dim_out - d_small
    root = {k: math.sqrt(math.prod(s)) for k, s in weights.items()}
    total = sum(root.values()) or 1.0
    blocks, offset = [], 0
    for k, s in weights.items():
        c_out, n_in = s[0], math.prod(s[1:])
        target = max(1.0, budget * root[k] / total)
        # Square-ish factors (as LoGra): the hooks' cost grows with r_in (a convolution of the
        # layer's input with r_in filters), so r_in must stay well below c_out.
        r_out = min(c_out, max(1, round(math.sqrt(target))))
        r_in = min(n_in, max(1, int(target // r_out)))
        blocks.append(LayerBlock(k, c_out, n_in, r_out, r_in, offset))
        offset += r_out * r_in
    if offset > dim_out - (1 if small else 0):  # rounding up to 1 x 1 blocks overspent the budget
        raise ValueError(f"proj_dim {dim_out} is too small for a factorized projection of {len(weights)} layers")
    return blocks, small, dim_out - offset


class FactorizedProjector(Projector):
    """Per-layer Kronecker Gaussian projection of the selected parameters (see module doc).

    Args:
        shapes: name -> shape of every selected parameter, in the order gradients are flattened.
        dim_out: d. With ``exact=True`` d is ignored: every factor is the identity, no
            matrix is formed and the features are the per-example gradient itself, in
            ``shapes`` order (d = p; :func:`example_grads_from_hooks`).
    """

    kind = ProjectionKind.FACTORIZED

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        dim_out: int,
        seed: int,
        device: str | torch.device = "cpu",
        exact: bool = False,
    ):
        self.shapes = {k: tuple(s) for k, s in shapes.items()}
        self.dim_in = sum(math.prod(s) for s in self.shapes.values())
        self.device = torch.device(device)
        self.exact = exact
        self.starts: dict[str, int] = {}  # where each parameter's gradient starts in the flattened vector
        off = 0
        for k, sh in self.shapes.items():
            self.starts[k] = off
            off += math.prod(sh)
        if exact:  # every block at its parameter's place: the features are the gradient, in order
            self.blocks = [LayerBlock(k, sh[0], math.prod(sh[1:]), sh[0], math.prod(sh[1:]), self.starts[k])
                           for k, sh in self.shapes.items() if len(sh) in (2, 4)]
            self.small = [k for k, sh in self.shapes.items() if len(sh) not in (2, 4)]
            self.d_small = self.dim_in - sum(b.c_out * b.n_in for b in self.blocks)
            dim_out = self.dim_in
        else:
            self.blocks, self.small, self.d_small = _allocate(self.shapes, dim_out)
        self.dim_out = dim_out
        self.p_small = sum(math.prod(self.shapes[k]) for k in self.small)
        # exact: every factor is the identity, never materialized (the hooks skip it)
        self.p_out: dict[str, torch.Tensor] = {}
        self.p_in: dict[str, torch.Tensor] = {}
        self.p_small_t: torch.Tensor | None = None
        if not exact:
            for i, b in enumerate(self.blocks):
                self.p_out[b.name] = self._factor(seed, 2 * i, b.r_out, b.c_out)
                self.p_in[b.name] = self._factor(seed, 2 * i + 1, b.r_in, b.n_in)
            self.p_small_t = self._factor(seed, 2 * len(self.blocks), self.d_small, self.p_small).T.contiguous()

    def _factor(self, seed: int, block: int, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) Gaussian factor with N(0, 1/rows) entries."""
        m = torch.randn(rows, cols, generator=block_generator(seed, block)) / math.sqrt(max(rows, 1))
        return m.to(self.device)

    # ------------------------------------------------------------------ full gradients
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, p) full gradients, flattened in ``shapes`` order -> (B, d) float32."""
        grads = grads.float()
        out = torch.empty(grads.shape[0], self.dim_out, device=grads.device)
        views, off = {}, 0
        for k, s in self.shapes.items():
            views[k] = grads[:, off : off + math.prod(s)]
            off += math.prod(s)
        for b in self.blocks:
            g = views[b.name].reshape(-1, b.c_out, b.n_in)
            if not self.exact:
                g = self.p_out[b.name] @ g @ self.p_in[b.name].T
            out[:, b.offset : b.offset + b.r_out * b.r_in] = g.flatten(1)
        self._write_small(out, views)
        return out

    def _write_small(self, out: torch.Tensor | None, small: dict[str, torch.Tensor], sink: Sink | None = None) -> None:
        """Write the small parameters' (B, numel) gradients ``small[name]``: projected into the last d_s
        columns, or (exact) each at its own place, or (exact with ``sink``) handed to ``sink``."""
        if self.exact:
            for k in self.small:
                if sink is not None:
                    sink(self.starts[k], small[k])
                else:
                    out[:, self.starts[k] : self.starts[k] + small[k].shape[1]] = small[k]
            return
        tail = out[:, self.dim_out - self.d_small :]
        if not self.small:
            tail.zero_()
        else:
            tail.copy_(torch.cat([small[k] for k in self.small], 1) @ self.p_small_t)

    # ------------------------------------------------------------------ from one backward
    def project_examples(
        self,
        model: DiffusionModel,
        params: dict[str, torch.Tensor],
        output: OutputFn,
        x0: torch.Tensor,
        timesteps: torch.Tensor,
        noises: torch.Tensor,
        mask: torch.Tensor | None = None,
        cond: Conditioning | torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        sink: Sink | None = None,
        sink_rows: Callable[[int], int | None] | None = None,
    ) -> torch.Tensor | None:
        """Projected gradients of the draw-averaged output, one row per example, without per-example gradients.

        Same arguments and meaning as :func:`attribution.features.gradients.per_example_grads`
        (x0 (B, C, H, W), timesteps (B, D), noises (B, D, C, H, W), mask (1|C, H, W),
        cond (B|1, L, D)); equals ``self.project(per_example_grads(...))`` up to rounding.

        ``out``: an optional (B, d) float32 buffer to write into (it is overwritten).
        ``sink`` (exact mode only): instead of writing rows, call ``sink(start, grads)`` with each
        parameter's (B, numel) per-example gradient, ``start`` its place in the flattened gradient
        (a module called twice hands over two parts to add).
        ``sink_rows`` (with ``sink``): given a weight's row length (C_in kh kw), the rows the sink accepts as a
        unit (``SparseSignProjector.row_block``), or None. A convolution's gradient is then handed over in
        tiles of a multiple of that many output channels, about ``TILE_BYTES`` each, each tile ``start`` at
        its first coordinate (:func:`conv_weight_grad_tiles`).

        Returns:
            (B, d) float32 (``out`` when given), or None with ``sink``.
        """
        if tuple(params) != tuple(self.shapes):
            raise ValueError("params differ from those the factorized projection was built for")
        if sink is not None and not self.exact:
            raise ValueError("a gradient sink needs the exact (identity-factor) mode")
        device = model.device
        B, D = timesteps.shape
        cond = _check_cond(model, cond, B)
        a_t, b_t, tau = (v.reshape(-1) for v in objective_terms(model, timesteps))  # (B*D,) each
        objective = model.objective
        x0, eps = x0.to(device).repeat_interleave(D, 0), noises.to(device).flatten(0, 1)  # (B*D, C, H, W)
        x_t = objective.noised(x0, eps, a_t, b_t)
        c = None if cond is None else cond.repeat_interleave(D, 0)
        m = None if mask is None else mask.to(device=device, dtype=torch.float32)[None]
        # every block's first write copies (no zero fill); blocks the pass never reached are zeroed after it
        if sink is None and out is None:
            out = torch.empty(B, self.dim_out, device=device)
        small: dict[str, torch.Tensor] = {k: torch.zeros(B, math.prod(self.shapes[k]), device=device) for k in self.small}
        # Nothing requires gradients but the hooks' zero leaves: no weight gradient is formed.
        frozen = {k: v.detach() for k, v in model.unet.named_parameters()}
        hooks = LayerHooks(self, model.unet, out, small, B, D, sink, sink_rows)
        try:
            prediction = model.predict(frozen, x_t, tau, c)
            if not hooks.leaves:
                raise ValueError("no selected layer was reached by the forward pass")
            value = output(prediction, objective.target(x0, eps, a_t, b_t), m).sum() / D
            torch.autograd.grad(value, hooks.leaves, allow_unused=True)
        finally:
            hooks.remove()
        if sink is None:
            for b in self.blocks:
                if b.name not in hooks.written:
                    out[:, b.offset : b.offset + b.r_out * b.r_in].zero_()
        self._write_small(out, small, sink)
        return None if sink is not None else out

    def example_features(self, target: GradientTarget, batch: DrawBatch, chunk_size: int = 32) -> torch.Tensor:
        """From batched passes of ``chunk_size`` examples (:meth:`project_examples`)."""
        return torch.cat([self.project_examples(target.model, target.params, target.output, batch.x0[sl],
                                                batch.timesteps[sl], batch.noises[sl], cond=c)
                          for sl, c in _chunks(len(batch), chunk_size, batch.cond)])

    def step_features(self, target: GradientTarget, batch: DrawBatch) -> torch.Tensor:
        """From one batched backward over the S * K rows (:meth:`project_examples`)."""
        return self.project_examples(target.model, target.params, target.output, batch.x0, batch.timesteps,
                                     batch.noises, batch.mask, batch.cond)


_EXACT: dict[tuple, FactorizedProjector] = {}


def _chunks(n: int, chunk_size: int, cond: Conditioning | torch.Tensor | None):
    """(row slice, its conditioning) for each chunk of ``n`` examples; ``cond`` of n or 1 examples, or None."""
    cond = as_conditioning(cond)
    for s in range(0, n, chunk_size):
        sl = slice(s, s + chunk_size)
        yield sl, (cond[sl] if cond is not None and len(cond) > 1 else cond)


def _exact_projector(model: DiffusionModel, params: dict[str, torch.Tensor]) -> FactorizedProjector:
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    key = (tuple(shapes.items()), str(model.device))
    if key not in _EXACT:
        _EXACT[key] = FactorizedProjector(shapes, 0, seed=0, device=model.device, exact=True)
    return _EXACT[key]


def example_grads_from_hooks(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    chunk_size: int = 32,
    cond: Conditioning | torch.Tensor | None = None,
    projector=None,
) -> torch.Tensor:
    """The (B, P) gradients of :func:`~attribution.features.gradients.per_example_grads`, from batched passes with hooks.

    One forward and backward per chunk of examples, with no parameter requiring a gradient;
    the hooks form each layer's per-example weight gradient from its input and output
    gradient (convolutions by :func:`conv_weight_grads`), and biases and
    norm parameters as in the factorized projection. Needs :func:`hooks_support`.

    ``projector``: a projector with ``accumulate_columns`` (sjlt built with the parameters'
    boundaries). Each layer's (B, numel) gradient is then projected as soon as the hook forms
    it and the (B, P) matrix never exists (on a 10 M-parameter UNet writing it dominated):
    returns the (B, d) projected rows instead.
    """
    proj = _exact_projector(model, params)
    B = x0.shape[0]
    if projector is None:
        out = torch.empty(B, proj.dim_in, device=model.device)
    else:
        acc_t = torch.zeros(projector.dim_out, B, device=model.device)  # (d, B): the sketch's output layout
    for sl, c in _chunks(B, chunk_size, cond):
        if projector is None:
            proj.project_examples(model, params, output, x0[sl], timesteps[sl], noises[sl], cond=c, out=out[sl])
        else:
            chunk_acc = acc_t[:, sl]
            proj.project_examples(model, params, output, x0[sl], timesteps[sl], noises[sl], cond=c,
                                  sink=lambda start, g: projector.accumulate_columns(g, start, chunk_acc),
                                  sink_rows=projector.row_block)
    return out if projector is None else acc_t.T.contiguous()
