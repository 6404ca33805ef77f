"""Training objectives of diffusion models: noising, regression target and one-step predictions.

A :class:`DiffusionObjective` is read from a model's scheduler config and answers, for a
*training timestep index* t in [0, T) (larger t: noisier), what the model was trained on:

    x_t = a_t x0 + b_t eps                                   (noising)
    L(theta; x0, t, eps) = w(t) || y_t(x0, eps) - model(x_t, tau(t)) ||^2     (training loss)

  * ``epsilon``:      a = sqrt(abar_t), b = sqrt(1 - abar_t); y = eps;            x0_hat = (x_t - b p) / a;  eps_hat = p
  * ``v_prediction``: a = sqrt(abar_t), b = sqrt(1 - abar_t); y = a eps - b x0;   x0_hat = a x_t - b p;      eps_hat = b x_t + a p
  * ``sample``:       a = sqrt(abar_t), b = sqrt(1 - abar_t); y = x0;             x0_hat = p;                eps_hat = (x_t - a p) / b
  * ``flow``:         a = 1 - sigma_t,  b = sigma_t;          y = eps - x0;       x0_hat = x_t - sigma_t p;  eps_hat = x_t + (1 - sigma_t) p

(p is the model's prediction at x_t.) The DDPM family (``DDPMScheduler``, ``DDIMScheduler``
and the other schedulers of :data:`DDPM_FAMILY`) reads abar_t from the betas and the kind
from ``prediction_type``; the model's timestep input tau(t) is t itself. Flow matching
(``FlowMatchEulerDiscreteScheduler``) uses the scheduler's training grid: sigma_t =
``scheduler.sigmas[T - 1 - t]`` (its ``shift`` applied, sigma_{T-1} = 1) and
tau(t) = sigma_t T (``scheduler.timesteps``, what diffusers' pipelines pass to the network).

Dynamic (resolution-dependent) shifting (``use_dynamic_shifting=True``, FLUX): the scheduler keeps the
unshifted grid s_t = (t + 1) / T and its pipelines shift it by mu, a linear function of the image's
token count n (diffusers' ``calculate_shift``: mu = base_shift + (max_shift - base_shift)
(n - base_image_seq_len) / (max_image_seq_len - base_image_seq_len)), with the exponential time shift

    sigma_t = e^mu / (e^mu + (1 / s_t - 1))                  (``time_shift_type="exponential"``)

what ``FlowMatchEulerDiscreteScheduler.set_timesteps(mu=mu)`` applies. A model's token count is
fixed by its latent shape, so the grid, the training-loss timesteps and the sampler all use this one
shifted grid (tau(t) = sigma_t T as above); the image sequence length must be given
(:meth:`DiffusionObjective.from_scheduler`'s ``image_seq_len``). (diffusers'
``train_dreambooth_lora_flux.py`` draws its training sigmas from such a scheduler's unshifted
``sigmas``; this grid is the one FLUX's pipeline samples on.)

Loss weight: w(t) = 1 for every kind. diffusers' training scripts use the plain MSE unless
asked otherwise (``snr_gamma`` for DDPM, ``weighting_scheme`` for SD3-style flow matching);
a model trained with another weight is attributed with the unweighted loss.

Train-feature timesteps are drawn as integer indices t (uniformly, or by the featurize
settings' strata): for the DDPM family that is the DDPM training distribution, for flow
matching a uniform draw over the scheduler's sigma grid (SD3's ``weighting_scheme="none"``).

Coefficients are gathered with :meth:`DiffusionObjective.coefficients` *outside* any
``torch.func.vmap`` (indexing by a batched tensor fails inside it); the other methods are
elementwise and safe inside it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from functools import cached_property
from enum import Enum
from pathlib import Path
from typing import Any

import torch

#: Schedulers whose config is a DDPM noise schedule (betas over ``num_train_timesteps``): read as DDPM.
DDPM_FAMILY = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "DDPMParallelScheduler", "DDIMParallelScheduler",
)
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
#: FlowMatchEulerDiscreteScheduler options that change its sigma grid in ways the core does not implement
#: (their default values are accepted).
FLOW_UNSUPPORTED = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
#: The time shift of dynamic shifting that is implemented (``time_shift_type``; "linear" is refused).
DYNAMIC_SHIFT_TYPE = "exponential"


class PredictionType(str, Enum):
    """What the network predicts (its regression target)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"
    FLOW = "flow"

    @property
    def is_flow(self) -> bool:
        return self is PredictionType.FLOW


def unsupported_reason(config: dict[str, Any], dynamic_shifting: bool = False) -> str | None:
    """Why a scheduler config describes an objective the core does not implement (None: it is supported).

    ``dynamic_shifting``: the model family knows its image sequence length (FLUX), so
    ``use_dynamic_shifting=True`` with the exponential time shift is accepted (see module doc).
    """
    name = config.get("_class_name", "DDPMScheduler")
    if name == FLOW_SCHEDULER:
        for key, default in FLOW_UNSUPPORTED.items():
            if key == "use_dynamic_shifting" and dynamic_shifting:
                continue
            if config.get(key, default) not in (default, 0):
                return f"{FLOW_SCHEDULER} with {key}={config[key]!r} is not implemented (only a fixed sigma grid with `shift`)"
        if config.get("use_dynamic_shifting") and config.get("time_shift_type", DYNAMIC_SHIFT_TYPE) != DYNAMIC_SHIFT_TYPE:
            return (f"{FLOW_SCHEDULER} with time_shift_type={config['time_shift_type']!r} is not implemented "
                    f"(dynamic shifting: only {DYNAMIC_SHIFT_TYPE!r})")
        return None
    if name not in DDPM_FAMILY:
        return (f"the scheduler {name} is not implemented; supported: DDPM-family schedulers (DDPMScheduler, "
                f"DDIMScheduler, ...) with prediction_type epsilon, v_prediction or sample, and {FLOW_SCHEDULER}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        return (f"{name} has prediction_type={prediction!r}, which the core does not implement "
                f"(supported: 'epsilon', 'v_prediction', 'sample')")
    return None


def load_training_scheduler(sched_dir: Path):
    """The training scheduler saved in ``sched_dir``: a ``DDPMScheduler`` for the DDPM family (carrying its
    ``prediction_type``), a ``FlowMatchEulerDiscreteScheduler`` for flow matching."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    name = json.loads((Path(sched_dir) / "scheduler_config.json").read_text()).get("_class_name")
    cls = FlowMatchEulerDiscreteScheduler if name == FLOW_SCHEDULER else DDPMScheduler
    return cls.from_pretrained(sched_dir, local_files_only=True)


def make_training_scheduler(kind: str | PredictionType, num_train_timesteps: int, shift: float = 1.0):
    """A default training scheduler for ``kind`` (what :func:`attribution.models.training.train_ddpm` saves)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    kind = PredictionType(kind)
    if kind.is_flow:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    if kind is PredictionType.EPSILON:  # the config every existing model was saved with
        return DDPMScheduler(num_train_timesteps=num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=kind.value)


def dynamic_shift_mu(config: dict[str, Any], image_seq_len: int) -> float:
    """mu of dynamic shifting for ``image_seq_len`` image tokens: diffusers' ``calculate_shift`` with the
    scheduler config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift`` (the
    defaults FLUX's pipeline falls back on: 256, 4096, 0.5, 1.15)."""
    n0, n1 = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
    m0, m1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (m1 - m0) / (n1 - n0)
    return image_seq_len * slope + (m0 - slope * n0)


def exponential_time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma' = e^mu / (e^mu + (1 / sigma - 1)) elementwise (``time_shift_type="exponential"``); float64 inside."""
    s = sigmas.to(torch.float64)
    e = math.exp(mu)
    return (e / (e + (1 / s - 1))).to(sigmas.dtype)


def _col(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Coefficients c (...,) as (..., 1, 1, 1) against images ``like`` (..., C, H, W)."""
    return c.reshape(*c.shape, *([1] * (like.dim() - c.dim())))


@dataclass(frozen=True, eq=False)
class DiffusionObjective:
    """A model's training objective and noise schedule (see the module doc for the equations).

    Attributes:
        kind: the prediction type.
        table: (T,) float32 on the CPU: abar_t (DDPM family) or sigma_t (flow), indexed by t.
        model_time: (T,) float32 model timestep input tau(t) for flow; None for the DDPM family (tau(t) = t).
        shift: the flow scheduler's ``shift`` (1.0 for the DDPM family).
        mu: flow with dynamic shifting: the mu the grid is shifted by (None: a fixed grid).
        train_guidance: guidance-distilled models (FLUX-dev): the guidance embedding of the training loss
            (what train and query gradients are conditioned on), part of :attr:`identity`; None otherwise.
    """

    kind: PredictionType
    table: torch.Tensor
    model_time: torch.Tensor | None = None
    shift: float = 1.0
    mu: float | None = None
    train_guidance: float | None = None

    @classmethod
    def from_scheduler(cls, scheduler: Any, image_seq_len: int | None = None) -> "DiffusionObjective":
        """Read the objective of a loaded training scheduler (see :func:`load_training_scheduler`).

        ``image_seq_len``: the denoiser's image tokens (FLUX: latent h w / 4), required when the flow
        scheduler uses dynamic shifting (see module doc) and ignored otherwise.
        """
        config = dict(scheduler.config)
        config.setdefault("_class_name", type(scheduler).__name__)
        dynamic = config["_class_name"] == FLOW_SCHEDULER and bool(config.get("use_dynamic_shifting"))
        why = unsupported_reason(config, dynamic_shifting=image_seq_len is not None)
        if why is not None:
            raise ValueError(why)
        if config["_class_name"] == FLOW_SCHEDULER:
            scheduler = type(scheduler).from_config(scheduler.config)  # the training grid, whatever set_timesteps did
            T = int(scheduler.config.num_train_timesteps)
            sigmas = torch.as_tensor(scheduler.sigmas, dtype=torch.float32)[:T]
            if not dynamic:
                times = torch.as_tensor(scheduler.timesteps, dtype=torch.float32)
                return cls(PredictionType.FLOW, sigmas.flip(0).contiguous(), times.flip(0).contiguous(),
                           float(scheduler.config.shift))
            mu = dynamic_shift_mu(config, image_seq_len)
            shifted = exponential_time_shift(mu, sigmas).flip(0).contiguous()  # the init grid is unshifted here
            return cls(PredictionType.FLOW, shifted, shifted * T, 1.0, mu)
        kind = PredictionType(config.get("prediction_type", "epsilon"))
        return cls(kind, scheduler.alphas_cumprod.to(torch.float32))

    # ------------------------------------------------------------------ identity
    @property
    def num_train_timesteps(self) -> int:
        return int(self.table.shape[0])

    @cached_property
    def identity(self) -> dict[str, str]:
        """``{"kind", "schedule_sha256"}``: recorded in store manifests, compared when a store is opened."""
        h = hashlib.sha256(self.kind.value.encode())
        h.update(self.table.numpy().tobytes())
        if self.model_time is not None:
            h.update(self.model_time.numpy().tobytes())
        out = {"kind": self.kind.value, "schedule_sha256": h.hexdigest()}
        if self.train_guidance is not None:  # only for guidance-distilled models: other identities stay as they were
            out["train_guidance"] = f"{self.train_guidance:g}"
        return out

    def with_train_guidance(self, guidance: float | None) -> "DiffusionObjective":
        """The same objective whose training loss is conditioned on the guidance embedding ``guidance``."""
        return replace(self, train_guidance=None if guidance is None else float(guidance))

    def describe(self) -> str:
        """One line for messages, e.g. ``"v_prediction (DDPM schedule, T = 1000)"``."""
        if not self.kind.is_flow:
            sched = "DDPM schedule"
        elif self.mu is not None:
            sched = f"flow matching, dynamic shift mu {self.mu:.4g}"
        else:
            sched = f"flow matching, shift {self.shift:g}"
        guidance = "" if self.train_guidance is None else f", guidance embedding {self.train_guidance:g}"
        return f"{self.kind.value} ({sched}, T = {self.num_train_timesteps}{guidance})"

    def matches(self, other: "DiffusionObjective") -> bool:
        """Same kind and the same schedule (what a store records: :attr:`identity`)."""
        return self.identity == other.identity

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) abar_t of a DDPM-family objective."""
        if self.kind.is_flow:
            raise ValueError("a flow-matching model has no alphas_cumprod (it has a sigma grid: objective.table)")
        return self.table

    # ------------------------------------------------------------------ gathering (outside vmap)
    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) of x_t = a_t x0 + b_t eps, each shaped like integer ``timesteps`` and on their device."""
        v = self.table.to(timesteps.device).index_select(0, timesteps.reshape(-1)).reshape(timesteps.shape)
        if self.kind.is_flow:
            return 1 - v, v
        return v.sqrt(), (1 - v).sqrt()

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's timestep input tau(t) for integer ``timesteps`` (same shape): t, or sigma_t T for flow."""
        if self.model_time is None:
            return timesteps
        return self.model_time.to(timesteps.device).index_select(0, timesteps.reshape(-1)).reshape(timesteps.shape)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) int64 training timestep indices, uniform on [0, T) (the training distribution, see module doc)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    # ------------------------------------------------------------------ elementwise (vmap-safe)
    def noised(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x_t = a x0 + b eps; x0, eps (..., C, H, W) (broadcasting), a, b of shape ``...``."""
        return _col(a, eps) * x0 + _col(b, eps) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The regression target y_t: eps, a eps - b x0 (v), x0, or eps - x0 (flow), shaped like eps."""
        if self.kind is PredictionType.EPSILON:
            return eps
        if self.kind is PredictionType.V_PREDICTION:
            return _col(a, eps) * eps - _col(b, eps) * x0
        if self.kind is PredictionType.SAMPLE:
            return x0.expand_as(eps)
        return eps - x0

    def x0_hat(self, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One-step prediction of the clean sample from the network output ``pred`` at x_t (Section 2.2)."""
        a, b = _col(a, x_t), _col(b, x_t)
        if self.kind is PredictionType.EPSILON:
            return (x_t - b * pred) / a
        if self.kind is PredictionType.V_PREDICTION:
            return a * x_t - b * pred
        if self.kind is PredictionType.SAMPLE:
            return pred
        return x_t - b * pred

    def eps_hat(self, x_t: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The noise the prediction implies: x_t = a x0_hat + b eps_hat (used by DDIM steps and inversion)."""
        a, b = _col(a, x_t), _col(b, x_t)
        if self.kind is PredictionType.EPSILON:
            return pred
        if self.kind is PredictionType.V_PREDICTION:
            return b * x_t + a * pred
        if self.kind is PredictionType.SAMPLE:
            return (x_t - a * pred) / b
        return x_t + a * pred
