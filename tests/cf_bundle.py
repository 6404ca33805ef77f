"""A tiny bundle whose checkpoints were trained by ``train_ddpm`` (so a counterfactual can replay them).

``root/m0, m1`` (1-2 epochs on 48 digits at 32x32, a 4-8 channel UNet), ``root/data.npz``,
``root/store`` (journey, d = 32): the layout of ``$ATTRIBUTION_BUNDLE`` (ui/launch.py). One
retraining takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_TRAIN = 48


def build_cf_bundle(root: Path, epochs: int = 2) -> Path:
    from attribution.config import FeaturizeConfig, TrainConfig
    from attribution.data import digits_dataset, load_dataset
    from attribution.features import featurize
    from attribution.models import load_models
    from attribution.models.training import train_ddpm

    if (root / "store" / "manifest.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    digits = digits_dataset()
    np.savez(root / "data.npz", images=digits.array[:NUM_TRAIN], labels=digits.labels[:NUM_TRAIN])
    ds = load_dataset(str(root / "data.npz"), (1, 32, 32))
    images = ds.images(np.arange(len(ds)))
    for s in (0, 1):
        train_ddpm(images, root / f"m{s}", TrainConfig(epochs=epochs, batch_size=16, seed=s, block_out_channels=(4, 8)))
    featurize(load_models([root / "m0", root / "m1"]), ds, root / "store",
              FeaturizeConfig(output="loss", proj_dim=32, num_draws=1, store_dtype="float32"))
    return root


def cf_bundle(root: Path):
    """The :class:`Bundle` of :func:`build_cf_bundle` (with the repository's digit classifier)."""
    from attribution.workspace import ASSETS_DIR, Bundle

    return Bundle(name="tiny counterfactual bundle", model_dirs=(root / "m0", root / "m1"), data=str(root / "data.npz"),
                  stores={"loss": root / "store"}, classifier_dir=ASSETS_DIR / "classifier")
