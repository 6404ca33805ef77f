"""The projector interface: P: R^p -> R^d maps flattened gradients to features (Algorithm 1 line 6).

A :class:`Projector` is named by its :class:`~attribution.config.ProjectionKind` and
answers three questions:

* :meth:`Projector.project`: full gradients (B, p) -> features (B, d);
* :meth:`Projector.example_features`: the projected per-example gradients of the
  draw-averaged training loss (train features), each projector taking its own
  fastest path (the factorized map never forms a per-example gradient, the sparse
  sketch projects each layer's gradient as its hook forms it);
* :meth:`Projector.step_features`: the projected Eq. (3) gradients of S steps (query
  features).

Every random matrix is generated from a seed on the CPU with ``torch.Generator``,
blockwise (:func:`block_generator`), and then moved to the device: the same seed gives
the same matrix on every machine and device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from ...config import ProjectionKind
from ..gradients import DrawBatch, GradientTarget, per_step_grads

__all__ = ["Projector", "ProjectionKind", "block_generator"]


def block_generator(seed: int, block: int) -> torch.Generator:
    """CPU generator for block ``block`` of the projection with seed ``seed``."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class Projector(ABC):
    """A seeded linear map of flattened gradients, (B, dim_in) -> (B, dim_out) float32."""

    kind: ClassVar[ProjectionKind]
    dim_in: int
    dim_out: int

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, dim_in) full gradients, flattened in parameter order -> (B, dim_out), float32."""

    @abstractmethod
    def example_features(self, target: GradientTarget, batch: DrawBatch, chunk_size: int = 32) -> torch.Tensor:
        """Projected per-example gradients (B, d) float32 of the draw-averaged output (train features).

        As :func:`~attribution.features.gradients.per_example_grads` of ``batch`` (no mask), projected;
        ``chunk_size`` examples per pass.
        """

    def step_features(self, target: GradientTarget, batch: DrawBatch) -> torch.Tensor:
        """Projected Eq. (3) gradients of S steps (S, d) float32 (query features).

        ``batch``: x0_hat (S, C, H, W), timesteps (S, K), noises (S, K, C, H, W), mask (1|C, H, W),
        cond (1|S, L, D). By default the projection of
        :func:`~attribution.features.gradients.per_step_grads` (one plain backward per step).
        """
        return self.project(per_step_grads(target.model, target.params, target.output, batch.x0, batch.timesteps,
                                           batch.noises, batch.mask, batch.cond))
