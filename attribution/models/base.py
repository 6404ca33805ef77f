"""Load diffusers models from local directories: pixel-space and latent text-conditional.

A :class:`DiffusionModel` bundles what the attribution core needs of a
checkpoint: the network (a ``UNet2DModel``), its training objective (epsilon, v or
sample prediction on a DDPM schedule, or flow matching: :mod:`attribution.models.objective`)
and a content hash that identifies the
checkpoint in store manifests. Weights load through diffusers
``from_pretrained(..., use_safetensors=True)`` from a local directory only: no hub
access, no pickle.

Accepted layouts:
  * a ``DDPMPipeline``/``DDIMPipeline`` directory: ``model_index.json``,
    ``unet/`` and ``scheduler/``;
  * a bare UNet directory (``config.json`` + ``diffusion_pytorch_model.safetensors``)
    with ``scheduler_config.json`` beside it or in ``../scheduler``;
  * a ``StableDiffusionPipeline`` directory (``unet/`` holding a
    ``UNet2DConditionModel``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``): loaded as a :class:`~attribution.models.latent.LatentDiffusionModel`,
    whose ``image_shape`` is the *latent* shape and which adds ``encode``/``decode``
    and ``encode_prompts`` (see :mod:`attribution.models.latent`).

Every model has ``is_latent``, ``is_conditional``, ``pixel_shape``, ``encode``,
``decode``, ``encode_prompts`` (-> :class:`~attribution.models.conditioning.Conditioning`)
and ``predict``; for pixel models encode/decode are the identity and there is no
conditioning. SDXL and DiT pipelines: :mod:`attribution.models.sdxl`, :mod:`attribution.models.dit`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Sequence

import torch
from torch.func import functional_call

from .conditioning import Conditioning

from .objective import DiffusionObjective

if TYPE_CHECKING:  # annotations only: importing diffusers takes seconds, which every CLI error would wait for
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or not a supported diffusers layout."""


#: How sampling takes a guidance scale (:attr:`DiffusionModel.guidance_kind`).
GuidanceKind = Literal["cfg", "embedded", "none"]
#: The last unshifted sigma of a flow family's sampling grid (:attr:`DiffusionModel.flow_sampling_end`).
FlowSamplingEnd = Literal["1/T", "1/S"]

@dataclass
class DiffusionModel:
    """One checkpoint of a pixel-space diffusion model.

    Attributes:
        unet: the denoiser (a UNet, or DiT's transformer); ``unet(x_t, objective.model_timesteps(t)).sample``
            holds the prediction of ``x_t`` (B, C, H, W) (:meth:`prediction` takes it out), of what ``objective``
            says (noise, v, the clean sample or the flow velocity).
        scheduler: the training scheduler (``DDPMScheduler`` or ``FlowMatchEulerDiscreteScheduler``).
        path: directory it was loaded from.
        checkpoint_hash: sha256 over the weights and the configs.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    path: Path
    checkpoint_hash: str

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model works on."""
        cfg = self.unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @cached_property
    def objective(self) -> DiffusionObjective:
        """The training objective and noise schedule, read from the scheduler config (:mod:`.objective`)."""
        return DiffusionObjective.from_scheduler(self.scheduler)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 on the model's device: alpha-bar_t of a DDPM-family training schedule."""
        return self.objective.alphas_cumprod.to(device=self.device, dtype=torch.float32)

    @property
    def is_latent(self) -> bool:
        """True when the UNet works on VAE latents (then ``image_shape`` is the latent shape)."""
        return False

    @property
    def is_conditional(self) -> bool:
        """True when the denoiser takes conditioning (a prompt, or a class for class-conditional models)."""
        return False

    #: The family in words (the app's description) and the guidance scale its diffusers pipeline defaults to.
    family: ClassVar[str] = "DDPM"
    default_guidance_scale: ClassVar[float] = 7.5
    #: Flow models: the last unshifted sigma of the family's sampling grid, "1/T" (diffusers' ``set_timesteps``)
    #: or "1/S" (``FluxPipeline``); see :func:`attribution.sampling.steps.flow_timesteps`.
    flow_sampling_end: ClassVar[FlowSamplingEnd] = "1/T"

    @property
    def guidance_kind(self) -> GuidanceKind:
        """How sampling takes a guidance scale: ``"cfg"`` (classifier-free: an unconditional and a conditional
        prediction per step, in one batch), ``"embedded"`` (guidance-distilled, FLUX-dev: the scale is an input of
        the network, one prediction per step) or ``"none"`` (unconditional models; FLUX-schnell)."""
        return "cfg" if self.is_conditional else "none"

    @property
    def is_class_conditional(self) -> bool:
        """True when the conditioning is a class label (DiT): prompts are class names."""
        return False

    @property
    def class_names(self) -> list[str] | None:
        """Class-conditional models: the name of every class id (``id2label``), else None."""
        return None

    @property
    def component_hashes(self) -> dict[str, str]:
        """sha256 of each component (``unet``, ``text_encoder``, ...), for naming what differs; {} when only
        ``checkpoint_hash`` is known."""
        return {}

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images users see; equals ``image_shape`` for pixel models."""
        return self.image_shape

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> model space; the identity for pixel models."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images (B, C, H, W) in [-1, 1]; the identity for pixel models."""
        return x

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning of B prompts (text models) or class names (class-conditional models)."""
        raise ValueError(f"{self.path} is not a conditional model; it takes no prompt")

    def negative_conditioning(self, negative_prompt: str) -> Conditioning:
        """(1, ...) conditioning of the unconditional branch of classifier-free guidance."""
        return self.encode_prompts([negative_prompt])

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        """Extra denoiser keyword arguments for conditioning ``cond`` (none for pixel models)."""
        if cond is not None:
            raise ValueError(f"{self.path} is not a conditional model; it takes no conditioning")
        return {}

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction (B, C, H, W) within the denoiser's ``.sample`` (all of it here; DiT drops its variance half)."""
        return output

    def run_network(
        self, network: Callable[..., Any], x_t: torch.Tensor, tau: torch.Tensor, cond: Conditioning | torch.Tensor | None
    ) -> torch.Tensor:
        """The prediction (B, C, H, W) of ``network`` (the denoiser, or a call of it with swapped parameters) at
        x_t (B, C, H, W) and network timestep input tau (B,). Families whose denoiser takes other arguments
        (SD3's and FLUX's transformers) override this one method."""
        return self.prediction(network(x_t, tau, **self.unet_kwargs(cond)).sample)

    def predict(
        self,
        params: dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], ...],
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The network's prediction with its parameters replaced by ``params`` (``functional_call``):
        x_t (B, C, H, W), timesteps (B,) the network's timestep input tau(t)
        (:meth:`~attribution.models.objective.DiffusionObjective.model_timesteps`), cond of B examples
        -> (B, C, H, W). Differentiable in ``params``."""
        return self.run_network(lambda *args, **kw: functional_call(self.unet, params, args, kw), x_t, timesteps, cond)

    @torch.no_grad()
    def prediction_at(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's prediction at x_t (B, C, H, W), integer training timesteps (B,), cond of B (or 1)
        examples -> (B, C, H, W) (no parameter swap: :meth:`predict` is the differentiable one)."""
        return self.run_network(self.unet, x_t, self.objective.model_timesteps(timesteps), cond)

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise eps_hat(x_t, t[, c]) implied by the prediction: shapes as :meth:`prediction_at`."""
        pred = self.prediction_at(x_t, timesteps, cond)
        a, b = self.objective.coefficients(timesteps.to(x_t.device))
        return self.objective.eps_hat(x_t, pred, a, b)

    def to(self, device: str | torch.device) -> "DiffusionModel":
        self.unet.to(device)
        return self


def hash_files(paths: list[Path]) -> str:
    """sha256 over the names and contents of ``paths`` (order-independent)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU; ``"cuda"`` without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return dev
