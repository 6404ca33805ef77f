"""LoRA adapters and parameter subsets for the UNet (peft, as diffusers' LoRA training).

``peft`` is imported only when an adapter is added or loaded.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import torch

from .base import DiffusionModel, ModelLoadError

#: Module names LoRA targets by default (diffusers' text-to-image LoRA script).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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
    attach_adapter(model.unet, config)
    model.unet.requires_grad_(False)
    names = lora_param_filter(model.unet)
    refresh_lora_hash(model)
    return list(names)


def attach_adapter(module: torch.nn.Module, config, adapter_name: str = "default") -> None:
    """Add a peft LoRA adapter named ``adapter_name`` to a denoiser: through diffusers' ``add_adapter``
    where the model class has it (UNets), else with peft's ``inject_adapter_in_model`` (DiT's
    transformer), which wraps the same target modules and names the parameters alike."""
    if hasattr(module, "add_adapter"):
        module.add_adapter(config, adapter_name=adapter_name)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name=adapter_name)


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
#: Key prefixes of text-encoder LoRA layers: diffusers (SD, SDXL's two encoders, SD3's three) and kohya-style files.
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "te.", "te1.", "te2.", "lora_te")


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
    (``save_lora_weights`` / ``save_lora_adapter``; keys with or without the ``unet.`` or ``transformer.`` prefix),
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
    if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys):
        raise ModelLoadError(f"{file} also adapts a text encoder; only LoRA adapters of the UNet/transformer are "
                             f"supported (save the UNet's layers alone)")
    try:
        if kind == "peft":
            config = LoraConfig.from_pretrained(str(file.parent))
            state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}
            attach_adapter(unet, config)
            result = set_peft_model_state_dict(unet, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None) or []
            if unexpected:
                raise ModelLoadError(f"{file}: {len(unexpected)} LoRA weights match no UNet module, e.g. {unexpected[0]}")
        else:
            if not hasattr(unet, "load_lora_adapter"):
                raise ModelLoadError(f"{file}: diffusers-format LoRA weights are loaded for UNets only; save the "
                                     f"{type(unet).__name__} adapter as a peft directory (save_pretrained)")
            # SD/SDXL scripts save "unet."-prefixed keys, SD3/FLUX scripts "transformer."-prefixed ones
            prefix = next((p for p in ("unet", "transformer") if any(k.startswith(p + ".") for k in keys)), None)
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
