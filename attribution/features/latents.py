"""Training sets in a latent model's space: VAE latents computed once and cached.

A :class:`LatentDataset` wraps an image dataset for a latent model: its
``images(indices)`` are the (B, C, h, w) latents of the images (so the gradient
code needs no special case), ``captions``/``labels`` are the wrapped dataset's,
and its fingerprint combines the image fingerprint with the VAE hash. Latents
are deterministic (the mean of the VAE posterior, scaled) and computed in one
pass; with a cache directory they are also saved as
``latents-<fingerprint[:20]>.npy`` and read back next time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.datasets import ImageDataset, example_class_names
from ..models.base import DiffusionModel

Progress = Callable[[int, int], None]


def latent_fingerprint(image_fingerprint: str, vae_hash: str) -> str:
    """Fingerprint of the latents of a dataset: sha256 of the image fingerprint and the VAE hash."""
    return hashlib.sha256(f"latents|{image_fingerprint}|{vae_hash}".encode()).hexdigest()


@dataclass
class LatentDataset:
    """Latents (N, C, h, w) float32 of an image dataset, with its captions and labels.

    Attributes:
        latents: (N, C, h, w) float32 on the CPU.
        base: the wrapped image dataset (pixels, for display and pixel baselines).
        vae_hash: hash of the VAE that made the latents.
    """

    latents: torch.Tensor
    base: ImageDataset
    vae_hash: str

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def labels(self) -> np.ndarray | None:
        return self.base.labels

    @property
    def captions(self) -> list[str] | None:
        return self.base.captions

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.base, "class_names", None)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The latent shape (C, h, w)."""
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        return self.base.image_shape

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def images(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(B, C, h, w) latents of examples ``indices``."""
        return self.latents[torch.as_tensor(np.asarray(indices, dtype=np.int64))]

    def pixel_images(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] of examples ``indices``."""
        return self.base.images(indices)

    def fingerprint(self) -> str:
        return latent_fingerprint(self.base.fingerprint(), self.vae_hash)


def encode_dataset(
    dataset: ImageDataset,
    model: DiffusionModel,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> LatentDataset:
    """Latents of ``dataset`` under ``model``'s VAE, read from / written to ``cache_dir`` when given.

    Raises:
        ValueError: the model is not latent, or the images are not at its pixel size.
    """
    if not model.is_latent:
        raise ValueError(f"{model.path} is a pixel-space model; it needs no latents")
    if tuple(dataset.image_shape) != model.pixel_shape:
        raise ValueError(f"dataset images are {dataset.image_shape} but the VAE takes {model.pixel_shape}")
    vae_hash = model.vae_hash  # type: ignore[attr-defined]
    fp = latent_fingerprint(dataset.fingerprint(), vae_hash)
    shape = (len(dataset), *model.image_shape)
    path = Path(cache_dir) / f"latents-{fp[:20]}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        arr = np.load(path, allow_pickle=False)
        if arr.shape == shape and arr.dtype == np.float32:
            return LatentDataset(torch.from_numpy(arr), dataset, vae_hash)
    out = torch.empty(shape, dtype=torch.float32)
    for start in range(0, len(dataset), batch_size):
        idx = np.arange(start, min(start + batch_size, len(dataset)))
        out[idx] = model.encode(dataset.images(idx)).float().cpu()
        if progress:
            progress(int(idx[-1]) + 1, len(dataset))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
        np.save(tmp, out.numpy())
        os.replace(tmp, path)
    return LatentDataset(out, dataset, vae_hash)


def model_space_dataset(
    dataset: ImageDataset, model: DiffusionModel, cache_dir: str | Path | None = None
) -> ImageDataset:
    """``dataset`` in the space the UNet works in: as is for pixel models (or when already
    latent), else its :func:`encode_dataset` latents."""
    if not model.is_latent or isinstance(dataset, LatentDataset):
        return dataset
    return encode_dataset(dataset, model, cache_dir)


def dataset_fingerprint(dataset: ImageDataset, model: DiffusionModel) -> str:
    """The fingerprint of ``dataset`` in ``model``'s space, without encoding anything; for a class-conditional
    model it also covers the class id of every example (its subfolder's name, read through the model's labels)."""
    if model.is_latent and not isinstance(dataset, LatentDataset):
        fp = latent_fingerprint(dataset.fingerprint(), model.vae_hash)  # type: ignore[attr-defined]
    else:
        fp = dataset.fingerprint()
    if model.is_class_conditional:
        ids = [model.class_id(n) for n in example_class_names(dataset, np.arange(len(dataset)))]  # type: ignore[attr-defined]
        fp = hashlib.sha256(f"classes|{fp}|{ids}".encode()).hexdigest()
    return fp
