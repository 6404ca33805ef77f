"""FLUX.1: an MM-DiT transformer on packed VAE latents, trained by flow matching, CLIP + T5 text encoders.

A :class:`FluxModel` is a :class:`~attribution.models.latent.LatentDiffusionModel` whose denoiser
(held in ``unet``, as for every family) is a ``FluxTransformer2DModel``. Everything outside the
model call (the objective, x_t, targets, masks, x0_hat, trajectories) works on the *unpacked*
latents (B, C, h, w); :meth:`FluxModel.run_network` packs them into 2 x 2 patches, (B, h w / 4, 4 C)
tokens, builds the position ids and unpacks the velocity, as ``FluxPipeline`` does around its call

    transformer(hidden_states=packed, timestep=sigma, guidance=g, pooled_projections=pooled,
                encoder_hidden_states=t5, txt_ids=zeros(L, 3), img_ids=(0, row, col) per token)

(the pipeline passes ``timestep / 1000`` = sigma for FLUX's T = 1000; the transformer multiplies by
1000 itself). Packing permutes the latent cells, so a squared error summed over the cells (with the
mask in the unpacked layout) is the same loss the pipeline's training scripts compute on tokens.

Prompts are encoded as ``FluxPipeline.encode_prompt``: ``pooled`` (B, P) is ``text_encoder``'s
(``CLIPTextModel``) pooled output of ``tokenizer.model_max_length`` tokens, ``text`` (B, L, D) the last
hidden states of ``text_encoder_2`` (``T5EncoderModel``) over L = min(512, tokenizer_2.model_max_length)
tokens (the pipeline's ``max_sequence_length`` default), no attention mask; ``txt_ids`` are zeros.

Guidance: a transformer with ``guidance_embeds=True`` (FLUX-dev, guidance-distilled) takes the guidance
scale as an input: sampling passes the sampling scale in ``Conditioning.guidance`` and runs one
prediction per step (no classifier-free batch; the pipeline's default 3.5). The training loss, and so
every train and query gradient, is conditioned on :attr:`FluxModel.train_guidance` (3.5, the
``--guidance_scale`` default of diffusers' ``train_dreambooth_lora_flux.py``, which feeds it to the
guidance embedding while training); it is part of the objective's identity, so a store built with
another value is refused. ``guidance_embeds=False`` (FLUX-schnell): no guidance at all.

The scheduler is ``FlowMatchEulerDiscreteScheduler``, usually with ``use_dynamic_shifting=True``:
mu from the packed sequence length h w / 4 (:mod:`attribution.models.objective`). Sampling walks the
pipeline's unshifted linspace(1, 1/S, S) on that shifted grid (:mod:`attribution.sampling.steps`).

Latent size: the VAE's ``sample_size`` pixels square (FLUX's VAE: 1024, the pipeline's default
resolution), i.e. ``sample_size / vae_scale_factor`` latent cells a side; it must be even.

Directory layout (diffusers ``FluxPipeline``, safetensors only)::

    model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL

from .base import FlowSamplingEnd, GuidanceKind, ModelLoadError
from .conditioning import Conditioning, as_conditioning
from .latent import LatentDiffusionModel, from_dir, loading_errors, pipeline_dirs, pipeline_hashes, tokenize
from .objective import FLOW_SCHEDULER, DiffusionObjective, load_training_scheduler

#: The components of a FLUX directory, each a subfolder.
FLUX_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: FluxPipeline's default ``max_sequence_length`` (T5 tokens).
MAX_SEQUENCE_LENGTH = 512
#: The guidance embedding of the training loss of guidance-distilled models (see module doc).
TRAIN_GUIDANCE = 3.5


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> tokens (B, h w / 4, 4 C): 2 x 2 patches in row-major order, each
    flattened channel-major (c, dy, dx), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, h w / 4, 4 C) -> latents (B, C, h, w), the inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    return tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h w / 4, 3) float32 position ids of the packed tokens of (h, w) latents: (0, row, column)."""
    rows = torch.arange(h // 2, device=device, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


@dataclass
class FluxModel(LatentDiffusionModel):
    """One FLUX checkpoint (see module doc).

    Attributes:
        text_encoder_2: ``T5EncoderModel``.
        tokenizer_2: its tokenizer.
        train_guidance: guidance embedding of the training loss (guidance-distilled models only; change it
            with :meth:`set_train_guidance`).
    """

    family: ClassVar[str] = "FLUX"
    default_guidance_scale: ClassVar[float] = 3.5
    flow_sampling_end: ClassVar[FlowSamplingEnd] = "1/S"

    text_encoder_2: Any = None
    tokenizer_2: Any = None
    train_guidance: float = TRAIN_GUIDANCE

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (FLUX-dev)."""
        return bool(self.unet.config.guidance_embeds)

    @property
    def guidance_kind(self) -> GuidanceKind:
        return "embedded" if self.guidance_embeds else "none"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the unpacked latents: the VAE's latent channels, ``vae.config.sample_size / vae_scale_factor``."""
        side = int(self.vae.config.sample_size) // self.vae_scale_factor
        return (int(self.vae.config.latent_channels), side, side)

    @property
    def image_seq_len(self) -> int:
        """Image tokens of the packed latents, h w / 4 (what dynamic shifting's mu depends on)."""
        _, h, w = self.image_shape
        return (h // 2) * (w // 2)

    @cached_property
    def objective(self) -> DiffusionObjective:
        """Flow matching on the scheduler's grid (dynamically shifted for :attr:`image_seq_len` tokens), its loss
        conditioned on :attr:`train_guidance` when the transformer embeds guidance."""
        base = DiffusionObjective.from_scheduler(self.scheduler, image_seq_len=self.image_seq_len)
        return base.with_train_guidance(self.train_guidance if self.guidance_embeds else None)

    def set_train_guidance(self, guidance: float) -> None:
        """Attribute the training loss with the guidance embedding ``guidance`` (a store records it)."""
        if not self.guidance_embeds:
            raise ValueError(f"{self.path}: the transformer has no guidance embedding (guidance_embeds=False)")
        self.train_guidance = float(guidance)
        self.__dict__.pop("objective", None)

    @property
    def t5_length(self) -> int:
        """L, the T5 tokens of the text sequence."""
        return min(MAX_SEQUENCE_LENGTH, int(self.tokenizer_2.model_max_length))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Prompts -> text (B, L, D_t5), pooled (B, P) and, for guidance-embedding transformers, guidance (B,)
        = :attr:`train_guidance` (sampling replaces it with its scale)."""
        pooled = self.text_encoder(tokenize(self.tokenizer, prompts).to(self.device)).pooler_output.float()
        ids = self.tokenizer_2(list(prompts), padding="max_length", max_length=self.t5_length, truncation=True,
                               return_tensors="pt").input_ids
        text = self.text_encoder_2(ids.to(self.device))[0].float()
        cond = Conditioning(text=text, pooled=pooled)
        return cond.with_guidance(self.train_guidance) if self.guidance_embeds else cond

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        """``encoder_hidden_states`` (B, L, D), ``pooled_projections`` (B, P), ``guidance`` (B,) or None, and
        ``txt_ids`` (L, 3) zeros."""
        cond = as_conditioning(cond)
        if cond is None or cond.text is None or cond.pooled is None:
            raise ValueError("a FLUX model needs text and pooled conditioning (encode_prompts([...]))")
        if self.guidance_embeds and cond.guidance is None:
            raise ValueError(f"{self.path} embeds the guidance scale; the conditioning needs guidance (encode_prompts)")
        if not self.guidance_embeds and cond.guidance is not None:
            raise ValueError(f"{self.path} has no guidance embedding (guidance_embeds=False); conditioning has guidance")
        txt_ids = torch.zeros(cond.text.shape[-2], 3, device=cond.text.device)
        return {"encoder_hidden_states": cond.text, "pooled_projections": cond.pooled, "guidance": cond.guidance,
                "txt_ids": txt_ids}

    def run_network(
        self, network: Callable[..., Any], x_t: torch.Tensor, tau: torch.Tensor, cond: Conditioning | torch.Tensor | None
    ) -> torch.Tensor:
        """The velocity (B, C, h, w) at latents x_t (B, C, h, w); tau (B,) = sigma T, passed as sigma = tau / T.

        Packing and position ids live here only (see module doc)."""
        _, _, h, w = x_t.shape
        out = network(hidden_states=pack_latents(x_t), timestep=tau / self.num_train_timesteps,
                      img_ids=latent_image_ids(h, w, x_t.device), **self.unet_kwargs(cond)).sample
        return unpack_latents(out, h, w)


def load_flux_model(path: Path, sched_dir: Path, device: str | torch.device = "cpu") -> FluxModel:
    """Load a ``FluxPipeline`` directory (see module doc)."""
    dirs = pipeline_dirs(path, "FluxPipeline", FLUX_COMPONENTS)
    with loading_errors(path, "a FLUX pipeline"):
        from diffusers import FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        transformer = from_dir(FluxTransformer2DModel, dirs["transformer"])
        vae = from_dir(AutoencoderKL, dirs["vae"])
        scheduler = load_training_scheduler(sched_dir)
        te, te2 = from_dir(CLIPTextModel, dirs["text_encoder"]), from_dir(T5EncoderModel, dirs["text_encoder_2"])
        tok = CLIPTokenizer.from_pretrained(dirs["tokenizer"], local_files_only=True)
        tok2 = AutoTokenizer.from_pretrained(dirs["tokenizer_2"], local_files_only=True)
    _check_flux_shapes(path, transformer.config, vae.config, te.config, te2.config, type(scheduler).__name__)
    for m in (transformer, vae, te, te2):
        m.eval().requires_grad_(False).to(device)
    return FluxModel(
        unet=transformer, scheduler=scheduler, path=path, vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, **pipeline_hashes(path, sched_dir, FLUX_COMPONENTS),
    )


def _check_flux_shapes(path: Path, cfg: Any, vae: Any, clip: Any, t5: Any, scheduler: str) -> None:
    """Refuse, in one line, a FLUX directory whose components do not fit together."""
    if scheduler != FLOW_SCHEDULER:
        raise ModelLoadError(f"{path}: a FLUX pipeline is trained by flow matching, but its scheduler is {scheduler}")
    if cfg.patch_size != 1:
        raise ModelLoadError(f"{path}: the transformer has patch_size {cfg.patch_size}; FluxPipeline packs 2 x 2 "
                             f"latent patches itself and needs patch_size 1")
    if cfg.in_channels != 4 * vae.latent_channels or (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
        raise ModelLoadError(f"{path}: the transformer takes {cfg.in_channels} channels in and "
                             f"{cfg.out_channels or cfg.in_channels} out, but 2 x 2 packed {vae.latent_channels}-channel "
                             f"latents are {4 * vae.latent_channels} (a Fill/Control variant is not FluxPipeline)")
    if cfg.pooled_projection_dim != clip.hidden_size:
        raise ModelLoadError(f"{path}: the transformer takes {cfg.pooled_projection_dim} pooled features but "
                             f"text_encoder (CLIP) gives {clip.hidden_size}")
    if cfg.joint_attention_dim != t5.d_model:
        raise ModelLoadError(f"{path}: the transformer attends to {cfg.joint_attention_dim} features but "
                             f"text_encoder_2 (T5) gives {t5.d_model}")
    factor = 2 ** (len(vae.block_out_channels) - 1)
    if int(vae.sample_size) % (2 * factor):
        raise ModelLoadError(f"{path}: the VAE's sample_size {vae.sample_size} is no multiple of {2 * factor} "
                             f"(latents must have an even side to be packed 2 x 2)")
