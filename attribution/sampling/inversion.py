"""Inversion by the deterministic sampler's ODE: a trajectory for an uploaded image.

Uploaded images have no trajectory; :func:`invert_image` builds one by inverting the
model family's deterministic sampler (:mod:`attribution.sampling.steps`): DDIM with
eta = 0 for the DDPM family (epsilon, v and sample prediction, with e the noise eps_hat
the prediction implies), the flow Euler step for flow matching, whose preimage is
x_sigma = x_{sigma_prev} + (sigma - sigma_prev) v_theta(x_sigma, sigma) (Euler backwards).
Starting from the image, each step looks for the x_t from which the sampler step lands
on the state before it; for DDIM:

    x_{t_prev} = sqrt(abar_prev) x0_hat(x_t) + sqrt(1 - abar_prev) eps_theta(x_t, t),
    i.e. x_t = sqrt(abar_t) (x_{t_prev} - sqrt(1 - abar_prev) e) / sqrt(abar_prev) + sqrt(1 - abar_t) e
    with e = eps_theta(x_t, t).

Plain DDIM inversion takes e = eps_theta(x_{t_prev}, t_prev) once (the usual
approximation eps(x_t) ~ eps(x_{t_prev})); we start there and refine e by
``refine_iters`` fixed-point iterations e <- eps_theta(x_t, t) (for flow the same with
v_theta in place of e). Why it matters:
the Eq. 3 queries of the late steps are taken at x0_hat(x_t), and the loss gradient
at small t is so sensitive to fine detail that the plain inversion's x0_hat
(max |x0_hat - image| ~ 0.12-0.16 at t = 20 on the bundled digits) no longer looks
like the upload to the model; five iterations bring it to ~0.05 (see
``benchmarks/self_attribution.py``). The recorded trajectory is the inversion path
read from noisy to clean, with eps and x0_hat recomputed at each x_t by the objective's
formulas; its final sample is the uploaded image itself.

Sample-prediction models are inverted the same way, but the refinement does not converge
at the cleanest steps: there eps_hat = (x_t - sqrt(abar_t) x0_theta) / sqrt(1 - abar_t)
amplifies any change of x_t by 1 / sqrt(1 - abar_t), and the last sampler step lands on
x0_theta(x_t) whatever eps_hat is, so the fixed-point map is no contraction. Their
trajectories are as good as plain DDIM inversion at those steps.

Latent text-conditional models: the inversion runs in latent space and uses the
conditional branch only (no guidance; a guidance-distilled model, FLUX-dev, takes the guidance
embedding its training loss is attributed with); the trajectory keeps pixel decodings for display.
"""

from __future__ import annotations

import torch

from ..config import INVERSION_REFINE_ITERS, SamplingConfig
from ..models.base import DiffusionModel
from .steps import StepSampler, ddim_preimage, flow_preimage
from .trajectory import Progress, Trajectory, decode_trajectory, guided_prediction, prompt_embeddings


@torch.no_grad()
def invert_image(
    model: DiffusionModel,
    image: torch.Tensor,
    num_inference_steps: int = 50,
    progress: Progress | None = None,
    prompt: str = "",
    refine_iters: int = INVERSION_REFINE_ITERS,
) -> Trajectory:
    """Build a trajectory for an image by inverting the deterministic sampler (see module doc).

    Args:
        image: (C, H, W) in [-1, 1] at the model's (pixel) size.
        prompt: text-conditional models: the prompt the inversion and queries are
            conditioned on (``""``: unconditional).
        refine_iters: fixed-point iterations per step (0: plain inversion);
            each costs one more model evaluation per step.
    """
    if refine_iters < 0:
        raise ValueError("refine_iters must be >= 0")
    if tuple(image.shape) != model.pixel_shape:
        raise ValueError(f"image has shape {tuple(image.shape)}, the model takes {model.pixel_shape}")
    # no classifier-free guidance; a guidance-distilled model (FLUX-dev) at its training-loss guidance value
    scale = model.objective.train_guidance if model.guidance_kind == "embedded" else 1.0
    config = SamplingConfig(
        num_inference_steps=num_inference_steps, scheduler="ddim", seed=-1, prompt=prompt, guidance_scale=scale
    )
    sampler = StepSampler(model, config)
    objective = model.objective
    device = model.device
    ts_clean_first = sampler.timesteps.flip(0).long()  # ascending
    cond, _ = prompt_embeddings(model, config)

    def direction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the preimage holds fixed: eps_hat (DDPM family) or the velocity v_theta (flow)."""
        pred = guided_prediction(model, x, t, cond)
        if objective.kind.is_flow:
            return pred
        a, b = objective.coefficients(t)
        return objective.eps_hat(x, pred, a, b)

    def preimage(x_prev: torch.Tensor, d: torch.Tensor, level_prev: torch.Tensor, level_t: torch.Tensor) -> torch.Tensor:
        return flow_preimage(x_prev, d, level_prev, level_t) if objective.kind.is_flow else ddim_preimage(x_prev, d, level_prev, level_t)

    clean = model.encode(image[None].to(device))  # (1, C, h, w) latent, or the image itself
    x = clean
    levels = objective.table.to(device)  # abar_t (DDPM family) or sigma_t (flow)
    # The sampler's last step lands on x0_hat itself (abar = final_alpha_cumprod, 1 by default; sigma = 0).
    level_prev = torch.as_tensor(sampler.final_level, dtype=levels.dtype, device=device)
    prev_t = torch.zeros((), dtype=torch.long)
    path = []
    for i, t in enumerate(ts_clean_first):
        d = direction(x, prev_t.reshape(1).to(device))  # plain inversion's guess
        x_t = preimage(x, d, level_prev, levels[t])
        for _ in range(refine_iters):
            x_t = preimage(x, direction(x_t, t.reshape(1).to(device)), level_prev, levels[t])
        x, level_prev, prev_t = x_t, levels[t], t
        path.append(x[0])
        if progress:
            progress(i + 1, 2 * len(ts_clean_first))
    x_t = torch.stack(path[::-1])  # noisy to clean
    timesteps = sampler.timesteps.long()
    pred = torch.cat([guided_prediction(model, x_t[s : s + 10].to(device), timesteps[s : s + 10].to(device), cond)
                      for s in range(0, len(timesteps), 10)])
    a, b = objective.coefficients(timesteps.to(device))
    eps, x0_hat = objective.eps_hat(x_t, pred, a, b), objective.x0_hat(x_t, pred, a, b)
    if progress:
        progress(2 * len(ts_clean_first), 2 * len(ts_clean_first))
    traj = Trajectory(
        timesteps=timesteps.cpu(),
        x_t=x_t.cpu(),
        eps=eps.cpu(),
        x0_hat=x0_hat.cpu(),
        sample=clean[0].cpu() if model.is_latent else image.cpu(),
        config=config,
        source="upload",
    )
    if model.is_conditional:
        traj.prompt, traj.cond = prompt, cond.cpu()
    if model.is_latent:
        traj.decoded_sample = image.cpu()
        decode_trajectory(model, traj)
    return traj
