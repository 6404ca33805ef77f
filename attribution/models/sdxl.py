"""Stable Diffusion XL: two text encoders, pooled text embeddings and added time ids.

An :class:`SDXLModel` is a :class:`~attribution.models.latent.LatentDiffusionModel` whose
UNet (``addition_embed_type="text_time"``) takes, besides the text sequence, the
``added_cond_kwargs`` ``{"text_embeds": pooled (B, P), "time_ids": (B, 6)}``. Prompts are
encoded as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does: the penultimate
hidden states of ``text_encoder`` (CLIPTextModel) and ``text_encoder_2``
(CLIPTextModelWithProjection) concatenated along the feature axis, the pooled
embedding the projected output of ``text_encoder_2``. The time ids are
``original_size + crop_top_left + target_size`` = (H, W, 0, 0, H, W) at the model's pixel
size, for queries, train examples and sampling alike: train images are resized and
center-cropped to that size by the dataset rule, so no other original size or crop is
known for them. With ``force_zeros_for_empty_prompt`` (model_index.json; SDXL's default)
the unconditional branch of guidance for an empty negative prompt is all zeros, as in
the pipeline.

Directory layout (diffusers ``StableDiffusionXLPipeline``, safetensors only)::

    model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .base import ModelLoadError
from .conditioning import Conditioning, as_conditioning
from .objective import load_training_scheduler
from .latent import LatentDiffusionModel, from_dir, loading_errors, pipeline_dirs, pipeline_hashes, tokenize

#: Components of an SDXL directory, each a subfolder.
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLModel(LatentDiffusionModel):
    """One SDXL checkpoint (see module doc).

    Attributes:
        text_encoder_2: ``CLIPTextModelWithProjection``; gives the pooled embedding.
        tokenizer_2: its tokenizer.
        force_zeros_for_empty_prompt: guidance's branch for an empty negative prompt is zeros.
    """

    family: ClassVar[str] = "Stable Diffusion XL"
    default_guidance_scale: ClassVar[float] = 5.0

    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True

    def add_time_ids(self, batch: int) -> torch.Tensor:
        """(batch, 6) float32: original size (H, W), crop corner (0, 0), target size (H, W), in pixels."""
        _, h, w = self.pixel_shape
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).expand(batch, -1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> text (B, L, D1 + D2), pooled (B, P) and time ids (B, 6) (see module doc)."""
        sequences, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(tokenize(tokenizer, prompts).to(self.device), output_hidden_states=True)
            pooled = out[0]  # the projected pooled output of the last encoder (CLIPTextModelWithProjection)
            sequences.append(out.hidden_states[-2])
        return Conditioning(text=torch.cat(sequences, dim=-1).float(), pooled=pooled.float(),
                            time_ids=self.add_time_ids(len(prompts)))

    def negative_conditioning(self, negative_prompt: str) -> Conditioning:
        cond = self.encode_prompts([negative_prompt])
        if negative_prompt == "" and self.force_zeros_for_empty_prompt:
            return Conditioning(text=torch.zeros_like(cond.text), pooled=torch.zeros_like(cond.pooled),
                                time_ids=cond.time_ids)
        return cond

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        """``encoder_hidden_states`` and ``added_cond_kwargs`` (text_embeds, time_ids) of ``cond``."""
        cond = as_conditioning(cond)
        if cond is None or cond.text is None or cond.pooled is None or cond.time_ids is None:
            raise ValueError("an SDXL model needs text, pooled and time-id conditioning (encode_prompts([...]))")
        return {"encoder_hidden_states": cond.text,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}


def load_sdxl_model(path: Path, sched_dir: Path, device: str | torch.device = "cpu") -> SDXLModel:
    """Load a ``StableDiffusionXLPipeline`` directory (see module doc)."""
    dirs = pipeline_dirs(path, "StableDiffusionXLPipeline", SDXL_COMPONENTS)
    with loading_errors(path, "an SDXL pipeline"):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet = from_dir(UNet2DConditionModel, dirs["unet"])
        vae = from_dir(AutoencoderKL, dirs["vae"])
        scheduler = load_training_scheduler(sched_dir)
        te = from_dir(CLIPTextModel, dirs["text_encoder"])
        te2 = from_dir(CLIPTextModelWithProjection, dirs["text_encoder_2"])
        tok = CLIPTokenizer.from_pretrained(dirs["tokenizer"], local_files_only=True)
        tok2 = CLIPTokenizer.from_pretrained(dirs["tokenizer_2"], local_files_only=True)
    if unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{dirs['unet']}: an SDXL UNet has addition_embed_type 'text_time', this one "
                             f"{unet.config.addition_embed_type!r}")
    want = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * 6 + te2.config.projection_dim
    if want != given:
        raise ModelLoadError(f"{path}: the UNet's added embedding takes {want} features but 6 time ids and "
                             f"text_encoder_2's projection give {given}")
    if unet.config.cross_attention_dim != te.config.hidden_size + te2.config.hidden_size:
        raise ModelLoadError(f"{path}: the UNet attends to {unet.config.cross_attention_dim} features but the two "
                             f"text encoders give {te.config.hidden_size} + {te2.config.hidden_size}")
    for m in (unet, vae, te, te2):
        m.eval().requires_grad_(False).to(device)
    index = json.loads((path / "model_index.json").read_text())
    return SDXLModel(
        unet=unet, scheduler=scheduler, path=path, vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        **pipeline_hashes(path, sched_dir, SDXL_COMPONENTS),
    )
