"""What a conditional denoiser is conditioned on, as one typed value.

A :class:`Conditioning` holds, for a batch of B examples, every input besides
(x_t, t) that a model family feeds its denoiser:

  * ``text`` (B, L, D): a text-encoder sequence (Stable Diffusion 1.x/2.x: CLIP's last
    hidden states; SDXL: the penultimate hidden states of both encoders, concatenated);
  * ``pooled`` (B, P): a pooled text embedding (SDXL: ``text_encoder_2``'s projection);
  * ``time_ids`` (B, 6): SDXL's micro-conditioning (original size, crop corner, target size);
  * ``labels`` (B,) int64: class ids of a class-conditional model (DiT);
  * ``guidance`` (B,) float: the guidance scale a guidance-distilled model takes as an input
    (FLUX-dev's guidance embedding): the sampling scale when sampling, the training value
    (:attr:`~attribution.models.objective.DiffusionObjective.train_guidance`) in the loss gradients.

Fields a family does not use are None. SD3 and FLUX put a T5 sequence in ``text`` and a pooled
CLIP vector in ``pooled``; FLUX's text and image position ids are rebuilt inside the model call
(they depend only on the shapes).

The value is a registered pytree, so ``torch.func.vmap`` maps over its tensors like over a
plain argument (``in_dims=0`` splits every present field along its first dimension).
A bare tensor given where a ``Conditioning`` is expected is read as ``text`` (:func:`as_conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch.utils import _pytree as pytree

#: The fields in their fixed order (also the pytree's child order).
FIELDS = ("text", "pooled", "time_ids", "labels", "guidance")


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of B examples (see module doc); every present field has the same first dimension B."""

    text: torch.Tensor | None = None  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P)
    time_ids: torch.Tensor | None = None  # (B, 6)
    labels: torch.Tensor | None = None  # (B,) int64
    guidance: torch.Tensor | None = None  # (B,) float

    def with_guidance(self, scale: float) -> "Conditioning":
        """The same conditioning with the guidance embedding set to ``scale`` for every example."""
        device = next(iter(self.present().values())).device
        return replace(self, guidance=torch.full((len(self),), float(scale), device=device))

    def present(self) -> dict[str, torch.Tensor]:
        """name -> tensor of the fields that are set, in :data:`FIELDS` order."""
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        """The same fields with ``fn`` applied to each present tensor."""
        return replace(self, **{k: fn(v) for k, v in self.present().items()})

    def __len__(self) -> int:
        """B, the number of examples (1 for a value broadcast to any batch)."""
        present = self.present()
        if not present:
            raise ValueError("an empty Conditioning has no batch size")
        return int(next(iter(present.values())).shape[0])

    def __getitem__(self, index: int | slice | torch.Tensor) -> "Conditioning":
        """Index every field along the batch dimension (an int drops it, as for a tensor)."""
        return self.map(lambda v: v[index])

    def to(self, device: torch.device | str) -> "Conditioning":
        """On ``device``; float fields as float32, labels as int64."""
        return replace(self, **{k: v.to(device, torch.long if k == "labels" else torch.float32)
                                for k, v in self.present().items()})

    def cpu(self) -> "Conditioning":
        return self.map(lambda v: v.cpu())

    def expand(self, batch: int) -> "Conditioning":
        """A batch of 1 (or ``batch``) broadcast to ``batch`` examples."""
        return self.map(lambda v: v.expand(batch, *v.shape[1:]))

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        """Each example repeated ``repeats`` times in place (B -> B * repeats), e.g. once per draw."""
        if dim != 0:
            raise ValueError("Conditioning repeats along the batch dimension only")
        return self.map(lambda v: v.repeat_interleave(repeats, 0))

    def per_draw(self, draws: int) -> "Conditioning":
        """One example's conditioning (fields without the batch dimension, as inside vmap) as a batch of ``draws``."""
        return self.map(lambda v: v[None].expand(draws, *v.shape))

    def allclose(self, other: "Conditioning", **kw) -> bool:
        a, b = self.present(), other.present()
        return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), **kw) for k in a)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate batches field by field; all parts must set the same fields."""
        keys = [tuple(p.present()) for p in parts]
        if len(set(keys)) != 1:
            raise ValueError(f"cannot concatenate conditionings with different fields: {sorted(set(keys))}")
        return Conditioning(**{k: torch.cat([p.present()[k] for p in parts]) for k in keys[0]})


def as_conditioning(cond: "Conditioning | torch.Tensor | None") -> Conditioning | None:
    """``cond`` as a :class:`Conditioning`: a bare (B, L, D) tensor is the text sequence (the SD 1.x form)."""
    if cond is None or isinstance(cond, Conditioning):
        return cond
    if isinstance(cond, torch.Tensor):
        return Conditioning(text=cond)
    raise TypeError(f"conditioning must be a Conditioning or a (B, L, D) tensor, not {type(cond).__name__}")


def _flatten(c: Conditioning):
    present = c.present()  # absent fields are no leaves: vmap's in_dims=0 must not meet a None
    return list(present.values()), tuple(present)


def _unflatten(children, names) -> Conditioning:
    return Conditioning(**dict(zip(names, children)))


pytree.register_pytree_node(
    Conditioning, _flatten, _unflatten,
    serialized_type_name="attribution.models.conditioning.Conditioning",
    flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey(k), v) for k, v in c.present().items()], tuple(c.present())),
)
