"""One sampling step per model family, and the preimage of a deterministic step (for inversion).

A :class:`StepSampler` walks the S sampling timesteps of a model (integer training
timestep indices, noisy to clean) and maps the network's prediction p at x_t to the next state:

  * DDPM family (epsilon, v or sample prediction): diffusers' ``DDIMScheduler`` (eta from the
    config, 0: deterministic) or ``DDPMScheduler`` built from the model's scheduler config, which
    carries its ``prediction_type``; the deterministic DDIM step is
    x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'}) eps_hat.
  * Flow matching: the Euler step of the flow ODE over the scheduler's shifted sigma grid,
    x_{sigma'} = x_sigma + (sigma' - sigma) v_hat, the last step to sigma' = 0 (so the sample is the
    last x0_hat = x_sigma - sigma v_hat). ``scheduler="ddpm"`` (or eta > 0) re-noises instead,
    x_{sigma'} = (1 - sigma') x0_hat + sigma' z with fresh z (diffusers' ``stochastic_sampling``).
    The S timesteps are the training-grid indices nearest to diffusers' unshifted linspace(1, 1/T, S),
    t_s = round(linspace(T - 1, 0, S)), so every step sits on a training sigma (what Eq. 3 needs).
    FLUX (``model.flow_sampling_end == "1/S"``): ``FluxPipeline`` samples the unshifted linspace(1, 1/S, S)
    instead, t_s = round(linspace(T, T / S, S)) - 1: the pipeline's own sigmas whenever S divides T.

Both deterministic steps are x' = a' x0_hat + b' eps_hat with the next level's coefficients, the
DDIM form; :func:`ddim_preimage` and :func:`flow_preimage` invert them for a fixed prediction.
"""

from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..models.base import DiffusionModel, FlowSamplingEnd


def flow_timesteps(num_train_timesteps: int, num_inference_steps: int,
                   end: FlowSamplingEnd = "1/T") -> torch.Tensor:
    """(S,) int64 training-grid indices of a flow sampler, noisy to clean (see module doc); ``end``: the last
    unshifted sigma, ``"1/T"`` (diffusers' ``set_timesteps``) or ``"1/S"`` (``FluxPipeline``)."""
    T, S = num_train_timesteps, num_inference_steps
    if S > T:
        raise ValueError(f"num_inference_steps {S} exceeds the model's {T} timesteps")
    if end == "1/S":
        return (torch.linspace(T, T / S, S, dtype=torch.float64).round() - 1).long()
    return torch.linspace(T - 1, 0, S, dtype=torch.float64).round().long()


def make_scheduler(model: DiffusionModel, config: SamplingConfig):
    """A fresh diffusers sampling scheduler (DDIM or DDPM) sharing a DDPM-family model's training schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if model.objective.kind.is_flow:
        raise ValueError(f"{model.path} is a flow-matching model: it samples with the flow Euler sampler "
                         "(attribution.sampling.steps.StepSampler), not a DDPM-family scheduler")
    cls = DDIMScheduler if config.scheduler == "ddim" else DDPMScheduler
    sched = cls.from_config(model.scheduler.config)
    sched.set_timesteps(config.num_inference_steps)
    return sched


class StepSampler:
    """The sampling steps of ``model`` under ``config`` (see module doc).

    Attributes:
        timesteps: (S,) int64 training timestep indices, noisy to clean.
        final_level: abar (DDPM family: the DDIM scheduler's ``final_alpha_cumprod``) or sigma (flow: 0)
            of the state the last step lands on.
    """

    def __init__(self, model: DiffusionModel, config: SamplingConfig):
        self.objective = model.objective
        self.flow = self.objective.kind.is_flow
        if self.flow:
            self.timesteps = flow_timesteps(self.objective.num_train_timesteps, config.num_inference_steps,
                                            model.flow_sampling_end)
            self.stochastic = config.scheduler == "ddpm" or config.eta > 0
            self.final_level = 0.0
        else:
            self.scheduler = make_scheduler(model, config)
            self.timesteps = self.scheduler.timesteps
            self.kwargs = {"eta": config.eta} if config.scheduler == "ddim" else {}
            self.final_level = float(getattr(self.scheduler, "final_alpha_cumprod", 1.0))

    def level(self, s: int) -> float:
        """abar (DDPM family) or sigma (flow) of step s's input; s = S gives the final level."""
        if s >= len(self.timesteps):
            return self.final_level
        return float(self.objective.table[int(self.timesteps[s])])

    def step(self, pred: torch.Tensor, s: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The state after step s from x (B, C, H, W) and the network's prediction ``pred`` at it.

        Random draws come from the CPU ``generator``, so samples are the same on any device.
        """
        if not self.flow:
            return self.scheduler.step(pred, self.timesteps[s], x, generator=generator, **self.kwargs).prev_sample
        sigma, sigma_next = self.level(s), self.level(s + 1)
        if not self.stochastic:
            return x + (sigma_next - sigma) * pred
        z = torch.randn(x.shape, generator=generator).to(x.device)
        return (1 - sigma_next) * (x - sigma * pred) + sigma_next * z


def one_step_prediction(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar); abar broadcastable to x_t."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def ddim_preimage(x_prev: torch.Tensor, eps: torch.Tensor, abar_prev: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """The x_t from which a deterministic DDIM step with noise prediction ``eps`` lands on ``x_prev``:
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with x0 = one_step_prediction(x_prev, eps, abar_prev)."""
    return abar_t.sqrt() * one_step_prediction(x_prev, eps, abar_prev) + (1 - abar_t).sqrt() * eps


def flow_preimage(x_prev: torch.Tensor, v: torch.Tensor, sigma_prev: float, sigma_t: float) -> torch.Tensor:
    """The x_sigma from which the Euler step with velocity ``v`` lands on x_prev: x_sigma = x_prev + (sigma - sigma_prev) v."""
    return x_prev + (sigma_t - sigma_prev) * v
