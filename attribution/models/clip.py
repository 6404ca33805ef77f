"""Zero-shot text labels with a user's local CLIP model (for feature-likelihood curves).

A :class:`ClipLabeler` scores images against free-text labels the way CLIP's
zero-shot classifier does: p(label_j | image) = softmax_j(s * cos(E_img(image), E_txt(label_j))),
with s = exp(logit_scale) of the model. It loads a ``transformers`` ``CLIPModel``
and its tokenizer from a local directory only (safetensors weights, no hub); the
image preprocessing (resize of the shorter side, center crop, mean/std) follows the
directory's ``preprocessor_config.json`` when there is one, else CLIP's defaults at
the vision tower's input size, and runs in torch on the model's device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import ModelLoadError

# OpenAI CLIP's normalization (transformers.utils.constants.OPENAI_CLIP_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLabeler:
    """Probabilities of text labels for images, and image embeddings, with one CLIP model.

    Attributes:
        model: ``transformers.CLIPModel`` in eval mode.
        tokenizer: its tokenizer.
        size: shorter side after resizing; crop: (h, w) of the center crop.
        mean, std: (3,) normalization of [0, 1] images.
    """

    def __init__(self, model, tokenizer, size: int, crop: tuple[int, int],
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.model = model
        self.tokenizer = tokenizer
        self.size = int(size)
        self.crop = (int(crop[0]), int(crop[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [-1, 1] -> (B, 3, h, w) normalized CLIP input (grayscale repeated)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = (images.to(self.device, torch.float32) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        # shorter side -> size, longer side rounded down (as transformers' get_resize_output_image_size)
        new_h, new_w = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
        x = F.interpolate(x, size=(max(self.crop[0], new_h), max(self.crop[1], new_w)),
                          mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, D) unit-norm image embeddings."""
        out = []
        for s in range(0, images.shape[0], batch_size):
            feats = self.model.get_image_features(pixel_values=self.preprocess(images[s : s + batch_size]))
            out.append(F.normalize(_projected(feats), dim=-1))
        return torch.cat(out).float()

    @torch.no_grad()
    def embed_texts(self, labels: Sequence[str]) -> torch.Tensor:
        """Labels -> (L, D) unit-norm text embeddings."""
        tok = self.tokenizer(list(labels), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        feats = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                             attention_mask=tok.attention_mask.to(self.device))
        return F.normalize(_projected(feats), dim=-1).float()

    @torch.no_grad()
    def label_probs(self, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] and L labels -> (B, L) probabilities (rows sum to 1)."""
        labels = check_labels(labels)
        scale = self.model.logit_scale.exp().float()
        logits = scale * self.embed_images(images) @ self.embed_texts(labels).T
        return logits.softmax(-1)


def check_labels(labels: Sequence[str]) -> list[str]:
    """Stripped labels; at least two, non-empty and distinct (else ValueError with a message)."""
    out = [str(label).strip() for label in labels]
    if any(not label for label in out):
        raise ValueError("a label is empty; write one text label per line")
    if len(out) < 2:
        raise ValueError("give at least two labels: their probabilities are relative to each other")
    if len(set(out)) != len(out):
        raise ValueError("labels must be distinct")
    return out


def _projected(out) -> torch.Tensor:
    """The projected embedding: transformers < 5 returns the tensor, 5.x an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip(directory: str | Path, device: str | torch.device = "cpu") -> ClipLabeler:
    """Load a ``CLIPModel`` + tokenizer (+ optional image-processor config) from a local directory.

    Raises:
        ModelLoadError: not a CLIP directory, no safetensors weights, or no tokenizer.
    """
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d} has no config.json: not a CLIP model directory")
    if not any(d.glob("*.safetensors")):
        raise ModelLoadError(f"{d} has no .safetensors weights; only safetensors weights are loaded")
    try:
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = CLIPModel.from_pretrained(d, use_safetensors=True, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(d, local_files_only=True)
    except ImportError as e:
        raise ModelLoadError(f"CLIP curves need the optional package transformers: {e}") from e
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"could not load a CLIP model and tokenizer from {d}: {e}") from e
    model.eval().requires_grad_(False).to(device)
    image_size = int(model.config.vision_config.image_size)
    size, crop, mean, std = image_size, (image_size, image_size), CLIP_MEAN, CLIP_STD
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        s = cfg.get("size", image_size)
        size = int(s.get("shortest_edge", image_size)) if isinstance(s, dict) else int(s)
        c = cfg.get("crop_size", image_size)
        crop = (int(c["height"]), int(c["width"])) if isinstance(c, dict) else (int(c), int(c))
        mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    return ClipLabeler(model, tokenizer, size, crop, mean, std)
