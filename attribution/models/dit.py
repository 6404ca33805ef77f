"""DiT: a class-conditional latent transformer (diffusers ``DiTPipeline``).

A :class:`DiTModel` is a :class:`~attribution.models.latent.LatentDiffusionModel` whose
denoiser (held in ``unet``, as for every family) is a ``DiTTransformer2DModel`` taking
``class_labels`` (B,) int64. Its prompts are class names: ``encode_prompts(["tabby cat"])``
is ``Conditioning(labels=[281])`` through ``id2label`` (model_index.json, else the
transformer's config.json; each entry may list synonyms separated by commas, as
``DiTPipeline.get_label_ids`` reads them); a decimal string is a class id; the empty
prompt is the null class ``num_embeds_ada_norm`` (the row DiT's label dropout trained
as "no class"), which is also the unconditional branch of guidance, as in ``DiTPipeline``.

With learned variance (``out_channels == 2 * in_channels``) the transformer's output is
(eps, variance interpolation); :meth:`DiTModel.prediction` keeps the first
``in_channels`` channels, so the loss, like DiT's simple loss term, ignores the rest.

Directory layout (safetensors only)::

    model_index.json (_class_name DiTPipeline[, id2label]), transformer/, vae/, scheduler/
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from diffusers import AutoencoderKL

from .base import ModelLoadError
from .conditioning import Conditioning, as_conditioning
from .objective import load_training_scheduler
from .latent import LatentDiffusionModel, _require_safetensors, _weight_files, component_hashes, hash_components


@dataclass
class DiTModel(LatentDiffusionModel):
    """One DiT checkpoint (see module doc).

    Attributes:
        id2label: class id -> label text (synonyms separated by commas); may be empty.
    """

    family: ClassVar[str] = "DiT"
    default_guidance_scale: ClassVar[float] = 4.0

    id2label: dict[int, str] = field(default_factory=dict)

    @property
    def is_conditional(self) -> bool:
        return True

    @property
    def is_class_conditional(self) -> bool:
        return True

    @property
    def num_classes(self) -> int:
        return int(self.unet.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        """The id of "no class" (unconditional), one past the last class."""
        return self.num_classes

    @property
    def class_names(self) -> list[str]:
        """Display name of each class id 0..num_classes-1: the first synonym of its label, else the id."""
        return [self.id2label[i].split(",")[0].strip() if i in self.id2label else str(i) for i in range(self.num_classes)]

    def class_id(self, name: str) -> int:
        """The class id of a label (any synonym, or a decimal id); ``""`` is the null class."""
        name = str(name).strip()
        if name == "":
            return self.null_class
        if name.isdecimal() and int(name) < self.num_classes:
            return int(name)
        for i, label in self.id2label.items():
            if name in (s.strip() for s in label.split(",")):
                return int(i)
        known = ", ".join(self.class_names[:8]) + (", ..." if self.num_classes > 8 else "")
        raise ValueError(f"{name!r} is not a class of {self.path} (its id2label has {len(self.id2label)} labels: "
                         f"{known}; or give an id 0-{self.num_classes - 1})")

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Class names (or ids, ``""`` for none) -> ``Conditioning(labels=(B,) int64)``."""
        return Conditioning(labels=torch.tensor([self.class_id(p) for p in prompts], dtype=torch.long,
                                                device=self.device))

    def unet_kwargs(self, cond: Conditioning | torch.Tensor | None) -> dict[str, Any]:
        cond = as_conditioning(cond)
        if cond is None or cond.labels is None:
            raise ValueError("a class-conditional model needs class labels (encode_prompts([class name]))")
        return {"class_labels": cond.labels}

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The eps half (B, in_channels, h, w) of the output; the learned-variance half is dropped."""
        return output[:, : self.unet.config.in_channels]


def read_id2label(path: Path, transformer_dir: Path) -> dict[int, str]:
    """``id2label`` of model_index.json, else of the transformer's config.json ({} when neither has it)."""
    for f in (path / "model_index.json", transformer_dir / "config.json"):
        if f.is_file():
            found = json.loads(f.read_text()).get("id2label")
            if found:
                try:
                    return {int(k): str(v) for k, v in found.items()}
                except (ValueError, AttributeError) as e:
                    raise ModelLoadError(f"{f}: id2label must map class ids to labels ({e})") from e
    return {}


def load_dit_model(path: Path, sched_dir: Path, device: str | torch.device = "cpu") -> DiTModel:
    """Load a ``DiTPipeline`` directory (see module doc)."""
    from diffusers import DiTTransformer2DModel

    tr_dir, vae_dir = path / "transformer", path / "vae"
    for d, what in ((tr_dir, "DiTTransformer2DModel"), (vae_dir, "AutoencoderKL")):
        if not d.is_dir():
            raise ModelLoadError(f"{path} is a DiTPipeline without {d.name}/")
        _require_safetensors(d, what)
    try:
        transformer = DiTTransformer2DModel.from_pretrained(tr_dir, use_safetensors=True, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, local_files_only=True)
        scheduler = load_training_scheduler(sched_dir)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"could not load a DiT pipeline from {path}: {e}") from e
    out, inp = transformer.config.out_channels or transformer.config.in_channels, transformer.config.in_channels
    if out not in (inp, 2 * inp):
        raise ModelLoadError(f"{tr_dir}: out_channels {out} is neither in_channels {inp} nor twice it (learned variance)")
    for m in (transformer, vae):
        m.eval().requires_grad_(False).to(device)
    parts = {"transformer": _weight_files(tr_dir), "vae": _weight_files(vae_dir),
             "scheduler": [sched_dir / "scheduler_config.json"]}
    id2label = read_id2label(path, tr_dir)
    bad = [i for i in id2label if not 0 <= i < transformer.config.num_embeds_ada_norm]
    if bad:
        raise ModelLoadError(f"{path}: id2label names class {bad[0]}, outside 0-{transformer.config.num_embeds_ada_norm - 1}")
    return DiTModel(
        unet=transformer, scheduler=scheduler, path=path,
        checkpoint_hash=hash_components(path, [p for files in parts.values() for p in files]),
        vae=vae, vae_hash=hash_components(path, parts["vae"]), components=component_hashes(path, parts),
        id2label=id2label,
    )
