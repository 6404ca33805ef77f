"""Patch masks: built from a selection, hashed once, and brought to the model's grid.

A mask M (H, W) in [0, 1] at the pixel size users see weights the squared error of the
model output pixel-wise (Eq. 3 restricted to a patch); latent models get it area-averaged
onto the latent grid (:func:`prepare_mask`). :func:`mask_from_selection` is the one
constructor for every front end: the CLI makes a mask from an image file's pixels brighter
than mid-grey (:func:`mask_from_file`), the app a soft one from a painted canvas (each painted canvas pixel counts for
its share of the model pixel it falls in). :class:`PatchMask` carries a mask with its
hash, computed once, which names it in caches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.base import DiffusionModel

__all__ = ["PatchMask", "downsample_mask", "mask_from_file", "mask_from_selection", "mask_key", "prepare_mask"]

#: Cache key of "no mask" (the whole image).
FULL = "full"


def mask_from_selection(selected: np.ndarray, shape: tuple[int, int], soft: bool) -> np.ndarray | None:
    """A (H, W) float32 mask in [0, 1] from a selection (H', W') whose positive entries are selected.

    soft: each selected pixel counts for its area: the selection is box-averaged onto (H, W)
        (a canvas painted at a larger size). Else binary: 1 where selected, 0 elsewhere; the
        selection must already be (H, W) (an image decoded at the model's size).

    Returns None when nothing is selected.
    """
    picked = np.asarray(selected) > 0
    if not picked.any():
        return None
    h, w = shape
    if not soft:
        if picked.shape != (h, w):
            raise ValueError(f"a binary mask is taken at the model's size {(h, w)}, not {picked.shape}")
        return picked.astype(np.float32)
    small = Image.fromarray(picked.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def mask_from_file(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """A (H, W) float32 mask from an image file: its pixels brighter than mid-grey (gray level > 127 of 255,
    after conversion to grey) are selected.

    A file of another size but the same aspect ratio is box-averaged onto ``shape``
    (each model pixel weighted by the share of it selected) and a note says so; one
    of another aspect ratio is refused (it would have to be cropped).

    Returns:
        (mask, note): the note (None when the sizes agree) says how the mask was resized.

    Raises:
        ValueError: not a decodable image, another aspect ratio, or no pixel selected.
    """
    from ..data.datasets import decode_image

    path = Path(path)
    h, w = shape
    if not path.is_file():
        raise ValueError(f"mask {path} is not a file")
    try:
        with Image.open(path) as img:  # reads the header only
            fw, fh = img.size
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"mask {path} is not an image Pillow can read ({e})") from None
    if fw * h != fh * w:
        raise ValueError(f"mask {path} is {fw}x{fh} pixels but the model's images are {w}x{h}: a mask must have "
                         "the images' aspect ratio (it is never cropped); resize or repaint it")
    selected = decode_image(path, (1, fh, fw))[0].numpy() > 0  # (fh, fw): brighter than mid-grey
    mask = mask_from_selection(selected, (h, w), soft=(fh, fw) != (h, w))
    if mask is None:
        raise ValueError(f"mask {path} selects no pixel: paint the patch brighter than mid-grey (> 127 of 255)")
    note = None
    if (fh, fw) != (h, w):
        note = (f"mask {path.name} is {fw}x{fh} pixels, the model's images {w}x{h}: it was box-averaged onto "
                f"{w}x{h} (each pixel weighted by the share of it the mask selects)")
    return mask, note


@dataclass(frozen=True, eq=False)
class PatchMask:
    """A mask (H, W) float32 in [0, 1] and its cache key (hashed once, at construction)."""

    values: np.ndarray
    key: str

    @classmethod
    def of(cls, values: np.ndarray) -> "PatchMask":
        values = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        return cls(values, hashlib.sha256(values.tobytes()).hexdigest()[:16])


def mask_key(mask: "np.ndarray | PatchMask | None") -> str:
    """The cache key of a mask (``"full"`` for None); a :class:`PatchMask` brings its own."""
    if mask is None:
        return FULL
    if isinstance(mask, PatchMask):
        return mask.key
    return PatchMask.of(mask).key


def mask_values(mask: "np.ndarray | PatchMask | None") -> np.ndarray | None:
    """The array of a mask given either way."""
    return mask.values if isinstance(mask, PatchMask) else mask


def downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average a mask (1|C, H, W) onto a coarser (h, w) grid -> (1, h, w) in [0, 1].

    Each latent cell gets the mean of the mask over the pixels it covers (exact
    area average when H/h and W/w are integers, as for VAEs); channels are averaged.
    """
    return F.adaptive_avg_pool2d(mask.float().mean(0, keepdim=True)[None], size)[0]


def prepare_mask(
    mask: torch.Tensor | np.ndarray | None,
    image_shape: tuple[int, int, int],
    model: DiffusionModel | None = None,
) -> torch.Tensor | None:
    """A pixel mask (H, W) or (1|C, H, W) with values in [0, 1] -> float (1|C, H, W); None stays None.

    With a latent ``model`` (``model.is_latent``), a mask at the model's pixel size
    is area-averaged onto the latent grid ``image_shape[1:]`` (a mask already at
    the latent size is used as is).

    Raises:
        ValueError: wrong size, or a mask with no selected pixel.
    """
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.ndim == 2:
        m = m[None]
    if model is not None and model.is_latent and m.ndim == 3 and tuple(m.shape[-2:]) != tuple(image_shape[1:]):
        pc, ph, pw = model.pixel_shape
        if m.shape[-2:] != (ph, pw) or m.shape[0] not in (1, pc):
            raise ValueError(f"mask has shape {tuple(m.shape)}; expected ({ph}, {pw}) or (1, {ph}, {pw})")
        if float(m.max()) <= 0:
            raise ValueError("the mask selects no pixel; paint a region first")
        m = downsample_mask(m.clamp(0, 1), tuple(image_shape[1:]))
    c, h, w = image_shape
    if m.ndim != 3 or m.shape[-2:] != (h, w) or m.shape[0] not in (1, c):
        raise ValueError(f"mask has shape {tuple(m.shape)}; expected ({h}, {w}) or (1, {h}, {w})")
    if float(m.max()) <= 0:
        raise ValueError("the mask selects no pixel; paint a region first")
    return m.clamp(0, 1)
