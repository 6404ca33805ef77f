"""Bundles: where a workspace's models, training data, stores and classifier live.

:func:`default_bundle` is the embedded digits ensemble under ``assets/`` (``$ATTRIBUTION_ASSETS``);
:func:`custom_bundle` a user's own model, data and store. Stores a workspace builds and cached
latents go under ``$ATTRIBUTION_CACHE`` (default ``~/.cache/attribution``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import FeaturizeConfig

__all__ = ["ASSETS_DIR", "Bundle", "CACHE_DIR", "DTRAK_STORE_OUTPUTS", "custom_bundle", "default_bundle"]

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = Path(os.environ.get("ATTRIBUTION_ASSETS", REPO_ROOT / "assets"))
CACHE_DIR = Path(os.environ.get("ATTRIBUTION_CACHE", Path.home() / ".cache" / "attribution"))


@dataclass(frozen=True)
class Bundle:
    """Where a workspace's pieces live.

    Attributes:
        model_dirs: the ensemble; the first model generates samples.
        data: dataset spec for :func:`attribution.data.datasets.load_dataset`.
        stores: train-output name -> store directory (``"loss"`` serves journey-TRAK,
            TracIn and ReTrac; ``"square"`` etc. the D-TRAK variants).
        classifier_dir: digit-style classifier for curves and the embedding baseline.
        featurize: settings used when a missing store is built.
        lora_dirs: trained LoRA weights loaded into the models (one, or one per model;
            see :func:`attribution.models.lora.load_lora`).
        clip_dir: a local CLIP model for text-label curves (and the embedding baseline
            when there is no classifier).
        roots: directories the workspace may write in (stores it builds, cached
            latents); empty: no restriction (library use). The app's bundles set them.
    """

    name: str
    model_dirs: tuple[Path, ...]
    data: str
    stores: dict[str, Path]
    classifier_dir: Path | None = None
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    lora_dirs: tuple[Path, ...] = ()
    clip_dir: Path | None = None
    roots: tuple[Path, ...] = ()


def default_bundle() -> Bundle:
    """The bundled digits ensemble (see ``assets/README`` and ``attribution build-assets``)."""
    cfg = FeaturizeConfig()
    return Bundle(
        name="Bundled MNIST digits (3 tiny DDPMs)",
        model_dirs=tuple(ASSETS_DIR / "ensemble" / f"ddpm-seed{s}" for s in range(3)),
        data="digits",
        stores={
            "loss": ASSETS_DIR / "store" / "journey",
            **{o: CACHE_DIR / "stores" / f"digits-{o}" for o in ("square", "l1", "l2", "mean")},
        },
        classifier_dir=ASSETS_DIR / "classifier",
        featurize=cfg,
        roots=(ASSETS_DIR, CACHE_DIR),
    )


DTRAK_STORE_OUTPUTS = ("square", "l1", "l2", "mean")


def custom_bundle(
    model_dirs: Sequence[str | Path],
    data: str | Path,
    store: str | Path,
    lora_dirs: Sequence[str | Path] = (),
    clip_dir: str | Path | None = None,
    name: str | None = None,
) -> Bundle:
    """A bundle of a user's own models, training data and store directory.

    The journey store is ``store``; the D-TRAK stores go beside it (``<store>-square``, ...).
    Settings for stores built later are read from ``store``'s manifest when it exists, else
    the defaults, differentiating only the adapter (``re:lora_``) when LoRA weights are given.
    """
    store = Path(store)
    manifest = store / "manifest.json"
    if manifest.exists():
        cfg = FeaturizeConfig.from_dict(json.loads(manifest.read_text())["settings"])
    else:
        cfg = FeaturizeConfig(param_filter=("re:lora_",) if lora_dirs else None)
    return Bundle(
        name=name or f"Your model {Path(model_dirs[0]).name}/ on {Path(data).name}/",
        model_dirs=tuple(Path(d) for d in model_dirs),
        data=str(data),
        stores={"loss": store, **{o: store.with_name(f"{store.name}-{o}") for o in DTRAK_STORE_OUTPUTS}},
        classifier_dir=None,
        featurize=cfg,
        lora_dirs=tuple(Path(d) for d in lora_dirs),
        clip_dir=Path(clip_dir) if clip_dir is not None else None,
        roots=(store.parent, CACHE_DIR),
    )
