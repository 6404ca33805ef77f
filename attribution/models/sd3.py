"""Stable Diffusion 3: an MM-DiT transformer trained by flow matching, two CLIP encoders and T5.

An :class:`SD3Model` is a :class:`~attribution.models.latent.LatentDiffusionModel` whose
denoiser (held in ``unet``, as for every family) is an ``SD3Transformer2DModel`` called as
``transformer(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled,
timestep=sigma T)``; its objective is flow matching (``FlowMatchEulerDiscreteScheduler`` with
its ``shift``, :mod:`attribution.models.objective`). Prompts are encoded as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` does: the penultimate hidden states of
``text_encoder`` and ``text_encoder_2`` (both ``CLIPTextModelWithProjection``) side by side on
the feature axis, zero-padded to T5's width, followed along the sequence by ``text_encoder_3``'s
(T5) last hidden states; pooled = both CLIP projections concatenated. Without
``text_encoder_3`` (diffusers allows it) the T5 part is zeros of (256, joint_attention_dim), as in
the pipeline. The T5 sequence is ``min(256, tokenizer_3.model_max_length)`` tokens (the pipeline's
``max_sequence_length`` default). Guidance is classifier-free with the empty prompt encoded
normally (SD3 has no ``force_zeros_for_empty_prompt``).

Directory layout (diffusers ``StableDiffusion3Pipeline``, safetensors only)::

    model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
    scheduler/[, text_encoder_3/, tokenizer_3/]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL

from .base import ModelLoadError
from .conditioning import Conditioning, as_conditioning
from .latent import LatentDiffusionModel, from_dir, loading_errors, pipeline_dirs, pipeline_hashes, tokenize
from .objective import load_training_scheduler

#: Required components of an SD3 directory, each a subfolder; T5 (text_encoder_3, tokenizer_3) is optional.
SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
#: StableDiffusion3Pipeline's default ``max_sequence_length`` (T5 tokens).
MAX_SEQUENCE_LENGTH = 256


@dataclass
class SD3Model(LatentDiffusionModel):
    """One SD3 checkpoint (see module doc).

    Attributes:
        text_encoder_2: the second ``CLIPTextModelWithProjection``.
        tokenizer_2: its tokenizer.
        text_encoder_3: ``T5EncoderModel``, or None (zeros in its place).
        tokenizer_3: its tokenizer, or None.
    """

    family: ClassVar[str] = "Stable Diffusion 3"
    default_guidance_scale: ClassVar[float] = 7.0

    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def t5_length(self) -> int:
        """Tokens of the T5 part of the text sequence."""
        if self.tokenizer_3 is None:
            return MAX_SEQUENCE_LENGTH
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer_3.model_max_length))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> text (B, L_clip + L_t5, D_t5) and pooled (B, P1 + P2) (see module doc)."""
        clip, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(tokenize(tokenizer, prompts).to(self.device), output_hidden_states=True)
            pooled.append(out[0].float())
            clip.append(out.hidden_states[-2].float())
        width = int(self.unet.config.joint_attention_dim)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), self.t5_length, width, device=self.device)
        else:
            ids = self.tokenizer_3(list(prompts), padding="max_length", max_length=self.t5_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0].float()
        clip_seq = torch.cat(clip, dim=-1)
        clip_seq = torch.nn.functional.pad(clip_seq, (0, t5.shape[-1] - clip_seq.shape[-1]))
        return Conditioning(text=torch.cat([clip_seq, t5], dim=-2), pooled=torch.cat(pooled, dim=-1))

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        """``encoder_hidden_states`` (B, L, D) and ``pooled_projections`` (B, P) of ``cond``."""
        cond = as_conditioning(cond)
        if cond is None or cond.text is None or cond.pooled is None:
            raise ValueError("an SD3 model needs text and pooled conditioning (encode_prompts([...]))")
        return {"encoder_hidden_states": cond.text, "pooled_projections": cond.pooled}

    def run_network(
        self, network: Callable[..., Any], x_t: torch.Tensor, tau: torch.Tensor, cond: Conditioning | torch.Tensor | None
    ) -> torch.Tensor:
        """The velocity (B, C, H, W) at latents x_t (B, C, H, W); tau (B,) = sigma T, as the pipeline passes it."""
        return network(hidden_states=x_t, timestep=tau, **self.unet_kwargs(cond)).sample


def load_sd3_model(path: Path, sched_dir: Path, device: str | torch.device = "cpu") -> SD3Model:
    """Load a ``StableDiffusion3Pipeline`` directory (see module doc)."""
    dirs = pipeline_dirs(path, "StableDiffusion3Pipeline", SD3_COMPONENTS, T5_COMPONENTS)
    has_t5 = dirs["text_encoder_3"].is_dir()
    if has_t5 != dirs["tokenizer_3"].is_dir():
        raise ModelLoadError(f"{path}: text_encoder_3/ and tokenizer_3/ go together (T5 is optional, but not half of it)")
    with loading_errors(path, "an SD3 pipeline"):
        from diffusers import SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        transformer = from_dir(SD3Transformer2DModel, dirs["transformer"])
        vae = from_dir(AutoencoderKL, dirs["vae"])
        scheduler = load_training_scheduler(sched_dir)
        te = from_dir(CLIPTextModelWithProjection, dirs["text_encoder"])
        te2 = from_dir(CLIPTextModelWithProjection, dirs["text_encoder_2"])
        tok = CLIPTokenizer.from_pretrained(dirs["tokenizer"], local_files_only=True)
        tok2 = CLIPTokenizer.from_pretrained(dirs["tokenizer_2"], local_files_only=True)
        te3 = from_dir(T5EncoderModel, dirs["text_encoder_3"]) if has_t5 else None
        tok3 = AutoTokenizer.from_pretrained(dirs["tokenizer_3"], local_files_only=True) if has_t5 else None
    if scheduler.config.get("_class_name", type(scheduler).__name__) != "FlowMatchEulerDiscreteScheduler":
        raise ModelLoadError(f"{path}: an SD3 pipeline is trained by flow matching, but its scheduler is "
                             f"{type(scheduler).__name__}")
    cfg = transformer.config
    pooled = te.config.projection_dim + te2.config.projection_dim
    if cfg.pooled_projection_dim != pooled:
        raise ModelLoadError(f"{path}: the transformer takes {cfg.pooled_projection_dim} pooled features but the two "
                             f"CLIP projections give {pooled}")
    if te3 is not None and te3.config.d_model != cfg.joint_attention_dim:
        raise ModelLoadError(f"{path}: the transformer attends to {cfg.joint_attention_dim} features but "
                             f"text_encoder_3 gives {te3.config.d_model}")
    clip_width = te.config.hidden_size + te2.config.hidden_size
    if clip_width > cfg.joint_attention_dim:
        raise ModelLoadError(f"{path}: the two CLIP encoders give {clip_width} features, more than the transformer's "
                             f"joint_attention_dim {cfg.joint_attention_dim}")
    for m in (transformer, vae, te, te2, te3):
        if m is not None:
            m.eval().requires_grad_(False).to(device)
    return SD3Model(
        unet=transformer, scheduler=scheduler, path=path, vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
        **pipeline_hashes(path, sched_dir, SD3_COMPONENTS + (T5_COMPONENTS if has_t5 else ())),
    )
