"""Sampling that records the whole trajectory (DDIM inversion for uploads: :mod:`attribution.sampling.inversion`).

At every sampling step s (timestep t_s, from noisy to clean) we record the input
latent x_t, the predicted noise eps = eps_theta(x_t, t) and the one-step prediction

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)          (Section 2.2)

computed with the training schedule's abar_t. Sampling is reproducible from a seed
(noise drawn on the CPU with ``torch.Generator``, then moved to the device).

Latent text-conditional models: x_t, eps and x0_hat are recorded in latent space
(that is where attribution happens) and the trajectory also keeps the prompt, its
embedding and pixel decodings of x0_hat and of the sample for display
(``decoded_x0_hat``, ``decoded_sample``; see :func:`decode_trajectory`). Sampling
uses classifier-free guidance, eps = eps_uncond + s (eps_cond - eps_uncond), with
s = ``SamplingConfig.guidance_scale`` (only the conditional branch when s <= 1);
the recorded eps is the guided one, so x0_hat is what the sampler actually
predicted. 
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..config import SamplingConfig
from ..models.base import DiffusionModel
from ..models.conditioning import Conditioning, as_conditioning

Progress = Callable[[int, int], None]


@dataclass
class Trajectory:
    """A recorded denoising trajectory of S steps.

    Attributes:
        timesteps: (S,) int64 training timesteps t_s, noisy to clean.
        x_t: (S, C, H, W) input of each step.
        eps: (S, C, H, W) eps_theta(x_t, t).
        x0_hat: (S, C, H, W) one-step prediction of the clean image.
        sample: (C, H, W) the final image (the final latent for latent models).
        config: how it was made (``None`` fields for uploads).
        source: ``"generated"`` or ``"upload"``.
        prompt: the prompt of a text-conditional model (None otherwise); queries are
            conditioned on it.
        cond: its :class:`~attribution.models.conditioning.Conditioning` (one example) under the
            sampling model, or None.
        uncond: the negative prompt's (guidance), or None.
        decoded_x0_hat: latent models: (S, 3, H, W) VAE decodings of x0_hat in [-1, 1].
        decoded_sample: latent models: (3, H, W) decoding of the sample.
    """

    timesteps: torch.Tensor
    x_t: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor
    sample: torch.Tensor
    config: SamplingConfig
    source: str = "generated"
    prompt: str | None = None
    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    decoded_x0_hat: torch.Tensor | None = None
    decoded_sample: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def display_x0_hat(self) -> torch.Tensor:
        """(S, C, H, W) x0_hat in pixel space, for display (decoded for latent models)."""
        return self.decoded_x0_hat if self.decoded_x0_hat is not None else self.x0_hat

    @property
    def display_x_t(self) -> torch.Tensor:
        """(S, C', H', W') x_t for display: the image for pixel models; for latent models the
        latent itself (what the UNet sees), its first three channels halved into [-1, 1]
        (scaled SD-style latents have about unit variance; no VAE decode per step)."""
        if self.decoded_x0_hat is None:
            return self.x_t
        return self.x_t[:, :3] / 2

    @property
    def display_sample(self) -> torch.Tensor:
        """(C, H, W) the sample in pixel space, for display."""
        return self.decoded_sample if self.decoded_sample is not None else self.sample

    def to_numpy(self) -> dict[str, np.ndarray]:
        out = {
            "timesteps": self.timesteps.numpy(),
            "x_t": self.x_t.numpy(),
            "eps": self.eps.numpy(),
            "x0_hat": self.x0_hat.numpy(),
            "sample": self.sample.numpy(),
        }
        if self.decoded_x0_hat is not None:
            out["decoded_x0_hat"] = self.decoded_x0_hat.numpy()
        if self.decoded_sample is not None:
            out["decoded_sample"] = self.decoded_sample.numpy()
        return out


def make_scheduler(model: DiffusionModel, config: SamplingConfig) -> DDIMScheduler | DDPMScheduler:
    """A fresh sampling scheduler sharing the model's training noise schedule."""
    cls = DDIMScheduler if config.scheduler == "ddim" else DDPMScheduler
    sched = cls.from_config(model.scheduler.config)
    sched.set_timesteps(config.num_inference_steps)
    return sched


def one_step_prediction(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar); abar broadcastable to x_t."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def ddim_preimage(x_prev: torch.Tensor, eps: torch.Tensor, abar_prev: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The x_t from which a deterministic DDIM step with noise prediction ``eps`` lands on ``x_prev``:
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with x0 = one_step_prediction(x_prev, eps, abar_prev)."""
    return abar_t.sqrt() * one_step_prediction(x_prev, eps, abar_prev) + (1 - abar_t).sqrt() * eps


def guided_eps(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning | torch.Tensor | None = None,
    uncond: Conditioning | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """eps of a sampling step: x (B, C, H, W), t (B,), cond/uncond of 1 or B examples -> (B, C, H, W).

    Unconditional models: eps_theta(x, t). Conditional: eps_theta(x, t, cond), or with
    guidance (scale > 1 and ``uncond`` given) eps_u + s (eps_c - eps_u), both in one batch.
    """
    if not model.is_conditional:
        return model.eps(x, t)
    b = x.shape[0]
    cond = as_conditioning(cond).to(x.device).expand(b)
    if uncond is None or guidance_scale <= 1.0:
        return model.eps(x, t, cond)
    both = Conditioning.cat([as_conditioning(uncond).to(x.device).expand(b), cond])
    eps_u, eps_c = model.eps(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def prompt_embeddings(model: DiffusionModel, config: SamplingConfig) -> tuple[Conditioning | None, Conditioning | None]:
    """(prompt, negative-prompt or None) conditioning of one example; (None, None) for unconditional models.

    The prompt is a text for text models and a class name for class-conditional ones; the
    negative branch is the model's (SDXL: zeros for an empty one; DiT: the null class).
    """
    if not model.is_conditional:
        return None, None
    cond = model.encode_prompts([config.prompt])
    uncond = model.negative_conditioning(config.negative_prompt) if config.guidance_scale > 1.0 else None
    return cond, uncond


@torch.no_grad()
def decode_trajectory(model: DiffusionModel, traj: Trajectory, batch_size: int = 8) -> Trajectory:
    """Fill ``decoded_x0_hat`` (S, 3, H, W) and ``decoded_sample`` of a latent model's trajectory (in place)."""
    if not model.is_latent:
        return traj
    traj.decoded_x0_hat = model.decode(traj.x0_hat, batch_size).cpu()
    if traj.decoded_sample is None:
        traj.decoded_sample = model.decode(traj.sample[None])[0].cpu()
    return traj


@torch.no_grad()
def sample_trajectory(
    model: DiffusionModel,
    config: SamplingConfig = SamplingConfig(),
    progress: Progress | None = None,
    *,
    prompt: str | None = None,
    guidance_scale: float | None = None,
    decode: bool = True,
    initial: torch.Tensor | None = None,
) -> Trajectory:
    """Generate one sample from ``config.seed`` and record every step.

    Args:
        initial: (C, H, W) x_T to start from instead of the seed's noise (an inverted
            upload's; with DDIM and eta 0 no other noise is drawn).
        prompt, guidance_scale: override ``config.prompt`` / ``config.guidance_scale``
            (text-conditional models; the trajectory's config records the values used).
        decode: latent models: also decode x0_hat of every step for display.
    """
    if prompt is not None:
        config = replace(config, prompt=prompt)
    if guidance_scale is not None:
        config = replace(config, guidance_scale=guidance_scale)
    device = model.device
    sched = make_scheduler(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((1, *model.image_shape), generator=gen).to(device)
    if initial is not None:
        x = initial.reshape(1, *model.image_shape).to(device=device, dtype=x.dtype)
    abar = model.alphas_cumprod
    cond, uncond = prompt_embeddings(model, config)
    xs, epss, x0s = [], [], []
    kwargs = {"eta": config.eta} if config.scheduler == "ddim" else {}
    for s, t in enumerate(sched.timesteps):
        t_batch = t.reshape(1).to(device)
        eps = guided_eps(model, x, t_batch, cond, uncond, config.guidance_scale)
        xs.append(x[0].cpu())
        epss.append(eps[0].cpu())
        x0s.append(one_step_prediction(x, eps, abar[t_batch].reshape(-1, 1, 1, 1))[0].cpu())
        # A CPU generator makes diffusers draw step noise on the CPU: same samples on any device.
        x = sched.step(eps, t, x, generator=gen, **kwargs).prev_sample
        if progress:
            progress(s + 1, len(sched.timesteps))
    traj = Trajectory(
        timesteps=sched.timesteps.clone().long().cpu(),
        x_t=torch.stack(xs),
        eps=torch.stack(epss),
        x0_hat=torch.stack(x0s),
        sample=(x[0] if model.is_latent else x[0].clamp(-1, 1)).cpu(),
        config=config,
    )
    if model.is_conditional:
        traj.prompt, traj.cond = config.prompt, cond.cpu()
        traj.uncond = uncond.cpu() if uncond is not None else None
    if model.is_latent and decode:
        decode_trajectory(model, traj)
    return traj
