"""Load diffusers models from local directories: pixel-space and latent text-conditional.

A :class:`DiffusionModel` bundles what the attribution core needs of a
checkpoint: the noise predictor ``eps_theta`` (a ``UNet2DModel``), the training
noise schedule ``alphas_cumprod`` and a content hash that identifies the
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
    ``scheduler/``): loaded as a :class:`~attribution.latent_models.LatentDiffusionModel`,
    whose ``image_shape`` is the *latent* shape and which adds ``encode``/``decode``
    and ``encode_prompts`` (see :mod:`attribution.latent_models`).

Every model has ``is_latent``, ``is_conditional``, ``pixel_shape``, ``encode``,
``decode`` and ``encode_prompts``; for pixel models encode/decode are the identity
and there is no conditioning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or not a supported diffusers layout."""


@dataclass
class DiffusionModel:
    """One checkpoint of a pixel-space diffusion model.

    Attributes:
        unet: noise predictor; ``unet(x_t, t).sample`` has the shape of ``x_t`` (B, C, H, W).
        scheduler: the training (DDPM) scheduler; its ``alphas_cumprod`` is (T,).
        path: directory it was loaded from.
        checkpoint_hash: sha256 over the weights and the configs.
    """

    unet: UNet2DModel
    scheduler: DDPMScheduler
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

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) float32 on the model's device: alpha-bar_t of the training schedule."""
        return self.scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)

    @property
    def is_latent(self) -> bool:
        """True when the UNet works on VAE latents (then ``image_shape`` is the latent shape)."""
        return False

    @property
    def is_conditional(self) -> bool:
        """True when the UNet takes text embeddings (``encoder_hidden_states``)."""
        return False

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

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D); pixel models take no conditioning."""
        raise ValueError(f"{self.path} is not a text-conditional model; it takes no prompt")

    def unet_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Extra UNet keyword arguments for conditioning ``cond`` (B, L, D) (none for pixel models)."""
        if cond is not None:
            raise ValueError(f"{self.path} is not a text-conditional model; it takes no conditioning")
        return {}

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise eps_theta(x_t, t[, c]): x_t (B, C, H, W), timesteps (B,), cond (B, L, D) -> (B, C, H, W)."""
        return self.unet(x_t, timesteps, **self.unet_kwargs(cond)).sample

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


def _resolve_dirs(path: Path) -> tuple[Path, Path]:
    """Return (unet_dir, scheduler_dir) for a pipeline or bare-UNet directory."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if (path / "unet").is_dir():
        unet_dir = path / "unet"
        sched_dir = path / "scheduler"
    else:
        unet_dir = path
        sched_dir = path if (path / "scheduler_config.json").exists() else path.parent / "scheduler"
    if not (unet_dir / "config.json").exists():
        raise ModelLoadError(f"{unet_dir} has no config.json: not a diffusers UNet directory")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").exists():
        raise ModelLoadError(
            f"{unet_dir} has no diffusion_pytorch_model.safetensors; only safetensors weights are "
            "loaded (convert .bin weights with diffusers' save_pretrained(safe_serialization=True))"
        )
    if not (sched_dir / "scheduler_config.json").exists():
        raise ModelLoadError(f"no scheduler_config.json found for {path} (looked in {sched_dir})")
    return unet_dir, sched_dir


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load one checkpoint from a local diffusers directory (see module doc for layouts)."""
    path = Path(path)
    unet_dir, sched_dir = _resolve_dirs(path)
    with open(unet_dir / "config.json") as f:
        cls_name = json.load(f).get("_class_name", "UNet2DModel")
    if cls_name == "UNet2DConditionModel" or (path / "vae").is_dir():
        from .latent_models import load_latent_model

        return load_latent_model(path, unet_dir, sched_dir, device)
    if cls_name != "UNet2DModel":
        raise ModelLoadError(f"{unet_dir} holds a {cls_name}; only pixel-space UNet2DModel is supported here")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:  # diffusers raises these for bad dirs
        raise ModelLoadError(f"could not load a diffusers model from {path}: {e}") from e
    unet.eval().requires_grad_(False).to(device)
    files = [
        unet_dir / "config.json",
        unet_dir / "diffusion_pytorch_model.safetensors",
        sched_dir / "scheduler_config.json",
    ]
    return DiffusionModel(unet=unet, scheduler=scheduler, path=path, checkpoint_hash=hash_files(files))


def load_models(paths: list[str | Path], device: str | torch.device = "cpu") -> list[DiffusionModel]:
    """Load an ensemble (M checkpoints); all must share image shape and noise schedule."""
    if not paths:
        raise ModelLoadError("no model directories given")
    models = [load_model(p, device) for p in paths]
    ref = models[0]
    for m in models[1:]:
        if m.image_shape != ref.image_shape:
            raise ModelLoadError(f"{m.path} works on {m.image_shape} images but {ref.path} on {ref.image_shape}")
        if m.pixel_shape != ref.pixel_shape or m.is_conditional != ref.is_conditional:
            raise ModelLoadError(f"{m.path} and {ref.path} are different kinds of model (pixel size or conditioning)")
        if not torch.allclose(m.scheduler.alphas_cumprod, ref.scheduler.alphas_cumprod):
            raise ModelLoadError(f"{m.path} and {ref.path} use different noise schedules")
    return models


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU; ``"cuda"`` without a GPU is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return dev
