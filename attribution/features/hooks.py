"""Per-example gradients of a layer from its forward input and output gradient (hooks), from one backward.

The per-example gradient of a Conv2d / Linear weight W (viewed as (C_out, n_in)) is a sum
over positions of output-gradient x input outer products, ``G_b = sum_pos g_pos a_pos^T``;
biases and norm scales/shifts are sums of the output gradient (times the normalized input).
:class:`LayerHooks` registers forward hooks on the modules owning the selected parameters
that record the input side and, given the output gradient, write each example's
gradient, or a projection ``P_out G_b P_in^T`` of it, into a buffer or hand it to a sink.
:class:`~attribution.features.projection.factorized.FactorizedProjector` drives them:
with random factors it is the factorized projection, with identity factors
(``exact=True``) the exact per-example gradients that the other projectors project.

Exact convolution weight gradients come from :func:`conv_weight_grads` (the layer's
weight-gradient convolution with one group per example, summed over each example's
draws inside it; no im2col copy), or by im2col where that is faster on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import DiffusionModel

__all__ = ["LayerBlock", "LayerHooks", "LayerMap", "Sink", "conv_weight_grad_tiles", "conv_weight_grads",
           "hooks_support", "use_unfold"]

#: Receives (start, (B, numel) per-example gradients of the parameter slice starting at ``start``).
Sink = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class LayerBlock:
    """Where layer weight ``name`` (viewed as (c_out, n_in)) goes: features [offset, offset + r_out * r_in)."""

    name: str
    c_out: int
    n_in: int
    r_out: int
    r_in: int
    offset: int


class LayerMap(Protocol):
    """What the hooks read of a block-diagonal layer map (a :class:`FactorizedProjector`)."""

    shapes: dict[str, tuple[int, ...]]
    blocks: list[LayerBlock]
    exact: bool
    p_out: dict[str, torch.Tensor]
    p_in: dict[str, torch.Tensor]


class LayerHooks:
    """Forward hooks on the modules owning the selected parameters (see :meth:`FactorizedProjector.project_examples`).

    Each forward call of a hooked module records what its parameters' gradients need
    (projected input for a weight, normalized input for a norm scale), makes sure the
    output takes part in the backward (adding a zero leaf when nothing upstream
    requires gradients) and registers a tensor hook that, given the output gradient,
    adds the per-example projected / exact gradients into ``out`` and ``small``.
    """

    def __init__(self, proj: LayerMap, unet: nn.Module, out: torch.Tensor | None,
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
