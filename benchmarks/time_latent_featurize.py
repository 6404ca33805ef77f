"""CPU (or GPU) timing of featurize for a mid-sized latent text-conditional model.

Builds random-weight components in a temporary Stable-Diffusion-layout directory
(UNet2DConditionModel with block_out_channels (32, 64, 64), cross_attention_dim 64,
latents 4 x 16 x 16; a small AutoencoderKL and CLIP text encoder), a captioned
random image set, and times (1) encoding the latents and (2) featurize with the
default projection, printing examples per second. Nothing is downloaded.

    OMP_NUM_THREADS=1 python benchmarks/time_latent_featurize.py --num-train 64
    python benchmarks/time_latent_featurize.py --lora      # gradients of LoRA weights only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_pipeline(root: Path, vocab_size: int = 54) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    ).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).save_pretrained(root / "text_encoder")
    tok = root / "tokenizer"
    tok.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False).save_pretrained(root / "scheduler")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-train", type=int, default=64)
    ap.add_argument("--num-draws", type=int, default=4)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora", action="store_true", help="add a rank-4 LoRA adapter and differentiate only its weights")
    args = ap.parse_args()

    from attribution.config import FeaturizeConfig
    from attribution.data import ArrayDataset
    from attribution.features import encode_dataset, featurize, num_params, select_params
    from attribution.models import add_lora, load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = build_pipeline(Path(tmp) / "pipe")
        model = load_model(root, args.device)
        pf = None
        if args.lora:
            add_lora(model, rank=4)
            pf = ("re:lora_",)
        rng = np.random.default_rng(0)
        c, h, w = model.pixel_shape
        words = ["red", "blue", "square", "circle", "stripes", "noise"]
        data = ArrayDataset(
            rng.integers(0, 256, (args.num_train, h, w, c), dtype=np.uint8),
            captions=[" ".join(rng.choice(words, 3)) for _ in range(args.num_train)], name="random",
        )
        p = num_params(select_params(model, pf))
        t0 = time.perf_counter()
        latents = encode_dataset(data, model)
        t_enc = time.perf_counter() - t0
        cfg = FeaturizeConfig(num_draws=args.num_draws, proj_dim=args.proj_dim, param_filter=pf)
        t0 = time.perf_counter()
        featurize([model], latents, Path(tmp) / "store", cfg, chunk_size=args.chunk_size)
        t_feat = time.perf_counter() - t0
        print(f"device {args.device}, torch threads {torch.get_num_threads()}")
        print(f"UNet2DConditionModel (32, 64, 64), cross_attention_dim 64, latents {model.image_shape}, "
              f"pixels {model.pixel_shape}; differentiated params {p:,}{' (LoRA only)' if args.lora else ''}")
        print(f"VAE encode: {args.num_train} images in {t_enc:.2f} s ({args.num_train / t_enc:.1f} examples/s)")
        print(f"featurize: {args.num_train} examples x {args.num_draws} draws, sjlt d={args.proj_dim}, "
              f"chunk {args.chunk_size}: {t_feat:.2f} s ({args.num_train / t_feat:.2f} examples/s)")


if __name__ == "__main__":
    main()
