"""Load diffusers models from local directories: the dispatch over the accepted layouts.

``model_index.json``'s ``_class_name`` picks the family (:data:`SUPPORTED_PIPELINES`):
pixel-space ``DDPMPipeline``/``DDIMPipeline`` and bare-UNet directories load here as a
:class:`~attribution.models.base.DiffusionModel`; ``StableDiffusionPipeline``
directories (a ``UNet2DConditionModel`` or a ``vae/``) go to
:func:`~attribution.models.latent.load_latent_model`, ``StableDiffusionXLPipeline`` to
:mod:`attribution.models.sdxl`, ``DiTPipeline`` to :mod:`attribution.models.dit`, ``StableDiffusion3Pipeline`` to
:mod:`attribution.models.sd3`, ``FluxPipeline`` to :mod:`attribution.models.flux`. Any other pipeline class (video,
ControlNet, Kandinsky, FLUX Fill/Control/Kontext, ...) is refused, naming it.
See :mod:`attribution.models.base` for the layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DModel

from .base import DiffusionModel, ModelLoadError, hash_files
from .latent import load_latent_model
from .objective import load_training_scheduler, unsupported_reason


#: model_index.json ``_class_name`` -> family, for every pipeline the core attributes.
SUPPORTED_PIPELINES = {
    "DDPMPipeline": "pixel", "DDIMPipeline": "pixel", "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "DiTPipeline": "dit", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
}
_FLUX_VARIANT = "its transformer takes image inputs besides the noisy latents; only text-to-image FluxPipeline is implemented"
#: Pipelines refused with a reason beyond "not supported".
NOT_YET = {"FluxFillPipeline": _FLUX_VARIANT, "FluxControlPipeline": _FLUX_VARIANT, "FluxKontextPipeline": _FLUX_VARIANT}


def pipeline_family(path: Path) -> str | None:
    """The family of ``path``'s model_index.json (None without one: a bare UNet or SD-like directory).

    Raises:
        ModelLoadError: an unreadable index, or a pipeline class the core does not attribute.
    """
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{index} is unreadable: {e}") from e
    if name in SUPPORTED_PIPELINES:
        return SUPPORTED_PIPELINES[name]
    why = f" ({NOT_YET[name]})" if name in NOT_YET else ""
    raise ModelLoadError(f"{path} holds a {name}, which is not supported{why}; supported pipelines: "
                         f"{', '.join(SUPPORTED_PIPELINES)}")


def _scheduler_dir(path: Path) -> Path:
    sched_dir = path / "scheduler"
    if not (sched_dir / "scheduler_config.json").exists():
        raise ModelLoadError(f"no scheduler_config.json found for {path} (looked in {sched_dir})")
    return sched_dir


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


def check_scheduler_config(sched_dir: Path, path: Path, dynamic_shifting: bool = False) -> None:
    """Refuse, naming it, a scheduler or training objective the core does not implement.

    Implemented (:mod:`attribution.models.objective`): DDPM-family schedulers with ``prediction_type``
    epsilon, v_prediction or sample, and ``FlowMatchEulerDiscreteScheduler`` with a fixed sigma grid, or
    (``dynamic_shifting``: FLUX, whose token count fixes mu) with dynamic shifting.
    Anything else would be attributed with the wrong loss, so it is refused here.
    """
    try:
        config = json.loads((sched_dir / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{sched_dir / 'scheduler_config.json'} is unreadable: {e}") from e
    why = unsupported_reason(config, dynamic_shifting)
    if why is not None:
        raise ModelLoadError(f"{path}: {why}, so the attribution core cannot attribute it")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load one checkpoint from a local diffusers directory (see module doc for layouts)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    family = pipeline_family(path)
    if family in ("sdxl", "dit", "sd3", "flux"):
        sched_dir = _scheduler_dir(path)
        check_scheduler_config(sched_dir, path, dynamic_shifting=family == "flux")
        if family == "flux":
            from .flux import load_flux_model

            return load_flux_model(path, sched_dir, device)
        if family == "sd3":
            from .sd3 import load_sd3_model

            return load_sd3_model(path, sched_dir, device)
        if family == "sdxl":
            from .sdxl import load_sdxl_model

            return load_sdxl_model(path, sched_dir, device)
        from .dit import load_dit_model

        return load_dit_model(path, sched_dir, device)
    unet_dir, sched_dir = _resolve_dirs(path)
    check_scheduler_config(sched_dir, path)
    with open(unet_dir / "config.json") as f:
        cls_name = json.load(f).get("_class_name", "UNet2DModel")
    if cls_name == "UNet2DConditionModel" or (path / "vae").is_dir():
        return load_latent_model(path, unet_dir, sched_dir, device)
    if cls_name != "UNet2DModel":
        raise ModelLoadError(f"{unet_dir} holds a {cls_name}; only pixel-space UNet2DModel is supported here")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
        scheduler = load_training_scheduler(sched_dir)
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
        if (m.pixel_shape != ref.pixel_shape or m.is_conditional != ref.is_conditional
                or type(m) is not type(ref) or m.class_names != ref.class_names):
            raise ModelLoadError(f"{m.path} and {ref.path} are different kinds of model (family, pixel size, conditioning or classes)")
        if not m.objective.matches(ref.objective):
            raise ModelLoadError(f"{m.path} and {ref.path} use different training objectives or noise schedules "
                                 f"({m.objective.describe()} vs {ref.objective.describe()})")
    return models
