"""Similarity baselines: pixel and embedding cosine similarity of x0_hat with each train image.

Both give one score per (step, train example), shape (S, N), larger = more similar;
they use no gradients and no store. Gradient baselines (Diffusion-TracIn and
-ReTrac) share the store with journey-TRAK: see ``METHODS`` in
:mod:`attribution.features.outputs`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.datasets import ImageDataset

BASELINES = {
    "pixel": "Pixel cosine similarity of x0_hat",
    "embedding": "Classifier-embedding cosine similarity of x0_hat",
}

#: name -> (short name, one-line blurb) of each baseline, as :class:`~attribution.features.outputs.Method` has them.
BASELINE_NOTES = {
    "pixel": ("pixel sim.", "pixel similarity to x̂0 (no model gradients)"),
    "embedding": ("embedding sim.", "classifier-embedding similarity to x̂0"),
}


#: ``--method`` names of the baselines (the app's ``baseline-*`` names and the benchmark's short ones) -> baseline.
BASELINE_METHODS = {"baseline-pixel": "pixel", "baseline-embedding": "embedding", "pixel": "pixel", "embedding": "embedding"}


def _normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.flatten(1).float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _train_matrix(dataset: ImageDataset, embed: Callable[[torch.Tensor], torch.Tensor] | None, batch: int = 1024) -> torch.Tensor:
    rows = []
    for start in range(0, len(dataset), batch):
        x = dataset.images(np.arange(start, min(start + batch, len(dataset))))
        rows.append(_normalize(embed(x) if embed is not None else x))
    return torch.cat(rows)


class SimilarityBaseline:
    """Cosine similarity in pixel space (``embed=None``) or in an embedding space.

    The normalized train matrix (N, F) is computed once at construction.
    """

    def __init__(self, dataset: ImageDataset, embed: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "pixel"):
        self.name = name
        self.embed = embed
        with torch.no_grad():
            self.train = _train_matrix(dataset, embed)

    @torch.no_grad()
    def scores(self, x0_hat: torch.Tensor) -> np.ndarray:
        """x0_hat (S, C, H, W) in [-1, 1] -> (S, N) cosine similarities."""
        q = _normalize(self.embed(x0_hat) if self.embed is not None else x0_hat)
        return (q @ self.train.T).numpy().astype(np.float32)


def baseline_scores(base: SimilarityBaseline, x0_hat: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Scores (S, N) of pixel-space one-step predictions x0_hat (S, C, H, W), clamped to [-1, 1] and,
    with a patch ``mask`` (1|C, H, W) in [0, 1], restricted to it (pixels outside set to 0)."""
    x0 = x0_hat.clamp(-1, 1)
    if mask is not None:
        x0 = x0 * mask.to(x0.device)
    return base.scores(x0)
