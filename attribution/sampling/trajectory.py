"""Sampling that records the whole trajectory (DDIM inversion for uploads: :mod:`attribution.sampling.inversion`).

At every sampling step s (timestep t_s, from noisy to clean) we record the input
latent x_t, the noise eps_hat its prediction p implies and the one-step prediction
x0_hat of the model's training objective (:mod:`attribution.models.objective`, Section 2.2):

    epsilon:  x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
    v:        x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_theta
    sample:   x0_hat = x0_theta
    flow:     x0_hat = x_t - sigma_t v_theta

so x_t = a_t x0_hat + b_t eps_hat at every step. The step rules (DDIM / DDPM, the flow Euler
sampler) are in :mod:`attribution.sampling.steps`. Sampling is reproducible from a seed
(noise drawn on the CPU with ``torch.Generator``, then moved to the device).

Latent text-conditional models: x_t, eps and x0_hat are recorded in latent space
(that is where attribution happens) and the trajectory also keeps the prompt, its
embedding and pixel decodings of x0_hat and of the sample for display
(``decoded_x0_hat``, ``decoded_sample``; see :func:`decode_trajectory`). Sampling
uses classifier-free guidance on the prediction, p = p_uncond + s (p_cond - p_uncond), with
s = ``SamplingConfig.guidance_scale`` (only the conditional branch when s <= 1);
the recorded eps and x0_hat come from the guided p, so x0_hat is what the sampler actually
predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from ..config import SamplingConfig
from ..models.base import DiffusionModel
from ..models.conditioning import Conditioning, as_conditioning
from .steps import StepSampler, ddim_preimage, make_scheduler, one_step_prediction

__all__ = ["Trajectory", "ddim_preimage", "decode_trajectory", "guided_eps", "guided_prediction", "make_scheduler",
           "one_step_prediction", "prompt_embeddings", "sample_trajectory"]

Progress = Callable[[int, int], None]


@dataclass
class Trajectory:
    """A recorded denoising trajectory of S steps.

    Attributes:
        timesteps: (S,) int64 training timesteps t_s, noisy to clean (flow: indices of the sigma grid).
        x_t: (S, C, H, W) input of each step.
        eps: (S, C, H, W) the noise eps_hat the prediction implies (eps_theta(x_t, t) for epsilon models).
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


def guided_prediction(
    model: DiffusionModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning | torch.Tensor | None = None,
    uncond: Conditioning | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The network's prediction p of a sampling step: x (B, C, H, W), integer timesteps t (B,),
    cond/uncond of 1 or B examples -> (B, C, H, W).

    Unconditional models: p_theta(x, tau(t)). Conditional: p_theta(x, tau(t), cond), or with
    guidance (scale > 1 and ``uncond`` given) p_u + s (p_c - p_u), both in one batch.
    """
    tau = model.objective.model_timesteps(t)
    if not model.is_conditional:
        return model.prediction_at(x, t)
    b = x.shape[0]
    cond = as_conditioning(cond).to(x.device).expand(b)
    if uncond is None or guidance_scale <= 1.0:
        return model.prediction_at(x, t, cond)
    both = Conditioning.cat([as_conditioning(uncond).to(x.device).expand(b), cond])
    p_u, p_c = model.prediction_at(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return p_u + guidance_scale * (p_c - p_u)


def guided_eps(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, *guidance) -> torch.Tensor:
    """eps_hat of a sampling step: the guided prediction as a noise (itself for epsilon models).

    Arguments as :func:`guided_prediction` (``guidance``: cond, uncond, guidance_scale); (B, C, H, W).
    """
    pred = guided_prediction(model, x, t, *guidance)
    a, b = model.objective.coefficients(t)
    return model.objective.eps_hat(x, pred, a, b)


def prompt_embeddings(model: DiffusionModel, config: SamplingConfig) -> tuple[Conditioning | None, Conditioning | None]:
    """(prompt, negative-prompt or None) conditioning of one example; (None, None) for unconditional models.

    The prompt is a text for text models and a class name for class-conditional ones; the
    negative branch is the model's (SDXL: zeros for an empty one; DiT: the null class). Models
    whose guidance is an embedding (``model.guidance_kind == "embedded"``, FLUX-dev) get the
    sampling scale in ``cond.guidance`` and no negative branch (one prediction per step, as
    ``FluxPipeline``); models without guidance (FLUX-schnell) get no negative branch either.
    """
    if not model.is_conditional:
        return None, None
    cond = model.encode_prompts([config.prompt])
    kind = model.guidance_kind
    if kind == "embedded":
        return cond.with_guidance(config.guidance_scale), None
    if kind == "none":
        return cond, None
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
            upload's; with DDIM and eta 0, or the flow Euler sampler, no other noise is drawn).
        prompt, guidance_scale: override ``config.prompt`` / ``config.guidance_scale``
            (text-conditional models; the trajectory's config records the values used).
        decode: latent models: also decode x0_hat of every step for display.
    """
    if prompt is not None:
        config = replace(config, prompt=prompt)
    if guidance_scale is not None:
        config = replace(config, guidance_scale=guidance_scale)
    device = model.device
    sampler = StepSampler(model, config)
    objective = model.objective
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn((1, *model.image_shape), generator=gen).to(device)
    if initial is not None:
        x = initial.reshape(1, *model.image_shape).to(device=device, dtype=x.dtype)
    cond, uncond = prompt_embeddings(model, config)
    xs, epss, x0s = [], [], []
    for s, t in enumerate(sampler.timesteps):
        t_batch = t.reshape(1).to(device)
        pred = guided_prediction(model, x, t_batch, cond, uncond, config.guidance_scale)
        a, b = objective.coefficients(t_batch)
        xs.append(x[0].cpu())
        epss.append(objective.eps_hat(x, pred, a, b)[0].cpu())
        x0s.append(objective.x0_hat(x, pred, a, b)[0].cpu())
        # A CPU generator makes diffusers draw step noise on the CPU: same samples on any device.
        x = sampler.step(pred, s, x, gen)
        if progress:
            progress(s + 1, len(sampler.timesteps))
    traj = Trajectory(
        timesteps=sampler.timesteps.clone().long().cpu(),
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
