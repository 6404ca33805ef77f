"""Random projections P: R^p -> R^d of gradients (Algorithm 1 line 6).

All projectors are generated from a seed on the CPU with ``torch.Generator``,
blockwise over input coordinates, and then moved to the device: the same seed
gives the same matrix on every machine and device.

* :class:`SparseSignProjector` (default, ``"sjlt"``): a sparse Johnson-Lindenstrauss
  sketch; each input coordinate goes to ``nnz`` output coordinates (one in each of
  ``nnz`` blocks of d / nnz) with a random sign / sqrt(nnz). Projecting costs
  O(p * nnz) per example instead of O(p * d), and memory is O(p * nnz).
* :class:`GaussianProjector` (``"gaussian"``): dense N(0, 1/d) entries, generated
  in blocks of ``block_rows`` input coordinates; blocks are kept in memory up to
  ``cache_bytes`` and regenerated otherwise, so the full matrix never has to fit.
* :class:`IdentityProjector` (``"identity"``): no projection (d = p), for exact tests.
* ``"factorized"``: per-layer Kronecker Gaussian projection computed from one batched
  backward without per-example gradients (:mod:`attribution.factorized`).
"""

from __future__ import annotations

import math
import warnings
from typing import Protocol, Sequence

import numpy as np
import torch


def _block_generator(seed: int, block: int) -> torch.Generator:
    """CPU generator for block ``block`` of the projection with seed ``seed``."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class Projector(Protocol):
    dim_in: int
    dim_out: int

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, dim_in) -> (B, dim_out), float32."""
        ...


class IdentityProjector:
    """P = I: features are the raw gradients."""

    def __init__(self, dim_in: int):
        self.dim_in = self.dim_out = dim_in

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads.float()


def sjlt_csr(index: torch.Tensor, sign: torch.Tensor, dim_out: int) -> torch.Tensor:
    """The (dim_out, p) CSR matrix with ``sign[h, j]`` at (``index[h, j]``, j); index, sign (nnz, p).

    ``sign`` holds +-c for one constant c (the sketch's +-1/sqrt(nnz)).

    Built by one stable sort of the row indices instead of COO ``coalesce`` (about
    2x faster at 10 M parameters). No two entries share a position (hash h writes
    only into its own block of rows), and within a row all entries come from one
    hash, whose columns increase, so a stable sort by row yields sorted columns:
    exactly the matrix ``coalesce().to_sparse_csr()`` gives.
    """
    nnz, p = index.shape
    rows = index.reshape(-1)  # entry k = h * p + j sits in column j = k % p
    narrow = torch.int16 if dim_out <= torch.iinfo(torch.int16).max else torch.int32  # a faster sort key
    order = torch.sort(rows.to(narrow), stable=True).indices
    cols = order % p
    # Gathering int8 signs moves 4x fewer bytes than float32 (the gather is cache-miss bound).
    values = sign.reshape(-1).sign().to(torch.int8)[order].to(sign.dtype).mul_(sign.abs().max())
    crow = torch.zeros(dim_out + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=dim_out), 0, out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        # Stored as CSR: a sparse-dense matmul is ~3x faster than index_add_.
        return torch.sparse_csr_tensor(crow, cols, values, (dim_out, p), check_invariants=False)


def rows_per_block(row_length: int, column_block: int) -> int:
    """Whole rows of ``row_length`` coordinates in one column block of about ``column_block`` coordinates."""
    return max(1, column_block // max(row_length, 1))


def row_block_edges(shapes: Sequence[tuple[int, ...]], column_block: int) -> list[int]:
    """Column-block edges (increasing) for gradients flattened from parameters of ``shapes``, ending with their total size.

    Every parameter starts a block; a weight (2-D or more, rows = its first dimension) is cut after
    every :func:`rows_per_block` whole rows, and a row wider than ``column_block`` also inside
    (every ``column_block`` coordinates from the row's start); a 1-D parameter every ``column_block``.
    """
    edges, start = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        row = math.prod(shape[1:]) if len(shape) >= 2 else 1
        if row > column_block:
            for r in range(start, start + numel, row):
                edges += range(r, r + row, column_block)
        else:
            edges += range(start, start + numel, rows_per_block(row, column_block) * row)
        start += numel
    return edges + [start]


class SparseSignProjector:
    """Sparse sign sketch with ``nnz`` non-zeros per input coordinate (see module doc).

    The matrix is kept as column blocks and applied block by block. On the CPU a block
    spans about ``COLUMN_BLOCK`` input coordinates, so each block's scattered reads of
    the gradient rows stay in cache (3x faster than one (d, p) sparse matmul for 263k
    parameters). With the parameters' ``shapes`` every parameter starts a block, so that
    :meth:`accumulate_columns` can project one parameter's gradient on its own, and on the
    CPU the blocks follow each weight's rows instead of a fixed grid (:func:`row_block_edges`),
    so a hook can also hand over a weight's gradient in tiles of whole rows (:meth:`row_block`).
    ``boundaries`` add any other block edges. The matrix is the same whatever the blocks.
    """

    BLOCK = 1 << 20  # input coordinates per generated block
    COLUMN_BLOCK = 1 << 14  # input coordinates per sparse matmul on the CPU

    def __init__(self, dim_in: int, dim_out: int, seed: int, nnz: int = 4, device: str | torch.device = "cpu",
                 boundaries: Sequence[int] = (), shapes: Sequence[tuple[int, ...]] | None = None):
        if dim_out % nnz:
            raise ValueError(f"sjlt needs proj_dim divisible by nnz ({dim_out} % {nnz} != 0)")
        self.dim_in, self.dim_out, self.nnz = dim_in, dim_out, nnz
        width = dim_out // nnz
        idx, sgn = [], []
        for b, start in enumerate(range(0, dim_in, self.BLOCK)):
            n = min(self.BLOCK, dim_in - start)
            g = _block_generator(seed, b)
            offs = torch.arange(nnz).mul_(width)[:, None]
            idx.append(torch.randint(0, width, (nnz, n), generator=g) + offs)
            sgn.append(torch.randint(0, 2, (nnz, n), generator=g).float().mul_(2).sub_(1))
        index = torch.cat(idx, 1)  # (nnz, p): output coordinate of each (hash, input)
        sign = torch.cat(sgn, 1) / nnz**0.5  # (nnz, p)
        cpu = torch.device(device).type == "cpu"
        self._column_block = self.COLUMN_BLOCK if cpu else dim_in  # on a GPU: one block per parameter, or in all
        #: whether weights are cut into blocks of whole rows (:meth:`row_block`), so a hook may hand over a weight's
        #: gradient in tiles of row_block rows (CPU, parameter shapes given)
        self.row_tiled = cpu and shapes is not None
        if shapes is not None:
            grid = row_block_edges(shapes, self._column_block)
            if grid[-1] != dim_in:
                raise ValueError(f"the parameter shapes hold {grid[-1]} coordinates, not {dim_in}")
        else:
            grid = range(0, dim_in, self._column_block)
        edges = sorted({0, *grid, *(int(c) for c in boundaries if 0 < c < dim_in)} - {dim_in}) + [dim_in]
        #: (start, stop, (dim_out, stop - start) CSR) column blocks of the matrix
        self.column_blocks = [(a, b, sjlt_csr(index[:, a:b], sign[:, a:b], dim_out).to(device))
                              for a, b in zip(edges[:-1], edges[1:])]
        self._block_at = {a: i for i, (a, _, _) in enumerate(self.column_blocks)}

    def matrix(self) -> torch.Tensor:
        """The dense (dim_out, dim_in) matrix (for tests)."""
        return torch.cat([m.to_dense() for _, _, m in self.column_blocks], 1)

    def row_block(self, row_length: int) -> int | None:
        """Rows per column block of a weight whose rows hold ``row_length`` coordinates, or None when the
        blocks do not follow rows: a hook may hand over a weight's gradient in tiles of any multiple of
        this many whole rows."""
        return rows_per_block(row_length, self._column_block) if self.row_tiled else None

    def accumulate_columns(self, part: torch.Tensor, start: int, acc_t: torch.Tensor) -> None:
        """``acc_t += P[:, start:stop] @ part.T``: the projection of one slice of the gradients.

        part: (B, stop - start) gradient coordinates [start, stop); both ends must be block
        edges (the ``boundaries`` given at construction). acc_t: (dim_out, B) float32, updated.
        """
        stop = start + part.shape[1]
        i = self._block_at.get(start)
        if i is None:
            raise ValueError(f"column {start} is not a block edge of this sjlt projector (pass it in boundaries)")
        part = part.float()
        while i < len(self.column_blocks) and self.column_blocks[i][0] < stop:
            a, b, m = self.column_blocks[i]
            if b > stop:
                raise ValueError(f"column {stop} is not a block edge of this sjlt projector (pass it in boundaries)")
            acc_t += m @ part[:, a - start : b - start].T
            i += 1

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.dim_out, grads.shape[0], device=grads.device)
        self.accumulate_columns(grads, 0, out)
        return out.T.contiguous()


class GaussianProjector:
    """Dense Gaussian projection, N(0, 1/d) entries, generated blockwise (see module doc)."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        seed: int,
        device: str | torch.device = "cpu",
        block_rows: int = 16384,
        cache_bytes: int = 3 << 30,
    ):
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed
        self.device = torch.device(device)
        self.block_rows = block_rows
        self._cache: dict[int, torch.Tensor] | None = {} if dim_in * dim_out * 4 <= cache_bytes else None

    def block(self, b: int) -> torch.Tensor:
        """Rows [b * block_rows, ...) of the (dim_in, dim_out) matrix, on the device."""
        if self._cache is not None and b in self._cache:
            return self._cache[b]
        n = min(self.block_rows, self.dim_in - b * self.block_rows)
        m = torch.randn(n, self.dim_out, generator=_block_generator(self.seed, b))
        m = m.div_(self.dim_out**0.5).to(self.device)
        if self._cache is not None:
            self._cache[b] = m
        return m

    def matrix(self) -> torch.Tensor:
        """The whole (dim_in, dim_out) matrix (tests and small models only)."""
        return torch.cat([self.block(b) for b in range(self.num_blocks)], 0)

    @property
    def num_blocks(self) -> int:
        return -(-self.dim_in // self.block_rows)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        grads = grads.float()
        out = torch.zeros(grads.shape[0], self.dim_out, device=grads.device)
        for b in range(self.num_blocks):
            sl = slice(b * self.block_rows, (b + 1) * self.block_rows)
            out.addmm_(grads[:, sl], self.block(b))
        return out


def make_projector(
    kind: str,
    dim_in: int,
    dim_out: int,
    seed: int,
    nnz: int = 4,
    device: str | torch.device = "cpu",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Projector:
    """Build the projector named ``kind`` ("sjlt", "gaussian", "identity" or "factorized").

    ``shapes`` (name -> shape of each selected parameter, in gradient order) is
    needed by "factorized" (:class:`attribution.factorized.FactorizedProjector`); "sjlt"
    puts a block edge at each parameter's start with it (same matrix).
    """
    if kind == "factorized":
        from .factorized import FactorizedProjector  # imports the model code; only when asked for

        if shapes is None or sum(int(np.prod(s)) for s in shapes.values()) != dim_in:
            raise ValueError("the factorized projection needs the shapes of the selected parameters")
        return FactorizedProjector(shapes, dim_out, seed, device=device)
    if kind == "identity":
        return IdentityProjector(dim_in)
    if kind == "sjlt":  # block edges at every parameter's start: featurize projects each layer's gradient alone
        return SparseSignProjector(dim_in, dim_out, seed, nnz=nnz, device=device,
                                   shapes=list(shapes.values()) if shapes else None)
    if kind == "gaussian":
        return GaussianProjector(dim_in, dim_out, seed, device=device)
    raise ValueError(f"unknown projection {kind!r}")
