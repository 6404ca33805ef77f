"""Diffusion models and the other networks the core uses: the model adapter (pixel and latent), LoRA, loading, training, the digit classifier and CLIP.

The names below load their submodule on first use (PEP 562): importing one light
submodule, e.g. ``attribution.models.base``, does not import diffusers through the others.
"""

from __future__ import annotations

from ..lazy import lazy_exports

#: exported name -> the submodule that defines it
_EXPORTS = {
    "ARCHITECTURE": "classifier",
    "CLASSIFIER_DIR": "classifier",
    "CLIP_MEAN": "clip",
    "CLIP_STD": "clip",
    "CONFIG_NAME": "classifier",
    "ClipLabeler": "clip",
    "DEFAULT_BATCH_SIZE": "classifier",
    "DEFAULT_EPOCHS": "classifier",
    "DEFAULT_LR": "classifier",
    "DIFFUSERS_LORA_WEIGHTS": "lora",
    "Conditioning": "conditioning",
    "DiTModel": "dit",
    "DiffusionModel": "base",
    "DiffusionObjective": "objective",
    "DigitClassifier": "classifier",
    "FluxModel": "flux",
    "FORMAT_VERSION": "classifier",
    "LORA_TARGETS": "lora",
    "LatentDiffusionModel": "latent",
    "MAX_SHIFT": "classifier",
    "METRICS_NAME": "classifier",
    "ModelLoadError": "base",
    "SDXLModel": "sdxl",
    "SUPPORTED_PIPELINES": "load",
    "as_conditioning": "conditioning",
    "PEFT_CONFIG": "lora",
    "PredictionType": "objective",
    "PEFT_WEIGHTS": "lora",
    "WEIGHTS_NAME": "classifier",
    "add_lora": "lora",
    "apply_lora": "lora",
    "build_classifier": "classifier",
    "check_labels": "clip",
    "count_parameters": "classifier",
    "evaluate_accuracy": "classifier",
    "hash_components": "latent",
    "hash_files": "base",
    "load_classifier": "classifier",
    "load_clip": "clip",
    "load_latent_model": "latent",
    "load_lora": "lora",
    "load_model": "load",
    "load_models": "load",
    "lora_param_filter": "lora",
    "make_training_scheduler": "objective",
    "make_unet": "training",
    "module_param_filter": "lora",
    "predict_labels": "classifier",
    "random_shift": "classifier",
    "refresh_lora_hash": "lora",
    "resolve_device": "base",
    "save_classifier": "classifier",
    "train_classifier": "classifier",
    "train_ddpm": "training",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
