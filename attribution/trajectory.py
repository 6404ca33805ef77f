"""Sampling that records the whole trajectory, and DDIM inversion for uploads.

At every sampling step s (timestep t_s, from noisy to clean) we record the input
latent x_t, the predicted noise eps = eps_theta(x_t, t) and the one-step prediction

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)          (Section 2.2)

computed with the training schedule's abar_t. Sampling is reproducible from a seed
(noise drawn on the CPU with ``torch.Generator``, then moved to the device).

Uploaded images have no trajectory; :func:`invert_image` builds one by
deterministic DDIM inversion (eta = 0): starting from the image, each step maps
x_{t_prev} to x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_theta(x_{t_prev}, t_prev),
the exact reverse of a DDIM step under the usual approximation
eps(x_t) ~ eps(x_{t_prev}). The recorded trajectory is the inversion path read
from noisy to clean, with eps and x0_hat recomputed at each x_t; its final
sample is the uploaded image itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .config import SamplingConfig
from .models import DiffusionModel

Progress = Callable[[int, int], None]


@dataclass
class Trajectory:
    """A recorded denoising trajectory of S steps.

    Attributes:
        timesteps: (S,) int64 training timesteps t_s, noisy to clean.
        x_t: (S, C, H, W) input of each step.
        eps: (S, C, H, W) eps_theta(x_t, t).
        x0_hat: (S, C, H, W) one-step prediction of the clean image.
        sample: (C, H, W) the final image.
        config: how it was made (``None`` fields for uploads).
        source: ``"generated"`` or ``"upload"``.
    """

    timesteps: torch.Tensor
    x_t: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor
    sample: torch.Tensor
    config: SamplingConfig
    source: str = "generated"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {
            "timesteps": self.timesteps.numpy(),
            "x_t": self.x_t.numpy(),
            "eps": self.eps.numpy(),
            "x0_hat": self.x0_hat.numpy(),
            "sample": self.sample.numpy(),
        }


def make_scheduler(model: DiffusionModel, config: SamplingConfig) -> DDIMScheduler | DDPMScheduler:
    """A fresh sampling scheduler sharing the model's training noise schedule."""
    cls = DDIMScheduler if config.scheduler == "ddim" else DDPMScheduler
    sched = cls.from_config(model.scheduler.config)
    sched.set_timesteps(config.num_inference_steps)
    return sched


def one_step_prediction(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar); abar broadcastable to x_t."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


@torch.no_grad()
def sample_trajectory(
    model: DiffusionModel, config: SamplingConfig = SamplingConfig(), progress: Progress | None = None
) -> Trajectory:
    """Generate one sample from ``config.seed`` and record every step."""
    device = model.device
    sched = make_scheduler(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((1, *model.image_shape), generator=gen).to(device)
    abar = model.alphas_cumprod
    xs, epss, x0s = [], [], []
    kwargs = {"eta": config.eta} if config.scheduler == "ddim" else {}
    for s, t in enumerate(sched.timesteps):
        t_batch = t.reshape(1).to(device)
        eps = model.unet(x, t_batch).sample
        xs.append(x[0].cpu())
        epss.append(eps[0].cpu())
        x0s.append(one_step_prediction(x, eps, abar[t_batch].reshape(-1, 1, 1, 1))[0].cpu())
        # A CPU generator makes diffusers draw step noise on the CPU: same samples on any device.
        x = sched.step(eps, t, x, generator=gen, **kwargs).prev_sample
        if progress:
            progress(s + 1, len(sched.timesteps))
    return Trajectory(
        timesteps=sched.timesteps.clone().long().cpu(),
        x_t=torch.stack(xs),
        eps=torch.stack(epss),
        x0_hat=torch.stack(x0s),
        sample=x[0].clamp(-1, 1).cpu(),
        config=config,
    )


@torch.no_grad()
def invert_image(
    model: DiffusionModel,
    image: torch.Tensor,
    num_inference_steps: int = 50,
    progress: Progress | None = None,
) -> Trajectory:
    """Build a trajectory for an image by DDIM inversion (see module doc).

    Args:
        image: (C, H, W) in [-1, 1] at the model's size.
    """
    if tuple(image.shape) != model.image_shape:
        raise ValueError(f"image has shape {tuple(image.shape)}, the model takes {model.image_shape}")
    config = SamplingConfig(num_inference_steps=num_inference_steps, scheduler="ddim", seed=-1)
    sched = make_scheduler(model, config)
    device = model.device
    abar = model.alphas_cumprod
    ts_clean_first = sched.timesteps.flip(0).long()  # ascending
    x = image[None].to(device)
    path = []
    prev_t = None
    for i, t in enumerate(ts_clean_first):
        if prev_t is not None:
            eps = model.unet(x, prev_t.reshape(1).to(device)).sample
            x0 = one_step_prediction(x, eps, abar[prev_t])
            x = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        else:
            # From the clean image to the first (smallest) timestep: forward DDIM step from t = 0.
            eps = model.unet(x, torch.zeros(1, dtype=torch.long, device=device)).sample
            x = abar[t].sqrt() * x + (1 - abar[t]).sqrt() * eps
        path.append(x[0])
        prev_t = t
        if progress:
            progress(i + 1, 2 * len(ts_clean_first))
    x_t = torch.stack(path[::-1])  # noisy to clean
    timesteps = sched.timesteps.long()
    eps = torch.cat([model.unet(x_t[s : s + 10].to(device), timesteps[s : s + 10].to(device)).sample for s in range(0, len(timesteps), 10)])
    x0_hat = one_step_prediction(x_t, eps, abar[timesteps.to(device)].reshape(-1, 1, 1, 1))
    if progress:
        progress(2 * len(ts_clean_first), 2 * len(ts_clean_first))
    return Trajectory(
        timesteps=timesteps.cpu(),
        x_t=x_t.cpu(),
        eps=eps.cpu(),
        x0_hat=x0_hat.cpu(),
        sample=image.cpu(),
        config=config,
        source="upload",
    )
