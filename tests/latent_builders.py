"""Tiny random latent text-conditional pipelines, captioned image folders and CLIP models, saved on disk.

Shared by the latent-model tests (tests/test_latent.py, tests/test_clip_curves.py)
and the app test of a latent bundle (tests/test_app_latent.py). Everything is
built from configurations here: no hub, no downloaded weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["a red square", "a blue circle", "green stripes", "a yellow cross",
            "dark noise", "bright noise", "a red circle", "blue stripes"]
TOKEN_LENGTH = 8  # tokenizer.model_max_length of the tiny tokenizers


def write_char_tokenizer(d: Path, max_length: int = TOKEN_LENGTH) -> int:
    """A character-level CLIP BPE vocabulary (no merges) in ``d``; returns the vocabulary size."""
    d.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return len(vocab)


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def _tiny_text_config(**overrides):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=TOKEN_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def tiny_text_encoder(seed: int):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config()).eval()


def make_tiny_latent_pipeline(directory: Path, seed: int = 0, vae_seed: int = 10, text_seed: int = 20,
                              prediction: str = "epsilon") -> Path:
    """A random tiny UNet2DConditionModel + AutoencoderKL + CLIP text encoder in SD layout.

    Latents (4, 8, 8), pixels (3, 16, 16), text embeddings (8, 32), 100 training timesteps.
    ``prediction``: the DDPM scheduler's prediction_type, or ``"flow"`` (FlowMatchEulerDiscreteScheduler, shift 3).
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2,
    )
    perturbed(unet).save_pretrained(directory / "unet")
    tiny_vae(vae_seed).save_pretrained(directory / "vae")
    tiny_text_encoder(text_seed).save_pretrained(directory / "text_encoder")
    write_char_tokenizer(directory / "tokenizer")
    scheduler = write_scheduler(directory / "scheduler", prediction)
    write_model_index(directory, "StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
                      vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
                      tokenizer=["transformers", "CLIPTokenizer"], scheduler=["diffusers", scheduler])
    return directory


def perturbed(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """``module`` with every parameter moved by ``scale`` N(0, 1): random init leaves zero-initialized
    output layers (and DiT's zero adaLN), which would make gradients vanish."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def write_scheduler(d: Path, prediction: str = "epsilon") -> str:
    """A 100-step scaled-linear DDPM schedule (SD's betas) with ``prediction_type=prediction``, or for
    ``"flow"`` a FlowMatchEulerDiscreteScheduler with shift 3; returns the scheduler's class name."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if prediction == "flow":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, shift=3.0)
    else:
        sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, prediction_type=prediction)
    sched.save_pretrained(d)
    return type(sched).__name__


def write_model_index(directory: Path, class_name: str, **entries) -> None:
    (directory / "model_index.json").write_text(json.dumps(
        {"_class_name": class_name, "_diffusers_version": "0.42.1", **entries}))


def write_caption_folder(root: Path, captions: list[str] = CAPTIONS, size: int = 16) -> Path:
    """RGB ``size``² images with captions in ``metadata.jsonl`` (diffusers' training layout).

    Image i is random noise with a white or black band whose row depends on i.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    band = size // 4
    with open(root / "metadata.jsonl", "w") as f:
        for i, cap in enumerate(captions):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[band * (i % 4) : band * (i % 4) + band] = 255 * (i % 2)
            Image.fromarray(img).save(root / f"img{i}.png")
            f.write(json.dumps({"file_name": f"img{i}.png", "text": cap}) + "\n")
    return root


def make_tiny_clip(directory: Path, seed: int = 30, image_size: int = 16) -> Path:
    """A random tiny ``CLIPModel`` + tokenizer + image-processor config saved with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=4)
    config = CLIPConfig(text_config=_tiny_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).eval().save_pretrained(directory)
    write_char_tokenizer(directory / "tok")
    for p in (directory / "tok").iterdir():  # tokenizer files beside the model, as CLIPProcessor saves them
        p.rename(directory / p.name)
    (directory / "tok").rmdir()
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(directory)
    return directory
