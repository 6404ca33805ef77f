"""Random projections of gradients: the :class:`Projector` interface and its kinds.

* ``"sjlt"`` (default): :class:`SparseSignProjector`, a sparse sign sketch;
* ``"block-sjlt"``: :class:`BlockSparseSignProjector`, one sparse sketch per parameter group, each
  into its own rows (a store of per-group features);
* ``"gaussian"``: :class:`GaussianProjector`, dense N(0, 1/d) entries generated blockwise;
* ``"identity"``: :class:`IdentityProjector`, no projection (d = p), for exact tests;
* ``"factorized"``: :class:`FactorizedProjector`, a per-layer Kronecker Gaussian map
  computed from one batched backward without per-example gradients.
"""

from __future__ import annotations

import numpy as np
import torch

from ...config import ProjectionKind
from .base import Projector, block_generator
from .block_sjlt import BlockSparseSignProjector, group_dims
from .dense import FullGradientProjector, GaussianProjector, IdentityProjector
from .factorized import LAYOUT_VERSION, FactorizedProjector
from .grouped import GroupedSketch, ParamGroup, param_groups
from .sjlt import SparseSignProjector, row_block_edges, rows_per_block, sjlt_csr

__all__ = [
    "BlockSparseSignProjector", "FactorizedProjector", "FullGradientProjector", "GaussianProjector", "GroupedSketch", "IdentityProjector",
    "LAYOUT_VERSION", "ParamGroup", "ProjectionKind", "Projector", "SparseSignProjector", "block_generator", "group_dims", "make_projector", "param_groups", "row_block_edges",
    "rows_per_block", "sjlt_csr",
]


def make_projector(
    kind: str | ProjectionKind,
    dim_in: int,
    dim_out: int,
    seed: int,
    nnz: int = 4,
    device: str | torch.device = "cpu",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Projector:
    """Build the projector named ``kind`` ("sjlt", "block-sjlt", "gaussian", "identity" or "factorized").

    ``shapes`` (name -> shape of each selected parameter, in gradient order) is
    needed by "factorized" (:class:`FactorizedProjector`) and "block-sjlt" (its groups follow
    the names); "sjlt" puts a block edge at each parameter's start with it (same matrix).
    """
    try:
        kind = ProjectionKind(kind)
    except ValueError:
        raise ValueError(f"unknown projection {kind!r}") from None
    if kind == ProjectionKind.FACTORIZED:
        if shapes is None or sum(int(np.prod(s)) for s in shapes.values()) != dim_in:
            raise ValueError("the factorized projection needs the shapes of the selected parameters")
        return FactorizedProjector(shapes, dim_out, seed, device=device)
    if kind == ProjectionKind.BLOCK_SJLT:
        if shapes is None or sum(int(np.prod(s)) for s in shapes.values()) != dim_in:
            raise ValueError("the block-sjlt projection needs the names and shapes of the selected parameters")
        return BlockSparseSignProjector(shapes, dim_out, seed, nnz=nnz, device=device)
    if kind == ProjectionKind.IDENTITY:
        return IdentityProjector(dim_in)
    if kind == ProjectionKind.SJLT:  # block edges at every parameter's start: featurize projects each layer's gradient alone
        return SparseSignProjector(dim_in, dim_out, seed, nnz=nnz, device=device,
                                   shapes=list(shapes.values()) if shapes else None)
    if kind == ProjectionKind.GAUSSIAN:
        return GaussianProjector(dim_in, dim_out, seed, device=device)
    raise AssertionError(kind)
