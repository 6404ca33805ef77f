"""Factorized per-layer projection (LoGra-style) and exact per-example gradients, both from one backward.

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
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .gradients import _alpha_bar_terms, _check_cond, per_example_grads, per_step_grads
from .models import DiffusionModel
from .outputs import OutputFn
from .projection import _block_generator

#: Receives (start, (B, numel) per-example gradients of the parameter slice starting at ``start``).
Sink = Callable[[int, torch.Tensor], None]

#: Version of the factor shapes and draw order; recorded in factorized stores (``projection_layout``)
#: so that a store built by another layout is refused instead of scored with a different map.
#: 2: square-ish factors (r_out ~ r_in).
LAYOUT_VERSION = 2


@dataclass(frozen=True)
class LayerBlock:
    """Where layer weight ``name`` (viewed as (c_out, n_in)) goes: features [offset, offset + r_out * r_in)."""

    name: str
    c_out: int
    n_in: int
    r_out: int
    r_in: int
    offset: int


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


class FactorizedProjector:
    """Per-layer Kronecker Gaussian projection of the selected parameters (see module doc).

    Args:
        shapes: name -> shape of every selected parameter, in the order gradients are flattened.
        dim_out: d. With ``exact=True`` d is ignored: every factor is the identity, no
            matrix is formed and the features are the per-example gradient itself, in
            ``shapes`` order (d = p; :func:`example_grads_from_hooks`).
    """

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
        m = torch.randn(rows, cols, generator=_block_generator(seed, block)) / math.sqrt(max(rows, 1))
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
        cond: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        sink: Sink | None = None,
        sink_rows: Callable[[int], int | None] | None = None,
    ) -> torch.Tensor | None:
        """Projected gradients of the draw-averaged output, one row per example, without per-example gradients.

        Same arguments and meaning as :func:`attribution.gradients.per_example_grads`
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
        sqrt_ab, sqrt_1mab = _alpha_bar_terms(model, timesteps)
        x0, eps = x0.to(device), noises.to(device).flatten(0, 1)  # eps (B*D, C, H, W)
        x_t = sqrt_ab.reshape(-1, 1, 1, 1) * x0.repeat_interleave(D, 0) + sqrt_1mab.reshape(-1, 1, 1, 1) * eps
        c = None if cond is None else cond.repeat_interleave(D, 0)
        m = None if mask is None else mask.to(device=device, dtype=torch.float32)[None]
        # every block's first write copies (no zero fill); blocks the pass never reached are zeroed after it
        if sink is None and out is None:
            out = torch.empty(B, self.dim_out, device=device)
        small: dict[str, torch.Tensor] = {k: torch.zeros(B, math.prod(self.shapes[k]), device=device) for k in self.small}
        # Nothing requires gradients but the hooks' zero leaves: no weight gradient is formed.
        frozen = {k: v.detach() for k, v in model.unet.named_parameters()}
        hooks = _LayerHooks(self, model.unet, out, small, B, D, sink, sink_rows)
        try:
            eps_pred = functional_call(model.unet, frozen, (x_t, timesteps.to(device).reshape(-1)), model.unet_kwargs(c)).sample
            if not hooks.leaves:
                raise ValueError("no selected layer was reached by the forward pass")
            value = output(eps_pred, eps, m).sum() / D
            torch.autograd.grad(value, hooks.leaves, allow_unused=True)
        finally:
            hooks.remove()
        if sink is None:
            for b in self.blocks:
                if b.name not in hooks.written:
                    out[:, b.offset : b.offset + b.r_out * b.r_in].zero_()
        self._write_small(out, small, sink)
        return None if sink is not None else out


class _LayerHooks:
    """Forward hooks on the modules owning the selected parameters (see :meth:`FactorizedProjector.project_examples`).

    Each forward call of a hooked module records what its parameters' gradients need
    (projected input for a weight, normalized input for a norm scale), makes sure the
    output takes part in the backward (adding a zero leaf when nothing upstream
    requires gradients) and registers a tensor hook that, given the output gradient,
    adds the per-example projected / exact gradients into ``out`` and ``small``.
    """

    def __init__(self, proj: FactorizedProjector, unet: nn.Module, out: torch.Tensor | None,
                 small: dict[str, torch.Tensor], batch: int, draws: int, sink: Sink | None = None,
                 sink_rows: Callable[[int], int | None] | None = None):
        self.proj, self.out, self.small, self.B, self.D, self.sink = proj, out, small, batch, draws, sink
        self.sink_rows = sink_rows if sink is not None else None
        self.leaves: list[torch.Tensor] = []
        self.handles = []
        self.written: set[str] = set()  # blocks of ``out`` written so far (later calls of a module add)
        blocks = {b.name: b for b in proj.blocks}
        owners: dict[str, dict[str, str]] = {}  # module name -> {"weight"/"bias": parameter name}
        for name in proj.shapes:
            mod_name, _, attr = name.rpartition(".")
            owners.setdefault(mod_name, {})[attr] = name
        for mod_name, attrs in owners.items():
            module = unet.get_submodule(mod_name)
            _check_supported(module, mod_name, attrs, blocks)
            self.handles.append(module.register_forward_hook(self._forward_hook(module, attrs, blocks)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _write(self, name: str, offset: int, feat: torch.Tensor) -> None:
        """Put one block's (B, width) rows at ``offset``: to the sink, or into ``out`` (copied the first time,
        added after)."""
        if self.sink is not None:
            self.sink(offset, feat)
            return
        target = self.out[:, offset : offset + feat.shape[1]]
        if name in self.written:
            target += feat
        else:
            target.copy_(feat)
            self.written.add(name)

    def _tile_rows(self, block: LayerBlock) -> int | None:
        """Output channels per tile of a convolution's gradient (None: all at once; see ``sink_rows``)."""
        unit = self.sink_rows(block.n_in) if self.sink_rows is not None else None
        if unit is None:
            return None
        return unit * max(1, TILE_BYTES // (4 * self.B * unit * block.n_in))

    def _per_example(self, rows: torch.Tensor) -> torch.Tensor:
        """(B*D, ...) -> (B, ...): sum each example's D draws (the 1/D is in the objective)."""
        return rows.reshape(self.B, self.D, *rows.shape[1:]).sum(1)

    def _forward_hook(self, module: nn.Module, attrs: dict[str, str], blocks: dict[str, LayerBlock]) -> Callable:
        weight = attrs.get("weight")
        block = blocks.get(weight) if weight else None
        conv = isinstance(module, nn.Conv2d)
        norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
        channels_first = isinstance(module, (nn.Conv2d, nn.GroupNorm))  # else channels last (Linear, LayerNorm)

        exact = self.proj.exact
        grouped = conv and exact  # exact conv weight gradients by conv_weight_grads: no input side needed

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            x = inputs[0].detach()
            a = None
            if block is not None and not grouped:  # the input side of every position: (N, r_in or n_in, P)
                if conv:  # P_in a_pos at every position
                    p_in = self.proj.p_in[weight]
                    a = F.conv2d(x, p_in.view(block.r_in, *mod.weight.shape[1:]), None, mod.stride, mod.padding, mod.dilation)
                    a = a.flatten(2)
                else:
                    a = x if exact else x @ self.proj.p_in[weight].T
                    a = a.reshape(x.shape[0], -1, a.shape[-1]).transpose(1, 2)
            x_hat = None
            if norm and weight is not None:
                x_hat = (F.group_norm(x, mod.num_groups, eps=mod.eps) if isinstance(mod, nn.GroupNorm)
                         else F.layer_norm(x, mod.normalized_shape, eps=mod.eps))
            if not output.requires_grad:
                leaf = torch.zeros((), device=output.device, requires_grad=True)
                self.leaves.append(leaf)
                output = output + leaf

            def grad_hook(g: torch.Tensor) -> None:
                g = g.detach()
                if channels_first:
                    g_pos = g.flatten(2)  # (N, C, P)
                else:
                    g_pos = g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)  # (N, C, P)
                if block is not None:
                    if grouped:  # (B, rows, C_in, kh, kw) tiles, already summed over the draws
                        for o0, feat in conv_weight_grad_tiles(mod, x, g, self.D, self._tile_rows(block)):
                            self._write(weight, block.offset + o0 * block.n_in, feat.flatten(1))
                    else:
                        gp = g_pos if exact else torch.matmul(self.proj.p_out[weight], g_pos)  # (N, r_out, P)
                        feat = self._per_example(torch.bmm(gp, a.transpose(1, 2)))  # (B, r_out, r_in)
                        self._write(weight, block.offset, feat.flatten(1))
                elif x_hat is not None:
                    xh = x_hat.flatten(2) if channels_first else x_hat.reshape(x_hat.shape[0], -1, x_hat.shape[-1]).transpose(1, 2)
                    self.small[weight] += self._per_example((g_pos * xh).sum(2))
                if "bias" in attrs:
                    self.small[attrs["bias"]] += self._per_example(g_pos.sum(2))

            output.register_hook(grad_hook)
            return output

        return hook


# On the CPU, mkldnn's grouped weight-gradient kernel slows down sharply from ~128 input channels
# per group; where the output has few positions, im2col + one bmm is then 1.4-5x faster
# (benchmarks/per_example_conv_grads.py --shapes large). Larger maps keep the grouped kernel.
UNFOLD_MIN_FAN_IN = 1024  # C_in * kh * kw
UNFOLD_MAX_POSITIONS = 64  # H' * W'
#: Bytes of one tile of per-example convolution gradients handed to a row-tiled sink (CPU im2col path,
#: :func:`conv_weight_grad_tiles`): about what the projection reads back from the cache.
TILE_BYTES = 16 << 20


def use_unfold(module: nn.Conv2d, g: torch.Tensor) -> bool:
    """Whether :func:`conv_weight_grads` takes im2col for this layer; g (N, O, H', W') its output gradient."""
    fan_in = module.weight[0].numel()
    return (module.groups == 1 and g.device.type == "cpu" and fan_in >= UNFOLD_MIN_FAN_IN
            and g.shape[2] * g.shape[3] <= UNFOLD_MAX_POSITIONS)


def conv_weight_grads(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """Per-example weight gradients of a convolution, summed over each example's ``draws`` rows.

    x: (B*D, C, H, W) the layer's input, g: (B*D, O, H', W') its output gradient, rows
    ordered example-major (row b*D + d). The B examples are stacked along the channels
    and the D draws along the batch, so the convolution's own weight-gradient kernel
    with groups = B * module.groups forms all B gradients at once (and sums the draws):
    the same arithmetic as the batched (summed) gradient, with no im2col copy. Wide
    layers on small maps (CPU) take :func:`unfold_weight_grads` instead.

    Returns:
        (B, O, C / groups, kh, kw), in the layout of ``module.weight``.
    """
    ((_, grads),) = conv_weight_grad_tiles(module, x, g, draws)
    return grads


def conv_weight_grad_tiles(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, draws: int = 1,
                           rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`conv_weight_grads` in tiles of ``rows`` output channels (None: one tile of all O).

    Yields (o0, (B, rows, C / groups, kh, kw)) for o0 = 0, rows, 2 rows, ...: output channels
    [o0, o0 + rows) of every example. Only the im2col path (:func:`use_unfold`) tiles: its batched
    matmul writes B times the layer's size to memory, to be read back by the projection, and a tile
    that fits the cache is projected while it is still there (~30 % less time for a 240-channel
    layer on 8 x 8 maps, B = 26). The grouped kernel always forms all O channels in one tile: on
    fewer output channels per group it slows down 2-10x.
    """
    B, O = x.shape[0] // draws, g.shape[1]
    if not use_unfold(module, g):
        yield 0, grouped_weight_grads(module, x, g, draws)
        return
    rows = O if rows is None else min(rows, O)
    a, g_pos = _unfolded(module, x, g, draws)
    a_t = a.transpose(1, 2)
    for o0 in range(0, O, rows):
        yield o0, torch.bmm(g_pos[:, o0 : o0 + rows], a_t).view(B, -1, *module.weight.shape[1:])


def grouped_weight_grads(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """:func:`conv_weight_grads` by the grouped weight-gradient kernel (any device, shape or groups)."""
    N, C, H, W = x.shape
    B, O = N // draws, g.shape[1]

    def stack(t: torch.Tensor) -> torch.Tensor:  # (B*D, K, h, w) -> (D, B*K, h, w)
        if draws == 1:
            return t.reshape(1, -1, *t.shape[2:])
        return t.reshape(B, draws, *t.shape[1:]).transpose(0, 1).reshape(draws, -1, *t.shape[2:])

    w = module.weight
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        stack(g).contiguous(), stack(x).contiguous(), w.new_empty(B * O, *w.shape[1:]), None,
        module.stride, module.padding, module.dilation, False, (0, 0), B * module.groups, (False, True, False))
    return grad_w.view(B, O, *w.shape[1:])


def _unfolded(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """im2col of the input and the output gradient, each example's draws joined to its positions:
    ((B, C kh kw, D*P), (B, O, D*P))."""
    B, O = x.shape[0] // draws, g.shape[1]
    a = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B*D, C kh kw, P)
    g = g.flatten(2)  # (B*D, O, P)
    if draws > 1:
        g = g.reshape(B, draws, O, -1).transpose(1, 2).reshape(B, O, -1)
        a = a.reshape(B, draws, a.shape[1], -1).transpose(1, 2).reshape(B, a.shape[1], -1)
    return a, g


def unfold_weight_grads(module: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """:func:`conv_weight_grads` by im2col: G_b = sum over draws and positions of g (O, P) a^T (P, C kh kw)."""
    a, g_pos = _unfolded(module, x, g, draws)
    return torch.bmm(g_pos, a.transpose(1, 2)).view(x.shape[0] // draws, *module.weight.shape)


def _check_supported(module: nn.Module, name: str, attrs: dict[str, str], blocks: dict[str, LayerBlock]) -> None:
    """Refuse parameters whose per-example gradient the hooks cannot form."""
    ok = set(attrs) <= {"weight", "bias"}
    if isinstance(module, nn.Conv2d):
        ok = ok and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str) and ("weight" not in attrs or attrs["weight"] in blocks)
    elif isinstance(module, nn.Linear):
        ok = ok and ("weight" not in attrs or attrs["weight"] in blocks)
    elif isinstance(module, nn.GroupNorm):
        ok = ok and all(attrs.get(a) not in blocks for a in ("weight", "bias"))
    elif isinstance(module, nn.LayerNorm):
        ok = ok and len(module.normalized_shape) == 1 and all(attrs.get(a) not in blocks for a in ("weight", "bias"))
    else:
        ok = False
    if not ok:
        raise ValueError(
            f"proj_kind 'factorized' supports weights and biases of Conv2d (groups=1), Linear, GroupNorm and "
            f"LayerNorm; {name} ({type(module).__name__}: {sorted(attrs)}) is not; choose another proj_kind "
            "or a param_filter without it"
        )


def hooks_support(model: DiffusionModel, params: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`example_grads_from_hooks` can form every selected parameter's per-example gradient."""
    owners: dict[str, dict[str, str]] = {}
    for name in params:
        mod_name, _, attr = name.rpartition(".")
        owners.setdefault(mod_name, {})[attr] = name
    blocks = {k: None for k, v in params.items() if v.dim() in (2, 4)}
    try:
        for mod_name, attrs in owners.items():
            _check_supported(model.unet.get_submodule(mod_name), mod_name, attrs, blocks)
    except (ValueError, AttributeError):
        return False
    return True


_EXACT: dict[tuple, FactorizedProjector] = {}


def _chunks(n: int, chunk_size: int, cond: torch.Tensor | None):
    """(row slice, its conditioning) for each chunk of ``n`` examples; ``cond`` (n|1, L, D) or None."""
    for s in range(0, n, chunk_size):
        sl = slice(s, s + chunk_size)
        yield sl, (cond[sl] if cond is not None and cond.shape[0] > 1 else cond)


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
    cond: torch.Tensor | None = None,
    projector=None,
) -> torch.Tensor:
    """The (B, P) gradients of :func:`~attribution.gradients.per_example_grads`, from batched passes with hooks.

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
                                  sink_rows=getattr(projector, "row_block", None))
    return out if projector is None else acc_t.T.contiguous()


def projected_example_grads(
    projector,
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    chunk_size: int = 32,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected per-example gradients (B, d) float32 with any projector (train features).

    A :class:`FactorizedProjector` computes them from batched passes of ``chunk_size``
    examples; any other projector projects the per-example gradients, formed by hooks
    (:func:`example_grads_from_hooks`; the sjlt sketch takes each layer's gradient straight from its
    hook) where the model's layers allow it, else by :func:`~attribution.gradients.per_example_grads` (vmap).
    Arguments as in :func:`~attribution.gradients.per_example_grads`.
    """
    if isinstance(projector, FactorizedProjector):
        return torch.cat([projector.project_examples(model, params, output, x0[sl], timesteps[sl], noises[sl], cond=c)
                          for sl, c in _chunks(x0.shape[0], chunk_size, cond)])
    if not hooks_support(model, params):
        return projector.project(per_example_grads(model, params, output, x0, timesteps, noises, chunk_size=chunk_size,
                                                  cond=cond))
    if hasattr(projector, "accumulate_columns"):  # fused: each layer's gradient projected as its hook forms it
        return example_grads_from_hooks(model, params, output, x0, timesteps, noises, chunk_size, cond, projector=projector)
    return projector.project(example_grads_from_hooks(model, params, output, x0, timesteps, noises, chunk_size, cond))


def projected_step_grads(
    projector,
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    output: OutputFn,
    x0_hat: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    mask: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected Eq. (3) gradients of S steps (S, d) float32 (query features).

    x0_hat (S, C, H, W), timesteps (S, K), noises (S, K, C, H, W), mask (1|C, H, W),
    cond (1|S, L, D). A :class:`FactorizedProjector` gets them from one batched
    backward over the S * K rows; any other projector projects
    :func:`~attribution.gradients.per_step_grads` (one plain backward per step).
    """
    if isinstance(projector, FactorizedProjector):
        return projector.project_examples(model, params, output, x0_hat, timesteps, noises, mask, cond)
    return projector.project(per_step_grads(model, params, output, x0_hat, timesteps, noises, mask, cond))
