"""Latent, text-conditional diffusion models (Stable-Diffusion layout); LoRA adapters: :mod:`attribution.models.lora`.

A :class:`LatentDiffusionModel` is a :class:`~attribution.models.base.DiffusionModel`
whose UNet (a ``UNet2DConditionModel``) predicts noise in the latent space of a
VAE (``AutoencoderKL``) and is conditioned on CLIP text embeddings through
``encoder_hidden_states``. The attribution core works in latent space throughout:
``image_shape`` is the latent shape (C, h, w), train images are encoded once
(deterministically, with the mean of the latent distribution, scaled by
``vae.config.scaling_factor``) and ``decode`` maps latents back to pixels for display.

Directory layout (diffusers ``StableDiffusionPipeline``, safetensors only)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors (UNet2DConditionModel)
    vae/           config.json + diffusion_pytorch_model.safetensors (AutoencoderKL)
    text_encoder/  config.json + model.safetensors (CLIPTextModel)
    tokenizer/     vocab.json + merges.txt or tokenizer.json (CLIPTokenizer)
    scheduler/     scheduler_config.json (a DDPM-family scheduler, any prediction_type of :mod:`.objective`,
                   or FlowMatchEulerDiscreteScheduler)

The checkpoint hash covers the configs and weights of every component and the
tokenizer files, so a store built with another VAE or text encoder is refused.
``transformers`` is imported only when such a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .base import DiffusionModel, ModelLoadError
from .conditioning import Conditioning, as_conditioning
from .objective import load_training_scheduler


@dataclass
class LatentDiffusionModel(DiffusionModel):
    """One checkpoint of a latent text-conditional model (see module doc).

    Attributes:
        vae: autoencoder; ``encode``/``decode`` go through it.
        text_encoder: CLIP text model or None (an unconditional latent model).
        tokenizer: its tokenizer (None with ``text_encoder``).
        vae_hash: sha256 of the VAE files; part of the latent cache key.
        components: component name (``unet``, ``vae``, ``text_encoder``, ...) -> sha256 of its files.
    """

    family: ClassVar[str] = "Stable Diffusion"

    vae: AutoencoderKL | None = None
    text_encoder: Any = None
    tokenizer: Any = None
    vae_hash: str = ""
    components: dict[str, str] = field(default_factory=dict)

    @property
    def is_latent(self) -> bool:
        return True

    @property
    def is_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the decoded images."""
        _, h, w = self.image_shape
        f = self.vae_scale_factor
        return (int(self.vae.config.in_channels), h * f, w * f)

    @property
    def _scale_shift(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None)
        return float(cfg.scaling_factor), float(shift) if shift is not None else 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w): (mean - shift) * scaling_factor."""
        if tuple(images.shape[1:]) != self.pixel_shape:
            raise ValueError(f"images have shape {tuple(images.shape[1:])}, the VAE takes {self.pixel_shape}")
        scale, shift = self._scale_shift
        out = []
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].to(self.device, torch.float32)
            out.append((self.vae.encode(x).latent_dist.mean - shift) * scale)
        return torch.cat(out) if out else torch.zeros((0, *self.image_shape), device=self.device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W), clamped to [-1, 1]."""
        scale, shift = self._scale_shift
        out = []
        for s in range(0, x.shape[0], batch_size):
            z = x[s : s + batch_size].to(self.device, torch.float32) / scale + shift
            out.append(self.vae.decode(z).sample.clamp(-1, 1))
        return torch.cat(out) if out else torch.zeros((0, *self.pixel_shape), device=self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> ``Conditioning(text=...)``: CLIP last hidden states (B, L, D), L = tokenizer.model_max_length."""
        if self.text_encoder is None:
            raise ValueError(f"{self.path} has no text encoder; it takes no prompt")
        return Conditioning(text=self.text_encoder(tokenize(self.tokenizer, prompts).to(self.device))[0].float())

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        """``{"encoder_hidden_states": cond.text}`` for conditional UNets (cond required)."""
        if not self.is_conditional:
            return DiffusionModel.unet_kwargs(self, cond)
        cond = as_conditioning(cond)
        if cond is None or cond.text is None:
            raise ValueError("a text-conditional model needs conditioning (encode_prompts([...]), '' for unconditional)")
        return {"encoder_hidden_states": cond.text}

    @property
    def component_hashes(self) -> dict[str, str]:
        return dict(self.components)

    def to(self, device: str | torch.device) -> "LatentDiffusionModel":
        """Move every network, the further text encoders of SDXL, SD3 and FLUX (``text_encoder_2``, ``_3``) too."""
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            m = getattr(self, name, None)
            if m is not None:
                m.to(device)
        return self


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(B, L) token ids, padded and truncated to ``tokenizer.model_max_length``."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def tokenizer_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def component_hashes(root: Path, parts: dict[str, list[Path]]) -> dict[str, str]:
    """component name -> :func:`hash_components` of its files."""
    return {name: hash_components(root, files) for name, files in parts.items()}


def pipeline_hashes(path: Path, sched_dir: Path, names: Sequence[str]) -> dict[str, Any]:
    """``checkpoint_hash``, ``vae_hash`` and ``components`` (keyword arguments of a family's model) of a
    pipeline directory whose components ``names`` are subfolders of ``path`` (tokenizers: every file;
    the scheduler: its config; models: config and safetensors)."""
    parts = {name: (tokenizer_files(path / name) if name.startswith("tokenizer") else
                    [sched_dir / "scheduler_config.json"] if name == "scheduler" else _weight_files(path / name))
             for name in names}
    return {"checkpoint_hash": hash_components(path, [p for files in parts.values() for p in files]),
            "vae_hash": hash_components(path, parts["vae"]), "components": component_hashes(path, parts)}


def _weight_files(d: Path) -> list[Path]:
    """config.json plus the non-variant safetensors files (and shard index) of a component dir."""
    files = [d / "config.json"]
    files += sorted(p for p in d.glob("*.safetensors") if p.name.count(".") == 1)
    files += sorted(d.glob("*.safetensors.index.json"))
    return files


def hash_components(root: Path, files: list[Path]) -> str:
    """sha256 over (path relative to ``root``, contents) of ``files``, in sorted path order."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def pipeline_dirs(path: Path, pipeline: str, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Path]:
    """name -> ``path / name`` for a pipeline's component subfolders ``names`` (required) and ``optional``;
    refuses missing required ones, and model components (not tokenizers or the scheduler) present without
    config.json and safetensors weights."""
    dirs = {name: path / name for name in (*names, *optional)}
    missing = [name for name in names if not dirs[name].is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is a {pipeline} without {', '.join(missing)}/")
    for name, d in dirs.items():
        if not name.startswith("tokenizer") and name != "scheduler" and d.is_dir():
            _require_safetensors(d, name)
    return dirs


@contextmanager
def loading_errors(path: Path, what: str) -> Iterator[None]:
    """Turn the errors of loading ``what`` (e.g. "an SD3 pipeline") from ``path`` into one-line ModelLoadErrors."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        yield
    except ImportError as e:
        raise ModelLoadError(f"loading {path} needs the optional package transformers: {e}") from e
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"could not load {what} from {path}: {e}") from e


def from_dir(cls: Any, d: Path) -> Any:
    """``cls.from_pretrained(d)`` of a model component: safetensors weights from the local directory only."""
    return cls.from_pretrained(d, use_safetensors=True, local_files_only=True)


def _require_safetensors(d: Path, what: str) -> None:
    if not (d / "config.json").exists():
        raise ModelLoadError(f"{d} has no config.json: not a diffusers {what} directory")
    if len(_weight_files(d)) < 2:
        raise ModelLoadError(f"{d} has no .safetensors weights; only safetensors weights are loaded ({what})")


def load_latent_model(path: Path, unet_dir: Path, sched_dir: Path, device: str | torch.device = "cpu") -> LatentDiffusionModel:
    """Load a ``StableDiffusionPipeline``-layout directory (see module doc)."""
    vae_dir, te_dir, tok_dir = path / "vae", path / "text_encoder", path / "tokenizer"
    if not vae_dir.is_dir():
        raise ModelLoadError(f"{path} has a conditional UNet but no vae/ directory; only latent pipelines are supported")
    _require_safetensors(vae_dir, "AutoencoderKL")
    conditional = te_dir.is_dir()
    if conditional:
        _require_safetensors(te_dir, "text encoder")
        if not tok_dir.is_dir():
            raise ModelLoadError(f"{path} has text_encoder/ but no tokenizer/")
    try:
        unet_cls = UNet2DConditionModel if conditional else _unconditional_unet_cls(unet_dir)
        unet = unet_cls.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True)
        scheduler = load_training_scheduler(sched_dir)
        text_encoder = tokenizer = None
        if conditional:
            from transformers import CLIPTextModel, CLIPTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            text_encoder = CLIPTextModel.from_pretrained(te_dir, use_safetensors=True, local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except ImportError as e:
        raise ModelLoadError(f"loading {path} needs the optional packages transformers and peft: {e}") from e
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"could not load a latent diffusers pipeline from {path}: {e}") from e
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.eval().requires_grad_(False).to(device)
    parts = {"unet": _weight_files(unet_dir), "vae": _weight_files(vae_dir), "scheduler": [sched_dir / "scheduler_config.json"]}
    if conditional:
        parts.update(text_encoder=_weight_files(te_dir), tokenizer=tokenizer_files(tok_dir))
    return LatentDiffusionModel(
        unet=unet,
        scheduler=scheduler,
        path=path,
        checkpoint_hash=hash_components(path, [p for files in parts.values() for p in files]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae_hash=hash_components(path, parts["vae"]),
        components=component_hashes(path, parts),
    )


def _unconditional_unet_cls(unet_dir: Path) -> type:
    name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ModelLoadError(f"{unet_dir} holds a {name} but the pipeline has no text_encoder/")
    from diffusers import UNet2DModel

    return UNet2DModel
