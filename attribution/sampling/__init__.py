"""Sampling that records trajectories (DDIM / DDPM, flow Euler), inversion of uploads, feature-likelihood curves."""

from .inversion import (
    invert_image,
)
from .likelihood import (
    LikelihoodCurves,
    continue_from_step,
    label_curves,
    likelihood_curves,
)
from .steps import StepSampler, flow_preimage, flow_timesteps
from .trajectory import (
    Trajectory,
    ddim_preimage,
    decode_trajectory,
    guided_eps,
    guided_prediction,
    make_scheduler,
    one_step_prediction,
    prompt_embeddings,
    sample_trajectory,
)

__all__ = [
    "LikelihoodCurves",
    "StepSampler",
    "Trajectory",
    "continue_from_step",
    "ddim_preimage",
    "decode_trajectory",
    "flow_preimage",
    "flow_timesteps",
    "guided_eps",
    "guided_prediction",
    "invert_image",
    "label_curves",
    "likelihood_curves",
    "make_scheduler",
    "one_step_prediction",
    "prompt_embeddings",
    "sample_trajectory",
]
