"""Tiny random SDXL, DiT, SD3 and FLUX pipelines and a class-folder dataset, saved on disk (no hub, no weights).

Shared by tests/test_families.py and benchmarks/bench_families.py; the components are
built from configurations like diffusers' own pipeline tests do, with the helpers of
tests/latent_builders.py (VAE, character tokenizer, CLIP text configs, scheduler).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latent_builders import (
    _tiny_text_config, perturbed, tiny_text_encoder, tiny_vae, write_char_tokenizer, write_model_index,
    write_scheduler,
)

#: DiT classes of the tiny pipeline: id -> label (synonyms separated by commas, as ImageNet's id2label).
ID2LABEL = {0: "red square, red block", 1: "blue circle", 2: "green stripes", 3: "yellow cross"}
#: The class subfolders of the tiny class folder (a synonym, a plain label, and a decimal id).
CLASS_FOLDERS = ("red block", "blue circle", "3")
SDXL_TIME_DIM = 8  # addition_time_embed_dim
POOLED_DIM = 16  # text_encoder_2's projection_dim


def tiny_text_encoder_2(seed: int):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_tiny_text_config(projection_dim=POOLED_DIM)).eval()


def sdxl_unet(seed: int, widths: tuple[int, ...] = (8, 16), sample_size: int = 8):
    """An SDXL-style UNet (addition_embed_type "text_time") attending to two 32-wide text encoders."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        cross_attention_dim=64, norm_num_groups=4, attention_head_dim=tuple(max(2, w // 8) for w in widths),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + POOLED_DIM,
    )
    return perturbed(unet)


def make_tiny_sdxl_pipeline(directory: Path, seed: int = 0, text_seed: int = 20, text2_seed: int = 21,
                            widths: tuple[int, ...] = (8, 16), sample_size: int = 8) -> Path:
    """A random SDXL pipeline: latents (4, s, s), pixels (3, 2s, 2s), text (8, 64), pooled (16,)."""
    sdxl_unet(seed, widths, sample_size).save_pretrained(directory / "unet")
    tiny_vae(10).save_pretrained(directory / "vae")
    tiny_text_encoder(text_seed).save_pretrained(directory / "text_encoder")
    tiny_text_encoder_2(text2_seed).save_pretrained(directory / "text_encoder_2")
    write_char_tokenizer(directory / "tokenizer")
    write_char_tokenizer(directory / "tokenizer_2")
    write_scheduler(directory / "scheduler")
    write_model_index(
        directory, "StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
        unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModel"], text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer=["transformers", "CLIPTokenizer"], tokenizer_2=["transformers", "CLIPTokenizer"],
        scheduler=["diffusers", "DDPMScheduler"])
    return directory


def dit_transformer(seed: int, layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
                    num_classes: int = len(ID2LABEL)):
    """A DiT with learned variance (out_channels = 2 in_channels) and adaLN-zero blocks."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=sample_size, num_layers=layers, patch_size=2, attention_head_dim=head_dim,
        num_attention_heads=heads, in_channels=4, out_channels=8, num_embeds_ada_norm=num_classes,
        norm_elementwise_affine=False,
    )
    return perturbed(model)


def make_tiny_dit_pipeline(directory: Path, seed: int = 0, **transformer) -> Path:
    """A random DiTPipeline: latents (4, 8, 8), pixels (3, 16, 16), 4 classes named by :data:`ID2LABEL`."""
    dit_transformer(seed, **transformer).save_pretrained(directory / "transformer")
    tiny_vae(10).save_pretrained(directory / "vae")
    write_scheduler(directory / "scheduler")
    write_model_index(directory, "DiTPipeline", id2label={str(k): v for k, v in ID2LABEL.items()},
                      transformer=["diffusers", "DiTTransformer2DModel"], vae=["diffusers", "AutoencoderKL"],
                      scheduler=["diffusers", "DDPMScheduler"])
    return directory


def write_class_folder(root: Path, classes: tuple[str, ...] = CLASS_FOLDERS, per_class: int = 3, size: int = 16) -> Path:
    """RGB ``size``² images in one subfolder per class; the class sets the colour of a band."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[: size // 4, :, c % 3] = 255
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


T5_WIDTH = 64  # text_encoder_3's d_model = the SD3 transformer's joint_attention_dim


def write_char_t5_tokenizer(d: Path, max_length: int = 8) -> None:
    """A character-level T5-style tokenizer (``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2) saved in ``d``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, " ": 3, **{c: 4 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(d)


def tiny_t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=T5_WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8)).eval()


def sd3_transformer(seed: int, layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8):
    """An SD3 MM-DiT on (4, s, s) latents attending to T5-wide text, pooled from two 16-wide CLIP projections."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * POOLED_DIM, pos_embed_max_size=sample_size,
    )
    return perturbed(model)


def make_tiny_sd3_pipeline(directory: Path, seed: int = 0, t5: bool = True, **transformer) -> Path:
    """A random StableDiffusion3Pipeline: latents (4, 8, 8), pixels (3, 16, 16), text (8 CLIP + 8 T5, 64),
    pooled (32,); flow matching with shift 3 over 100 steps."""
    sd3_transformer(seed, **transformer).save_pretrained(directory / "transformer")
    tiny_vae(10).save_pretrained(directory / "vae")
    tiny_text_encoder_2(20).save_pretrained(directory / "text_encoder")
    tiny_text_encoder_2(21).save_pretrained(directory / "text_encoder_2")
    write_char_tokenizer(directory / "tokenizer")
    write_char_tokenizer(directory / "tokenizer_2")
    entries = {}
    if t5:
        tiny_t5(23).save_pretrained(directory / "text_encoder_3")
        write_char_t5_tokenizer(directory / "tokenizer_3")
        entries = dict(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"])
    write_scheduler(directory / "scheduler", "flow")
    write_model_index(
        directory, "StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModelWithProjection"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        **entries)
    return directory


#: FLUX's VAE latent normalization (its vae/config.json), applied by the tiny FLUX VAE too.
FLUX_SHIFT_FACTOR, FLUX_SCALING_FACTOR = 0.1159, 0.3611
#: FLUX.1's scheduler config: dynamic shifting, mu from the packed sequence length.
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def flux_transformer(seed: int, guidance: bool = True, layers: int = 1, single_layers: int = 1, heads: int = 2,
                     head_dim: int = 16, rope: tuple[int, int, int] = (4, 4, 8)):
    """A FLUX MM-DiT (double + single blocks) on 2 x 2 packed 4-channel latents, T5-wide text, CLIP-wide pooled."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=list(rope),
    )
    return perturbed(model)


def flux_vae(seed: int, sample_size: int = 16):
    """The tiny VAE (4 latent channels, factor 2) with FLUX's shift and scaling factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=FLUX_SHIFT_FACTOR, scaling_factor=FLUX_SCALING_FACTOR,
    )


def make_tiny_flux_pipeline(directory: Path, seed: int = 0, guidance: bool = True, sample_size: int = 16,
                            **transformer) -> Path:
    """A random FluxPipeline: latents (4, s/2, s/2) packed to (s²/16, 16) tokens, pixels (3, s, s), text (8, 64) from
    T5, pooled (32,) from CLIP; FLUX.1's dynamically shifted flow-matching scheduler over 1000 steps.
    ``guidance``: a guidance-embedding (FLUX-dev) transformer, else schnell-like."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux_transformer(seed, guidance, **transformer).save_pretrained(directory / "transformer")
    flux_vae(10, sample_size).save_pretrained(directory / "vae")
    tiny_text_encoder(20).save_pretrained(directory / "text_encoder")
    tiny_t5(23).save_pretrained(directory / "text_encoder_2")
    write_char_tokenizer(directory / "tokenizer")
    write_char_t5_tokenizer(directory / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(directory / "scheduler")
    write_model_index(
        directory, "FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"],
        vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
        text_encoder_2=["transformers", "T5EncoderModel"], tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "T5TokenizerFast"], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    return directory
