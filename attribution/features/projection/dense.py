"""Projectors of full per-example gradients: the identity and a dense Gaussian matrix."""

from __future__ import annotations

import torch

from ...config import ProjectionKind
from ..gradients import DrawBatch, GradientTarget, per_example_grads
from .base import Projector, block_generator
from .factorized import example_grads_from_hooks, hooks_support

__all__ = ["FullGradientProjector", "exact_example_grads", "GaussianProjector", "IdentityProjector"]


class FullGradientProjector(Projector):
    """A projector that projects formed per-example gradients (train features).

    The gradients come from batched passes with hooks
    (:func:`~attribution.features.projection.factorized.example_grads_from_hooks`) where the
    model's layers allow it, else from :func:`~attribution.features.gradients.per_example_grads` (vmap).
    """

    def example_features(self, target: GradientTarget, batch: DrawBatch, chunk_size: int = 32) -> torch.Tensor:
        return self.project(exact_example_grads(target, batch, chunk_size))


def exact_example_grads(target: GradientTarget, batch: DrawBatch, chunk_size: int = 32) -> torch.Tensor:
    """(B, P) per-example gradients of the draw-averaged output: by hooks where the layers allow it, else vmap."""
    model, params, output = target.model, target.params, target.output
    if not hooks_support(model, params):
        return per_example_grads(model, params, output, batch.x0, batch.timesteps, batch.noises, chunk_size=chunk_size,
                                 cond=batch.cond)
    return example_grads_from_hooks(model, params, output, batch.x0, batch.timesteps, batch.noises, chunk_size,
                                    batch.cond)


class IdentityProjector(FullGradientProjector):
    """P = I: features are the raw gradients."""

    kind = ProjectionKind.IDENTITY

    def __init__(self, dim_in: int):
        self.dim_in = self.dim_out = dim_in

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads.float()


class GaussianProjector(FullGradientProjector):
    """Dense Gaussian projection, N(0, 1/d) entries, generated in blocks of ``block_rows`` input coordinates.

    Blocks are kept in memory up to ``cache_bytes`` and regenerated otherwise, so the full matrix never has to fit.
    """

    kind = ProjectionKind.GAUSSIAN

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
        m = torch.randn(n, self.dim_out, generator=block_generator(self.seed, b))
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
