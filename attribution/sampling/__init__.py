"""Sampling that records trajectories, DDIM inversion of uploads, feature-likelihood curves."""

from .inversion import (
    invert_image,
)
from .likelihood import (
    LikelihoodCurves,
    continue_from_step,
    label_curves,
    likelihood_curves,
)
from .trajectory import (
    Trajectory,
    ddim_preimage,
    decode_trajectory,
    guided_eps,
    make_scheduler,
    one_step_prediction,
    prompt_embeddings,
    sample_trajectory,
)

__all__ = [
    "LikelihoodCurves",
    "Trajectory",
    "continue_from_step",
    "ddim_preimage",
    "decode_trajectory",
    "guided_eps",
    "invert_image",
    "label_curves",
    "likelihood_curves",
    "make_scheduler",
    "one_step_prediction",
    "prompt_embeddings",
    "sample_trajectory",
]
