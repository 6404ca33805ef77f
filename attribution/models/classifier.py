"""Small plain-torch CNN digit classifier.

Used for feature-likelihood curves (class probabilities of generated digits) and as
an embedding-similarity baseline (penultimate-layer features). Inputs follow the
project convention: float32 ``(B, 1, 32, 32)`` in ``[-1, 1]``.

Weights are stored as ``model.safetensors`` plus ``config.json`` (never pickles).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.digits import REPO_ROOT, load_digit_arrays, to_model_tensor

CLASSIFIER_DIR: Path = REPO_ROOT / "assets" / "classifier"
WEIGHTS_NAME: str = "model.safetensors"
CONFIG_NAME: str = "config.json"
METRICS_NAME: str = "metrics.json"
ARCHITECTURE: str = "DigitClassifier"
FORMAT_VERSION: int = 1

DEFAULT_EPOCHS: int = 30
DEFAULT_BATCH_SIZE: int = 64
DEFAULT_LR: float = 2e-3
MAX_SHIFT: int = 2


class DigitClassifier(nn.Module):
    """Three conv blocks (conv3x3 + ReLU + maxpool 2) then an MLP head.

    Shapes: (B, 1, 32, 32) -> conv blocks -> (B, C3, 4, 4) -> flatten
    -> Linear -> ReLU -> embedding (B, embed_dim) -> Dropout -> Linear -> logits (B, 10).
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 48, 64),
        embed_dim: int = 96,
        num_classes: int = 10,
        dropout: float = 0.3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if image_size % 8 != 0:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.config: dict[str, Any] = {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "in_channels": 1,
            "image_size": int(image_size),
            "channels": [int(c) for c in channels],
            "embed_dim": int(embed_dim),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.fc = nn.Linear(c_in * side * side, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    @property
    def embed_dim(self) -> int:
        """Dimension F of :meth:`embed` features."""
        return int(self.config["embed_dim"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: (B, 1, 32, 32) -> (B, F), non-negative (post-ReLU)."""
        h = self.features(x).flatten(1)
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (B, 1, 32, 32) -> (B, 10)."""
        return self.head(self.dropout(self.embed(x)))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: (B, 1, 32, 32) -> (B, 10), rows sum to 1."""
        return torch.softmax(self.forward(x), dim=-1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift] in x and y.

    Args:
        x: (B, C, H, W); uncovered pixels are filled with background -1.

    Returns:
        (B, C, H, W) shifted copy.
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (offs[0][:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (offs[1][:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    bidx = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    progress: Callable[[float], None] | None = None,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` (Adam, one-cycle LR, random ±2 px shifts).

    Args:
        images: float32 (N, 1, 32, 32) in [-1, 1].
        labels: int64 (N,) in [0, 9].
        seed: seeds weight init, dropout (global torch RNG) and a torch.Generator
            used for shuffling and augmentation.
        progress: optional callback receiving the completed fraction in (0, 1].

    Returns:
        The trained model, in eval mode, on CPU.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    images = images.detach().to("cpu", torch.float32)
    labels = labels.detach().to("cpu", torch.int64)

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier(image_size=int(images.shape[-1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = images.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.2
    )

    model.train()
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = random_shift(images[idx], MAX_SHIFT, generator)
            loss = F.cross_entropy(model(xb), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress is not None:
                progress(step / total_steps)
    return model.eval()


@torch.no_grad()
def predict_labels(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Argmax predictions: (N, 1, 32, 32) -> int64 (N,). Uses eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = [
        model(images[i : i + batch_size].to(device)).argmax(dim=-1).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def evaluate_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions on (N, 1, 32, 32) images with (N,) labels."""
    preds = predict_labels(model, images)
    return float((preds == labels.cpu()).float().mean().item())


def _atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` on a temp file in ``path.parent``, then ``os.replace``."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(path, lambda name: Path(name).write_text(text, encoding="utf-8"))


def save_classifier(model: DigitClassifier, directory: Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` atomically into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(
        directory / WEIGHTS_NAME,
        lambda name: save_file(state, name, metadata={"architecture": ARCHITECTURE}),
    )
    _write_json(directory / CONFIG_NAME, dict(model.config))
    return directory


def load_classifier(directory: Path = CLASSIFIER_DIR, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier`, in eval mode on ``device``."""
    directory = Path(directory)
    weights_path, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    missing = [p.name for p in (weights_path, config_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"classifier directory {directory} lacks {', '.join(missing)}; build it with "
            "`python -m attribution.models.classifier`"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {config_path}: {exc}") from exc
    if config.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{config_path}: architecture {config.get('architecture')!r} != {ARCHITECTURE!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config.get('format_version')!r} != {FORMAT_VERSION}")
    if config.get("in_channels") != 1:
        raise ValueError(f"{config_path}: in_channels must be 1")
    try:
        model = DigitClassifier(
            channels=tuple(config["channels"]),
            embed_dim=config["embed_dim"],
            num_classes=config["num_classes"],
            dropout=config["dropout"],
            image_size=config["image_size"],
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{config_path}: incomplete or invalid config ({exc!r})") from exc
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {weights_path} do not match {config_path}: {exc}") from exc
    return model.to(device).eval()


def build_classifier(out_dir: Path = CLASSIFIER_DIR, seed: int = 0) -> dict[str, float]:
    """Train on the bundled train split, evaluate on heldout, save to ``out_dir``.

    Also writes ``metrics.json``. Returns ``{"heldout_accuracy", "train_seconds"}``.
    """
    out_dir = Path(out_dir)
    train_u8, train_y = load_digit_arrays("train")
    held_u8, held_y = load_digit_arrays("heldout")
    x_train, y_train = to_model_tensor(train_u8), torch.from_numpy(train_y)
    x_held, y_held = to_model_tensor(held_u8), torch.from_numpy(held_y)

    t0 = time.perf_counter()
    model = train_classifier(x_train, y_train, seed=seed)
    train_seconds = time.perf_counter() - t0
    accuracy = evaluate_accuracy(model, x_held, y_held)

    save_classifier(model, out_dir)
    metrics = {"heldout_accuracy": round(accuracy, 4), "train_seconds": round(train_seconds, 1)}
    _write_json(
        out_dir / METRICS_NAME,
        {
            **metrics,
            "seed": seed,
            "epochs": DEFAULT_EPOCHS,
            "n_train": int(x_train.shape[0]),
            "n_heldout": int(x_held.shape[0]),
            "num_parameters": count_parameters(model),
            "torch_threads": torch.get_num_threads(),
        },
    )
    return metrics


if __name__ == "__main__":
    print(build_classifier())
