"""Training sets behind one small interface, and safe image decoding.

A dataset gives images as float32 tensors (B, C, H, W) in [-1, 1] at the model's
size, plus optional integer labels and captions, and a fingerprint that
identifies its content in store manifests (captions are part of it when present).

Captions of an image folder come from a metadata file beside the images, in the
layout of diffusers' text-to-image training scripts (``datasets`` imagefolder):
``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line) or
``metadata.csv`` / ``captions.csv`` (header ``file_name,text``); ``file_name`` is
relative to the metadata file's folder, and the caption column is the first of
``text``, ``caption``, ``prompt`` present.

Conversion rule for image files (folders and uploads), stated once here:
  1. decode with Pillow, refusing files over ``MAX_PIXELS`` (decompression bombs);
  2. apply the EXIF orientation; flatten transparency onto black;
  3. convert to "L" for 1-channel models or "RGB" for 3-channel ones
     (16-bit and CMYK images are converted by Pillow's standard rules);
  4. resize the shorter side to the model's size (bicubic), then center-crop to
     H x W;
  5. map uint8 [0, 255] linearly to [-1, 1].
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .digits import load_digit_arrays

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FILES = ("metadata.jsonl", "metadata.csv", "captions.csv")
CAPTION_COLUMNS = ("text", "caption", "prompt")
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them
MAX_FILE_BYTES = 50 * 1024 * 1024
SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WebP"))
MAX_ASPECT_RATIO = 64  # scaling a 1 x 10^6 strip to the model's size would need gigabytes


class ImageDecodeError(ValueError):
    """An image file or upload cannot be used; the message says why."""


class ImageDataset(Protocol):
    """What the core needs of a training set."""

    name: str
    image_shape: tuple[int, int, int]
    labels: np.ndarray | None
    captions: list[str] | None

    def __len__(self) -> int: ...

    def images(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(B, C, H, W) float32 in [-1, 1]."""
        ...

    def fingerprint(self) -> str: ...


def uint8_to_model(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.array(images, copy=not images.flags.writeable or not images.flags.c_contiguous))
    if arr.ndim == 3:
        arr = arr[:, None]
    else:
        arr = arr.permute(0, 3, 1, 2)
    return arr.float().div_(127.5).sub_(1.0)


def model_to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) for display."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def pil_to_array(img: Image.Image, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Apply steps 2-4 of the conversion rule: PIL image -> uint8 (H, W, C)."""
    c, h, w = image_shape
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray((a / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    img = img.convert("L" if c == 1 else "RGB")
    scale = max(h / img.height, w / img.width)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_image(data: bytes | str | Path, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Decode an image file or upload under the conversion rule: -> (C, H, W) in [-1, 1].

    Raises:
        ImageDecodeError: not an image, truncated, too large, or an unusable mode.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ImageDecodeError(f"{path} is not a file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MB")
        data = path.read_bytes()
    if len(data) == 0:
        raise ImageDecodeError("the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageDecodeError(f"the file is larger than {MAX_FILE_BYTES >> 20} MB")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(
                    f"the image is {img.width}x{img.height} pixels, more than the limit of {MAX_PIXELS:,}; resize it first"
                )
            if min(img.width, img.height) < 1 or max(img.width, img.height) > MAX_ASPECT_RATIO * min(img.width, img.height):
                raise ImageDecodeError(
                    f"the image is {img.width}x{img.height} pixels: one side is more than {MAX_ASPECT_RATIO} times "
                    "the other; crop it first"
                )
            img.load()
            arr = pil_to_array(img, image_shape)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"the image declares more pixels than the limit of {MAX_PIXELS:,}; resize it first") from None
    except UnidentifiedImageError:
        kind = next((name for magic, name in SIGNATURES if data.startswith(magic)), None)
        if kind is not None:
            raise ImageDecodeError(f"the image could not be decoded: the file starts like a {kind} but is truncated or corrupt") from None
        raise ImageDecodeError("the file is not an image Pillow can read (PNG, JPEG, WebP, BMP ...)") from None
    except MemoryError:
        raise ImageDecodeError("the image needs more memory to decode than is available; resize it first") from None
    except Exception as e:  # Pillow's decoders raise many types on malformed input (found by fuzzing)
        raise ImageDecodeError(f"the image could not be decoded: {' '.join(str(e).split()) or type(e).__name__}") from None
    return uint8_to_model(arr[None])[0]


@dataclass
class ArrayDataset:
    """Images held in memory as uint8 (N, H, W) or (N, H, W, C)."""

    array: np.ndarray
    labels: np.ndarray | None = None
    captions: list[str] | None = None
    name: str = "array"
    class_names: list[str] | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.array.dtype != np.uint8 or self.array.ndim not in (3, 4):
            raise ValueError("ArrayDataset needs uint8 images of shape (N, H, W) or (N, H, W, C)")
        if self.labels is not None and len(self.labels) != len(self.array):
            raise ValueError("labels and images differ in length")
        if self.captions is not None and len(self.captions) != len(self.array):
            raise ValueError("captions and images differ in length")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        n, h, w = self.array.shape[:3]
        return (1 if self.array.ndim == 3 else self.array.shape[3], h, w)

    def __len__(self) -> int:
        return len(self.array)

    def images(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        return uint8_to_model(self.array[np.asarray(indices, dtype=np.int64)])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(str(self.array.shape).encode())
            h.update(np.ascontiguousarray(self.array).tobytes())
            if self.captions is not None:  # absent captions keep the old fingerprints
                h.update(json.dumps(list(self.captions)).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def image_folder_dataset(root: str | Path, image_shape: tuple[int, int, int], name: str | None = None) -> ArrayDataset:
    """All images under ``root`` (recursive, sorted by relative path), converted by the rule above.

    Labels: when every image sits in a first-level subfolder, the subfolder names
    (sorted) become integer labels and ``class_names``. Captions: from the metadata
    files described in the module doc (every image must then have one).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    arrays = []
    for p in files:
        try:
            arrays.append(pil_to_array_from_file(p, image_shape))
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{p}: {e}") from None
    rel = [p.relative_to(root) for p in files]
    labels = class_names = None
    if all(len(r.parts) == 2 for r in rel):
        class_names = sorted({r.parts[0] for r in rel})
        labels = np.array([class_names.index(r.parts[0]) for r in rel], dtype=np.int64)
    arr = np.stack(arrays)
    if image_shape[0] == 1:
        arr = arr[..., 0]
    captions = read_captions(root, files)
    return ArrayDataset(arr, labels=labels, captions=captions, name=name or str(root), class_names=class_names)


def example_class_names(dataset: ImageDataset, indices: Sequence[int] | np.ndarray) -> list[str]:
    """The class name of each example ``indices``: the name of the subfolder its image sits in.

    Raises:
        ValueError: the dataset has no class subfolders.
    """
    labels, names = dataset.labels, getattr(dataset, "class_names", None)
    if labels is None or names is None:
        raise ValueError(f"{dataset.name} has no classes: a class-conditional model needs its training images "
                         f"in one subfolder per class, named by the class (e.g. 'tabby cat/0001.png')")
    return [names[int(labels[int(i)])] for i in indices]


def _caption_rows(meta: Path) -> list[dict[str, str]]:
    """Rows of one metadata file (jsonl or csv) as dicts."""
    text = meta.read_text(encoding="utf-8-sig")
    if meta.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{meta} line {n} is not valid JSON: {e}") from None
        return rows
    return list(csv.DictReader(io.StringIO(text)))


def read_captions(root: Path, files: Sequence[Path]) -> list[str] | None:
    """Captions of ``files`` from the metadata files under ``root`` (None when there are none).

    Raises:
        ValueError: a metadata row without file name or caption, naming no image
            found, or an image without a caption.
    """
    metas = sorted(p for p in root.rglob("*") if p.name in CAPTION_FILES and p.is_file())
    if not metas:
        return None
    by_path: dict[Path, str] = {}
    sources = []
    for meta in metas:
        rows = _caption_rows(meta)
        if not any(c in row for row in rows for c in CAPTION_COLUMNS):
            continue  # metadata without captions (e.g. only labels): not ours
        sources.append(meta)
        for row in rows:
            col = next((c for c in CAPTION_COLUMNS if c in row and row[c] is not None), None)
            if "file_name" not in row or col is None:
                raise ValueError(f"{meta}: every row needs 'file_name' and one of {CAPTION_COLUMNS}; got {sorted(row)}")
            by_path[(meta.parent / row["file_name"]).resolve()] = str(row[col])
    if not sources:
        return None
    wanted = {p.resolve() for p in files}
    unknown = [p for p in by_path if p not in wanted]
    if unknown:
        raise ValueError(f"caption metadata names {len(unknown)} image(s) not found under {root}, e.g. {unknown[0]}")
    missing = [p for p in files if p.resolve() not in by_path]
    if missing:
        raise ValueError(f"{len(missing)} image(s) under {root} have no caption in {sources[0].name}, e.g. {missing[0]}")
    return [by_path[p.resolve()] for p in files]


def pil_to_array_from_file(path: Path, image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one file under the conversion rule -> uint8 (H, W, C)."""
    x = decode_image(path, image_shape)
    return model_to_uint8(x[None])[0]


def digits_dataset(split: str = "train") -> ArrayDataset:
    """The bundled MNIST digits, padded to 32 x 32 (see :mod:`attribution.data.digits`)."""
    images, labels = load_digit_arrays(split)
    padded = np.zeros((len(images), 32, 32), dtype=np.uint8)
    padded[:, 2:30, 2:30] = images
    return ArrayDataset(
        padded, labels=labels, name=f"digits:{split}", class_names=[str(i) for i in range(10)]
    )


def load_dataset(spec: str, image_shape: tuple[int, int, int] | None = None) -> ArrayDataset:
    """``"digits"``, ``"digits:heldout"``, an image folder, or an ``.npz`` with ``images`` (+ ``labels``)."""
    if spec == "digits" or spec.startswith("digits:"):
        return digits_dataset(spec.split(":", 1)[1] if ":" in spec else "train")
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z.files else None
            return ArrayDataset(z["images"], labels=labels, name=str(path))
    if path.is_dir():
        if image_shape is None:
            raise ValueError("an image folder needs the model's image shape to convert its images")
        return image_folder_dataset(path, image_shape)
    raise FileNotFoundError(f"dataset {spec!r} is neither 'digits', an .npz file nor an image folder")
