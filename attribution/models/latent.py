"""Latent, text-conditional diffusion models (Stable-Diffusion layout) and LoRA adapters.

A :class:`LatentDiffusionModel` is a :class:`~attribution.models.DiffusionModel`
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
    scheduler/     scheduler_config.json (any diffusers scheduler; read as DDPM)

The checkpoint hash covers the configs and weights of every component and the
tokenizer files, so a store built with another VAE or text encoder is refused.
``transformers`` is imported only when such a model is loaded.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from .models import DiffusionModel, ModelLoadError

#: Module names LoRA targets by default (diffusers' text-to-image LoRA script).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LatentDiffusionModel(DiffusionModel):
    """One checkpoint of a latent text-conditional model (see module doc).

    Attributes:
        vae: autoencoder; ``encode``/``decode`` go through it.
        text_encoder: CLIP text model or None (an unconditional latent model).
        tokenizer: its tokenizer (None with ``text_encoder``).
        vae_hash: sha256 of the VAE files; part of the latent cache key.
    """

    vae: AutoencoderKL | None = None
    text_encoder: Any = None
    tokenizer: Any = None
    vae_hash: str = ""

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
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden states (B, L, D), L = tokenizer.model_max_length (padded)."""
        if self.text_encoder is None:
            raise ValueError(f"{self.path} has no text encoder; it takes no prompt")
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        return self.text_encoder(tok.input_ids.to(self.device))[0].float()

    def unet_kwargs(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": cond}`` for conditional UNets (cond (B, L, D) required)."""
        if not self.is_conditional:
            return DiffusionModel.unet_kwargs(self, cond)
        if cond is None:
            raise ValueError("a text-conditional model needs conditioning (encode_prompts([...]), '' for unconditional)")
        return {"encoder_hidden_states": cond}

    def to(self, device: str | torch.device) -> "LatentDiffusionModel":
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                m.to(device)
        return self


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
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
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
    if scheduler.config.prediction_type != "epsilon":
        raise ModelLoadError(
            f"{path} predicts {scheduler.config.prediction_type!r}; only epsilon-prediction models are supported"
        )
    for m in (unet, vae, text_encoder):
        if m is not None:
            m.eval().requires_grad_(False).to(device)
    files = _weight_files(unet_dir) + _weight_files(vae_dir) + [sched_dir / "scheduler_config.json"]
    if conditional:
        files += _weight_files(te_dir) + sorted(p for p in tok_dir.iterdir() if p.is_file())
    return LatentDiffusionModel(
        unet=unet,
        scheduler=scheduler,
        path=path,
        checkpoint_hash=hash_components(path, files),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae_hash=hash_components(path, _weight_files(vae_dir)),
    )


def _unconditional_unet_cls(unet_dir: Path) -> type:
    import json

    name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ModelLoadError(f"{unet_dir} holds a {name} but the pipeline has no text_encoder/")
    from diffusers import UNet2DModel

    return UNet2DModel


# ---------------------------------------------------------------------- LoRA and parameter subsets
def add_lora(
    model: DiffusionModel,
    rank: int = 4,
    target_modules: Sequence[str] = LORA_TARGETS,
    alpha: float | None = None,
    random_init: bool = False,
) -> list[str]:
    """Add a peft LoRA adapter to ``model.unet`` (as diffusers' LoRA training does).

    The checkpoint hash is extended with the adapter's settings and weights, so a
    store built without (or with another) adapter is refused.

    Args:
        random_init: initialize both LoRA factors randomly (peft ``init_lora_weights=False``)
            instead of B = 0; useful in tests, where B = 0 makes the A gradients vanish.

    Returns:
        Names of the adapter parameters (usable as a ``param_filter``).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights=not random_init, target_modules=list(target_modules),
    )
    model.unet.add_adapter(config)
    model.unet.requires_grad_(False)
    names = lora_param_filter(model.unet)
    refresh_lora_hash(model)
    return list(names)


def _lora_settings(unet: torch.nn.Module) -> str:
    """The settings of the UNet's LoRA adapters that change its output (rank, alpha, targets)."""
    parts = []
    for name, cfg in sorted(getattr(unet, "peft_config", {}).items()):
        parts.append(f"{name}:r={cfg.r},alpha={cfg.lora_alpha},targets={sorted(cfg.target_modules or [])},"
                     f"rank_pattern={sorted(cfg.rank_pattern.items())},alpha_pattern={sorted(cfg.alpha_pattern.items())},"
                     f"rslora={cfg.use_rslora},dora={cfg.use_dora}")
    return ";".join(parts)


def refresh_lora_hash(model: DiffusionModel, tag: str = "") -> None:
    """Fold the LoRA settings and current weights of ``model.unet`` into ``model.checkpoint_hash``.

    Call it after loading or training adapter weights. The same base model with the
    same adapter (however it was made or loaded) gets the same hash.
    """
    base = getattr(model, "_base_hash", None) or model.checkpoint_hash
    model._base_hash = base  # type: ignore[attr-defined]
    h = hashlib.sha256((base + "|lora|" + _lora_settings(model.unet) + "|" + tag).encode())
    for name, p in model.unet.named_parameters():
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    model.checkpoint_hash = h.hexdigest()


def lora_param_filter(unet: torch.nn.Module) -> tuple[str, ...]:
    """Names of the LoRA parameters of ``unet`` (those containing ``"lora_"``), as a ``param_filter``.

    Equivalent, and shorter in a store manifest: ``("re:lora_",)``.
    """
    names = tuple(k for k, _ in unet.named_parameters() if "lora_" in k)
    if not names:
        raise ValueError("the UNet has no LoRA parameters; add an adapter first (add_lora)")
    return names


def module_param_filter(module_names: Sequence[str] = LORA_TARGETS) -> tuple[str, ...]:
    """A regex ``param_filter`` selecting the parameters of modules named ``module_names``.

    E.g. ``module_param_filter(("to_q", "to_k"))`` selects every attention query and
    key projection (``...attn1.to_q.weight``, ...), also under a LoRA wrapper.
    """
    alt = "|".join(re.escape(n) for n in module_names)
    return (rf"re:(^|\.)({alt})\.",)


# ---------------------------------------------------------------------- LoRA weights from disk
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _lora_weight_file(path: Path) -> tuple[Path, str]:
    """(file, ``"peft"`` or ``"diffusers"``) of a LoRA directory or file; safetensors only."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelLoadError(f"{path}: only .safetensors LoRA weights are loaded")
        kind = "peft" if (path.parent / PEFT_CONFIG).exists() and path.name == PEFT_WEIGHTS else "diffusers"
        return path, kind
    if not path.is_dir():
        raise ModelLoadError(f"LoRA weights {path} do not exist")
    if (path / PEFT_CONFIG).exists():
        if not (path / PEFT_WEIGHTS).exists():
            raise ModelLoadError(f"{path} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (only safetensors are loaded)")
        return path / PEFT_WEIGHTS, "peft"
    if (path / DIFFUSERS_LORA_WEIGHTS).exists():
        return path / DIFFUSERS_LORA_WEIGHTS, "diffusers"
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return path / found[0], "diffusers"
    raise ModelLoadError(
        f"{path} holds no LoRA weights: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} (peft) or "
        f"{DIFFUSERS_LORA_WEIGHTS} (diffusers' LoRA training scripts)"
    )


def load_lora(model: DiffusionModel, path: str | Path) -> list[str]:
    """Load trained LoRA weights into ``model.unet`` and return the adapter's parameter names.

    Accepts a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
    as ``PeftModel.save_pretrained`` writes) or diffusers' ``pytorch_lora_weights.safetensors``
    (``save_lora_weights`` / ``save_lora_adapter``; keys with or without the ``unet.`` prefix),
    given as the file or its directory. Only safetensors are read, only from disk.
    The adapter is named ``"default"``, like :func:`add_lora`'s, so the parameter names
    (and thus a store's parameter filter) match; the checkpoint hash is extended with
    its settings and weights (:func:`refresh_lora_hash`).

    Raises:
        ModelLoadError: missing/pickled weights, text-encoder LoRA, keys that match no
            UNet module, or a UNet that already has an adapter.
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    file, kind = _lora_weight_file(Path(path))
    unet = model.unet
    if getattr(unet, "peft_config", None):
        raise ModelLoadError(f"{model.path}: the UNet already has a LoRA adapter; load weights into a fresh model")
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith(("text_encoder.", "te.", "lora_te")) for k in keys):
        raise ModelLoadError(f"{file} also adapts the text encoder; only UNet LoRA adapters are supported")
    try:
        if kind == "peft":
            config = LoraConfig.from_pretrained(str(file.parent))
            state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}
            unet.add_adapter(config, adapter_name="default")
            result = set_peft_model_state_dict(unet, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None) or []
            if unexpected:
                raise ModelLoadError(f"{file}: {len(unexpected)} LoRA weights match no UNet module, e.g. {unexpected[0]}")
        else:
            prefix = "unet" if any(k.startswith("unet.") for k in keys) else None
            unet.load_lora_adapter(str(file.parent), weight_name=file.name, prefix=prefix, adapter_name="default",
                                   use_safetensors=True, local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"could not load LoRA weights from {file}: {e}") from e
    unet.requires_grad_(False)
    names = [k for k, _ in unet.named_parameters() if "lora_" in k]
    if not names:
        raise ModelLoadError(f"{file} added no LoRA parameter to the UNet (no key matched its modules)")
    # every stored tensor must have landed in the model, else the adapter is silently partial
    loaded = {k for k, _ in unet.named_parameters() if "lora_" in k}
    if len(loaded) < sum(1 for k in keys if "lora" in k and not k.endswith(".alpha")):
        raise ModelLoadError(f"{file}: only {len(loaded)} of its {len(keys)} LoRA tensors match the UNet's modules")
    refresh_lora_hash(model)
    return names


def apply_lora(models: Sequence[DiffusionModel], lora_dirs: Sequence[str | Path | None]) -> None:
    """Load LoRA weights into an ensemble: one entry per model, or a single one for all (None: no adapter)."""
    if not lora_dirs:
        return
    if len(lora_dirs) not in (1, len(models)):
        raise ModelLoadError(f"{len(lora_dirs)} LoRA directories for {len(models)} models; give one, or one per model")
    dirs = list(lora_dirs) * len(models) if len(lora_dirs) == 1 else list(lora_dirs)
    for model, d in zip(models, dirs):
        if d is not None:
            load_lora(model, d)
