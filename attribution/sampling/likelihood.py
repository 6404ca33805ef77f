"""Feature-likelihood curves (journey-TRAK Section 3.1, Figure 3).

For step s of a trajectory, draw ``num_samples`` final images from p(. | x_t) by
resuming sampling at x_t with stochastic (eta = 1, i.e. DDPM-like ancestral)
DDIM steps (flow matching: the re-noising flow sampler, :mod:`.steps`) over the same
remaining timesteps, classify them, and average the
class probabilities. The steps where the likelihood of a feature rises fastest
are those that decide it.

The "classifier" is any map from images to probabilities: the bundled digit
classifier (:func:`likelihood_curves`), or a user's local CLIP model scoring
free-text labels zero-shot (:func:`label_curves`, see :mod:`attribution.models.clip`),
with the same continuation samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import SamplingConfig
from ..models.base import DiffusionModel
from ..models.clip import ClipLabeler, check_labels
from .steps import StepSampler
from .trajectory import Trajectory, guided_prediction

Progress = Callable[[int, int], None]


@dataclass
class LikelihoodCurves:
    """probs (S, num_classes): mean class probability of samples from p(. | x_t) at each step."""

    steps: np.ndarray
    timesteps: np.ndarray
    probs: np.ndarray
    num_samples: int

    def rise_interval(self, cls: int, low: float = 0.2, high: float = 0.8) -> tuple[int, int] | None:
        """Steps (first, last) between which the likelihood of ``cls`` crosses ``low`` then ``high``."""
        p = self.probs[:, cls]
        above_low = np.flatnonzero(p >= low)
        above_high = np.flatnonzero(p >= high)
        if len(above_low) == 0 or len(above_high) == 0:
            return None
        return int(self.steps[above_low[0]]), int(self.steps[above_high[0]])


@torch.no_grad()
def continue_from_step(
    model: DiffusionModel, trajectory: Trajectory, step: int, num_samples: int, seed: int = 0, batch: int = 64
) -> torch.Tensor:
    """Samples of p(. | x_t) at ``step``: (num_samples, C, H, W) in [-1, 1].

    Text-conditional models continue with the trajectory's prompt and guidance;
    latent models return decoded (pixel) samples.
    """
    n = trajectory.num_steps
    sampler = StepSampler(model, SamplingConfig(num_inference_steps=n, scheduler="ddim", eta=1.0))
    if not torch.equal(sampler.timesteps.long(), trajectory.timesteps):
        raise ValueError("the trajectory's timesteps do not match a DDIM schedule of the same length")
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    cond, uncond = trajectory.cond, trajectory.uncond
    if model.is_conditional and cond is None:
        cond = model.encode_prompts([trajectory.prompt or ""])
    scale = trajectory.config.guidance_scale
    out = []
    for start in range(0, num_samples, batch):
        b = min(batch, num_samples - start)
        x = trajectory.x_t[step][None].expand(b, -1, -1, -1).to(model.device)
        for s in range(step, n):
            t = sampler.timesteps[s]
            pred = guided_prediction(model, x, t.reshape(1).expand(b).to(model.device), cond, uncond, scale)
            x = sampler.step(pred, s, x, gen)
        out.append((model.decode(x) if model.is_latent else x.clamp(-1, 1)).cpu())
    return torch.cat(out)


def likelihood_curves(
    model: DiffusionModel,
    trajectory: Trajectory,
    classify: Callable[[torch.Tensor], torch.Tensor],
    steps: Sequence[int] | None = None,
    num_samples: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> LikelihoodCurves:
    """Class likelihood curves; ``classify`` maps (B, C, H, W) images to (B, num_classes) probabilities."""
    steps = list(range(trajectory.num_steps)) if steps is None else [int(s) for s in steps]
    probs = []
    for i, s in enumerate(steps):
        samples = continue_from_step(model, trajectory, s, num_samples, seed)
        with torch.no_grad():
            probs.append(classify(samples).float().mean(0).numpy())
        if progress:
            progress(i + 1, len(steps))
    return LikelihoodCurves(
        steps=np.asarray(steps),
        timesteps=trajectory.timesteps[steps].numpy(),
        probs=np.stack(probs),
        num_samples=num_samples,
    )


def label_curves(
    model: DiffusionModel,
    trajectory: Trajectory,
    clip: ClipLabeler,
    labels: Sequence[str],
    steps: Sequence[int] | None = None,
    num_samples: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
) -> LikelihoodCurves:
    """Likelihood curves of free-text ``labels`` under CLIP: probs (S, L), each row sums to 1.

    The probability of label j at step s is the mean over samples x ~ p(. | x_t) of
    softmax_j(CLIP logits of x against all labels), so the labels compete with each other.
    """
    labels = check_labels(labels)
    return likelihood_curves(model, trajectory, lambda x: clip.label_probs(x, labels), steps, num_samples, seed, progress)
