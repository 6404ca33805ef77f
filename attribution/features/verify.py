"""Recompute a few stored rows from the models and compare: the check that catches wrong settings.

Row checksums catch edited bytes and the settings binding
(:data:`attribution.features.store.BINDING_FILE`) catches an edited manifest, but a
store built before the binding existed can carry a manifest whose settings are not
those its rows were built with (an edited ``proj_seed``, a manifest from another
store), and every score from it is then unrelated to the real one. The only
evidence left is the rows themselves: recompute row i of checkpoint m exactly as
featurize did (:func:`attribution.features.featurize.example_rows`, same draws) with
the manifest's settings and compare it with the stored row.

``attribution doctor`` recomputes a few random rows of every checkpoint and, on a
mismatch, tries the usual edits of one setting to name the likely cause;
``attribution attribute`` recomputes one row per checkpoint before scoring (about
0.1 s per checkpoint on the bundled models).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from ..config import PROJECTION_KINDS, TIMESTEP_SAMPLINGS, TRAIN_OUTPUTS, FeaturizeConfig
from ..data.datasets import ImageDataset
from ..models.base import DiffusionModel
from .featurize import auto_chunk_size, checkpoint_projector, example_rows
from .gradients import GradientTarget, select_params
from .latents import LatentDataset, dataset_fingerprint
from .outputs import get_output
from .projection import Projector
from .store import Store, StoreError

#: Largest relative error ||stored - recomputed|| / ||stored|| of a matching row: float16 storage
#: rounds at ~5e-4, and another device or kernel order adds ~1e-3; a wrong setting gives ~1.
ROW_TOLERANCE = 0.02


@dataclass(frozen=True)
class RowCheck:
    """One recomputed row: checkpoint ``m``, example ``index``, and how far the stored row is from it."""

    m: int
    index: int
    rel_error: float
    cosine: float

    @property
    def ok(self) -> bool:
        return self.rel_error <= ROW_TOLERANCE


def _model_space_images(model: DiffusionModel, dataset: ImageDataset, indices: np.ndarray) -> torch.Tensor:
    """(B, C, H, W) train images ``indices`` in the space the UNet works in (latents encoded on the fly)."""
    if isinstance(dataset, LatentDataset):
        return dataset.latents[torch.as_tensor(indices)]
    x = dataset.images(indices)
    if model.is_latent:
        with torch.no_grad():
            return model.encode(x).float().cpu()
    return x


def recompute_rows(
    store: Store,
    models: Sequence[DiffusionModel],
    dataset: ImageDataset,
    m: int,
    indices: np.ndarray,
    config: FeaturizeConfig | None = None,
    projector: Projector | None = None,
) -> np.ndarray:
    """(B, d) float32 rows ``indices`` of checkpoint m recomputed with ``config`` (default: the store's)."""
    config = config or store.config
    model = models[m]
    params = select_params(model, config.param_filter)
    num_params = int(store.manifest["num_params"])
    if projector is None:
        projector = checkpoint_projector(config, num_params, m, model.device, params)
    target = GradientTarget(model, params, get_output(config.output))
    x0 = _model_space_images(model, dataset, indices)
    chunk = auto_chunk_size(num_params, config.num_draws)
    return example_rows(model, projector, target, x0, dataset, indices, config, chunk)


def _compare(stored: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(relative error, cosine) of one recomputed row against the stored one, both (d,)."""
    s, g = stored.astype(np.float64), got.astype(np.float64)
    ns, ng = float(np.linalg.norm(s)), float(np.linalg.norm(g))
    rel = float(np.linalg.norm(s - g)) / max(ns, 1e-30)
    cos = float(s @ g) / max(ns * ng, 1e-30)
    return rel, cos


def check_rows(
    store: Store,
    models: Sequence[DiffusionModel],
    dataset: ImageDataset,
    rows_per_checkpoint: int = 2,
    seed: int | None = None,
    projectors: Sequence[Projector] | None = None,
) -> list[RowCheck]:
    """Recompute ``rows_per_checkpoint`` random done rows of every checkpoint and compare them.

    ``projectors``: the store's projections when the caller has them (a Scorer), else built here.

    Raises:
        StoreError: the models or the dataset are not those of the store (recomputing would prove nothing).
    """
    if len(models) != store.num_checkpoints:
        raise StoreError(f"store has {store.num_checkpoints} checkpoints, {len(models)} models were given")
    for m, model in enumerate(models):
        if model.checkpoint_hash != store.manifest["checkpoints"][m]["hash"]:
            raise StoreError(f"model {model.path} is not checkpoint {m} of store {store.root} (weights differ)")
    if dataset_fingerprint(dataset, models[0]) != store.manifest["dataset"]["fingerprint"]:
        raise StoreError(f"the dataset {dataset.name!r} is not the one store {store.root} was built from")
    rng = np.random.default_rng(seed)
    out = []
    for m in range(store.num_checkpoints):
        done = np.flatnonzero(np.asarray(store.done(m)) == 1)
        if len(done) == 0:
            continue
        idx = np.sort(rng.choice(done, size=min(rows_per_checkpoint, len(done)), replace=False))
        got = recompute_rows(store, models, dataset, m, idx, projector=projectors[m] if projectors else None)
        for k, i in enumerate(idx):
            stored = store.read_rows(m, int(i), int(i) + 1)[0]
            out.append(RowCheck(m, int(i), *_compare(stored, got[k])))
    return out


def _candidates(config: FeaturizeConfig) -> list[tuple[str, Any]]:
    """Single-setting edits worth trying to explain a mismatch: (setting, the value to try)."""
    tries: dict[str, Sequence[Any]] = {
        "proj_seed": range(max(0, config.proj_seed - 2), config.proj_seed + 3),
        "sjlt_nnz": (1, 2, 4, 8) if config.proj_kind in ("sjlt", "block-sjlt") else (),
        "num_draws": (1, 2, 4, 8, 16),
        "output": TRAIN_OUTPUTS,
        "timestep_sampling": [t for t in TIMESTEP_SAMPLINGS if t != "auto"],
        "draw_seed": range(max(0, config.draw_seed - 1), config.draw_seed + 3),
        "draw_sharing": ("per-example", "common"),
        "proj_kind": [k for k in PROJECTION_KINDS if k in ("sjlt", "gaussian")],  # last: a dense projection is slow
    }
    current = config.to_dict() | {"draw_sharing": config.draw_sharing}
    return [(key, v) for key, values in tries.items() for v in values if v != current[key]]


def likely_cause(store: Store, models: Sequence[DiffusionModel], dataset: ImageDataset, bad: RowCheck) -> str | None:
    """The one-setting edit of the manifest that makes row ``bad`` match again, in words (None if none does).

    Tries each candidate of :func:`_candidates` on that one row (~0.1 s each on the bundled models).
    """
    stored = store.read_rows(bad.m, bad.index, bad.index + 1)[0]
    config = store.config
    for key, value in _candidates(config):
        try:
            trial = replace(config, **{key: value})
        except ValueError:
            continue
        got = recompute_rows(store, models, dataset, bad.m, np.array([bad.index]), trial)[0]
        if _compare(stored, got)[0] <= ROW_TOLERANCE:
            return (f"the rows match {key} = {value!r}, the manifest says {getattr(config, key)!r}: "
                    f"the manifest's {key} was edited")
    return None


def mismatch_message(store: Store, checks: Sequence[RowCheck], cause: str | None = None) -> str | None:
    """One line saying which recomputed rows differ from the stored ones and why (None when all match)."""
    bad = [c for c in checks if not c.ok]
    if not bad:
        return None
    worst = max(bad, key=lambda c: c.rel_error)
    settings = ", ".join(f"{k} {v!r}" for k, v in store.manifest["settings"].items() if v is not None)
    why = cause or ("the manifest's settings are not those the rows were built with (it was edited or "
                    "comes from another store)")
    return (f"store {store.root}: {len(bad)} of {len(checks)} recomputed row(s) differ from the stored ones "
            f"(checkpoint {worst.m} row {worst.index}: relative error {worst.rel_error:.2f}, cosine {worst.cosine:.3f}) "
            f"with the manifest's settings ({settings}): {why}; restore the original manifest.json or featurize a new store")


def spot_check(
    store: Store,
    models: Sequence[DiffusionModel],
    dataset: ImageDataset,
    projectors: Sequence[Projector] | None = None,
) -> None:
    """Recompute one random row per checkpoint before scoring; refuse the store when one differs.

    Raises:
        StoreError: a recomputed row differs (the message names the store and points to ``doctor``).
    """
    why = mismatch_message(store, check_rows(store, models, dataset, rows_per_checkpoint=1, projectors=projectors))
    if why is not None:
        raise StoreError(f"{why} (`attribution doctor --store {store.root}` names the likely cause)")
