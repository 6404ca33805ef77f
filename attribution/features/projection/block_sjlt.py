"""The block sparse sketch (``"block-sjlt"``): each parameter group sketched into its own rows.

The flattened gradient is cut into parameter groups g (the UNet's blocks, :func:`param_groups`)
and the d output coordinates into consecutive slices R_g of d_g rows (d split evenly, in
multiples of ``nnz``). Group g's columns are sketched by their own sjlt S_g (d_g, |g|) into R_g
only, so P is block diagonal and a feature splits into per-group features:

    phi_i = P grad L_i = [S_1 grad_1 L_i ; ... ; S_G grad_G L_i],   phi_i[R_g] = S_g grad_g L_i

and the store's kernel Phi^T Phi has the per-group kernels Phi_g^T Phi_g as its diagonal blocks.
phi_i^T phi_j = sum_g (S_g grad_g L_i)^T (S_g grad_g L_j) is still an unbiased sketch of the full
gradient inner product, so every store method (journey-TRAK, TracIn, ...) works on it unchanged;
``journey-groups`` (:mod:`attribution.scoring.group_weights`) also uses the per-group kernels.
"""

from __future__ import annotations

import bisect
from typing import Mapping, Sequence

import numpy as np
import torch

from ...config import ProjectionKind
from .grouped import ParamGroup, block_of, param_groups
from .sjlt import HookedSketch, SparseSignProjector

__all__ = ["BlockSparseSignProjector", "group_dims"]


def group_dims(dim_out: int, num_groups: int, nnz: int) -> list[int]:
    """d_g of each of ``num_groups`` groups: ``dim_out`` split as evenly as whole multiples of ``nnz`` allow
    (the first groups get the remainder).

    Raises:
        ValueError: ``dim_out`` is not a multiple of ``nnz``, or too small to give every group ``nnz`` rows.
    """
    if dim_out % nnz:
        raise ValueError(f"block-sjlt needs proj_dim divisible by nnz ({dim_out} % {nnz} != 0)")
    units = dim_out // nnz
    if units < num_groups:
        raise ValueError(f"block-sjlt needs proj_dim >= {num_groups * nnz} for {num_groups} parameter groups "
                         f"and nnz {nnz}, not {dim_out}")
    base, extra = divmod(units, num_groups)
    return [nnz * (base + (g < extra)) for g in range(num_groups)]


def _group_seed(seed: int, g: int) -> int:
    """The seed of group g's sjlt, derived from the projection's seed."""
    state = np.random.SeedSequence([int(seed), 7919, int(g)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


class BlockSparseSignProjector(HookedSketch):
    """Block-diagonal sparse sign sketch (see module doc): (B, p) gradients -> (B, d) features.

    ``shapes``: name -> shape of every parameter, in gradient order (the groups follow the names,
    ``group_of``). Offers the ``accumulate_columns`` / ``row_block`` interface of
    :class:`SparseSignProjector`, so featurize projects each layer's gradient as its hook forms it.

    Attributes:
        groups: the G parameter groups (column ranges).
        row_slices: (G,) the output rows R_g of each group.
    """

    kind = ProjectionKind.BLOCK_SJLT

    def __init__(self, shapes: Mapping[str, Sequence[int]], dim_out: int, seed: int, nnz: int = 4,
                 device: str | torch.device = "cpu", group_of=block_of):
        self.groups: list[ParamGroup] = param_groups(shapes, group_of)
        self.dim_in, self.dim_out, self.nnz = self.groups[-1].stop, dim_out, nnz
        dims = group_dims(dim_out, len(self.groups), nnz)
        edges = np.concatenate([[0], np.cumsum(dims)]).tolist()
        self.row_slices = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
        names = list(shapes)
        self._subs = []
        for g, group in enumerate(self.groups):
            members = [tuple(shapes[n]) for n in names if group_of(n) == group.name]
            self._subs.append(SparseSignProjector(group.size, dims[g], _group_seed(seed, g), nnz=nnz, device=device,
                                                  shapes=members))
        self._starts = [g.start for g in self.groups]
        self.row_tiled = self._subs[0].row_tiled

    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def matrix(self) -> torch.Tensor:
        """The dense (dim_out, dim_in) matrix (for tests)."""
        out = torch.zeros(self.dim_out, self.dim_in)
        for group, rows, sub in zip(self.groups, self.row_slices, self._subs):
            out[rows, group.start : group.stop] = sub.matrix()
        return out

    def row_block(self, row_length: int) -> int | None:
        """As :meth:`SparseSignProjector.row_block` (every group's sketch cuts its weights alike)."""
        return self._subs[0].row_block(row_length)

    def accumulate_columns(self, part: torch.Tensor, start: int, acc_t: torch.Tensor) -> None:
        """``acc_t += P[:, start:stop] @ part.T`` for columns [start, stop) inside one group.

        part: (B, stop - start); acc_t: (dim_out, B) float32, updated (only the group's rows change).

        Raises:
            ValueError: the columns cross a group's end, or are not block edges of its sketch.
        """
        g = bisect.bisect_right(self._starts, start) - 1
        group = self.groups[g]
        if start + part.shape[1] > group.stop:
            raise ValueError(f"columns [{start}, {start + part.shape[1]}) cross the end of group {group.name}")
        self._subs[g].accumulate_columns(part, start - group.start, acc_t[self.row_slices[g]])

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.dim_out, grads.shape[0], device=grads.device)
        for group in self.groups:
            self.accumulate_columns(grads[:, group.start : group.stop], group.start, out)
        return out.T.contiguous()
