"""The benchmark set-up: a fixed training subset of the bundled digits, its random 50 % subsets,
and the directory layout where models and cached outputs live.

Everything is a pure function of :class:`BenchConfig`, so a rerun finds (and skips) what
exists. Layout under the work directory ``root``::

    config.json            the BenchConfig (a rerun with other settings is refused)
    train.npz              images uint8 (N, s, s) + labels: the benchmark's training set
    subsets.npy            bool (m, N): subset j keeps the rows where it is True
    masks/subset_XXX.npy   the same masks one per file (for ``attribution train --subset-mask``)
    models/full_sK         full-data checkpoints (K = training seed), used for attribution
    models/subset_XXX      one retrained model per subset (training seed ``subset_train_seed``)
    models/subset_XXX_rR   replicate R >= 1 of it (training seed ``subset_train_seed + R``)
    truth/subset_XXX[_rR].npy  the cached ground truth of each of these models
    models/cf_*            counterfactual retrainings (see :mod:`.counterfactual`)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TrainConfig
from ..data.datasets import ArrayDataset, digits_dataset
from .designs import SUBSET_DESIGNS, classifier_embeddings, design_subsets, stratified_choice

#: Methods compared in the LDS table (store methods by name, then similarity baselines); here, not in
#: :mod:`.run`, so that building the CLI's parser imports no model code.
LDS_METHODS = (
    "journey", "trak-final", "tracin", "retrac",
    "dtrak-square", "dtrak-l1", "dtrak-l2", "dtrak-mean", "das", "das-leverage",
    "pixel", "embedding",
) + (("ekfac", "kfac") if find_spec("kronfluence") else ())  # the optional `ekfac` extra


def _default_train() -> TrainConfig:
    # 40 epochs of a 2-level UNet on 16x16 digits: ~20 s on one idle core, recognizable digits.
    return TrainConfig(epochs=40, batch_size=64, lr=4e-3, ema_decay=0.98, block_out_channels=(16, 32))


@dataclass(frozen=True)
class BenchConfig:
    """Size and seeds of the benchmark.

    Attributes:
        num_train: N, training examples taken from the bundled digits (stratified by class).
        image_size: side of the images (the 32x32 padded digits are average-pooled to it).
        data_seed: seed of the choice of the N examples.
        num_subsets: m, random subsets for the LDS.
        subset_fraction: fraction kept per subset (per class: exactly for ``stratified``, in
            expectation for ``dirichlet``).
        subset_seed: seed of the subsets.
        subset_train_seed: training seed of every subset model (one model per subset).
        subset_coupled: subset models replay the full-data run of their training seed without
            the rows outside the subset (same shuffling, timesteps, noises; ``train_ddpm(coupled=True)``),
            so the truth measures the subset's data alone, not a new random stream.
        checkpoint_seeds: training seeds of the full-data checkpoints used for attribution.
        train: the training recipe shared by every model.
        subset_design: ``stratified`` (fixed class make-up: within-class effects only),
            ``dirichlet`` (class proportions drawn from a Dirichlet) or ``groups`` (leave one
            class or style cluster out); see :mod:`.designs`.
        dirichlet_alpha: concentration of the ``dirichlet`` design (smaller: more uneven subsets).
        clusters_per_class: style clusters per class of the ``groups`` design.
    """

    num_train: int = 500
    image_size: int = 16
    data_seed: int = 0
    num_subsets: int = 64
    subset_fraction: float = 0.5
    subset_seed: int = 0
    subset_train_seed: int = 0
    subset_coupled: bool = False
    checkpoint_seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainConfig = field(default_factory=_default_train)
    subset_design: str = "stratified"
    dirichlet_alpha: float = 1.0
    clusters_per_class: int = 2

    def __post_init__(self) -> None:
        if self.num_train < 20 or self.num_subsets < 2:
            raise ValueError("the benchmark needs num_train >= 20 and num_subsets >= 2")
        if not 0 < self.subset_fraction < 1:
            raise ValueError("subset_fraction must lie in (0, 1)")
        if 32 % self.image_size:
            raise ValueError("image_size must divide 32")
        if self.subset_design not in SUBSET_DESIGNS:
            raise ValueError(f"unknown subset design {self.subset_design!r}; choose one of {SUBSET_DESIGNS}")
        object.__setattr__(self, "checkpoint_seeds", tuple(self.checkpoint_seeds))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint_seeds"] = list(self.checkpoint_seeds)
        d["train"]["block_out_channels"] = list(self.train.block_out_channels)
        # written only when set: benchmarks prepared before these options existed still match
        if not self.subset_coupled:
            del d["subset_coupled"]
        if self.subset_design == "stratified":
            for key in ("subset_design", "dirichlet_alpha", "clusters_per_class"):
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchConfig":
        d = dict(d)
        t = dict(d.pop("train"))
        t["block_out_channels"] = tuple(t["block_out_channels"])
        return cls(train=TrainConfig(**t), **{**d, "checkpoint_seeds": tuple(d["checkpoint_seeds"])})

    def replicate_seed(self, replicate: int) -> int:
        """Training seed of replicate ``replicate`` of every subset model (0 = the original model)."""
        return self.subset_train_seed + replicate


def pool_digits(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 32, 32) -> uint8 (N, size, size) by average pooling (rounded)."""
    f = 32 // size
    n = len(images)
    pooled = images.reshape(n, size, f, size, f).astype(np.float32).mean(axis=(2, 4))
    return np.round(pooled).astype(np.uint8)


def bench_dataset(config: BenchConfig) -> ArrayDataset:
    """The benchmark's training set: N digits of the bundled train split, stratified, pooled."""
    full = digits_dataset("train")
    rng = np.random.default_rng(config.data_seed)
    keep = stratified_choice(full.labels, config.num_train / len(full), rng)
    idx = np.flatnonzero(keep)
    images = pool_digits(full.array[idx], config.image_size)
    return ArrayDataset(images, labels=full.labels[idx], name=f"digits-bench{config.num_train}x{config.image_size}",
                        class_names=full.class_names)


def subset_masks(config: BenchConfig, dataset: ArrayDataset) -> np.ndarray:
    """(m, N) bool: the subsets S_j of the config's design (see :mod:`.designs`)."""
    return design_subsets(
        config.subset_design, dataset.labels, config.num_subsets, config.subset_fraction, config.subset_seed,
        alpha=config.dirichlet_alpha, clusters_per_class=config.clusters_per_class,
        embed=lambda: classifier_embeddings(dataset.array),
    )


def _subset_name(j: int, replicate: int) -> str:
    return f"subset_{j:03d}" + (f"_r{replicate}" if replicate else "")


@dataclass
class BenchPaths:
    """Where the benchmark's files live under ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "train.npz"

    @property
    def subsets(self) -> Path:
        return self.root / "subsets.npy"

    def mask(self, j: int) -> Path:
        return self.root / "masks" / f"subset_{j:03d}.npy"

    def checkpoint(self, seed: int) -> Path:
        return self.root / "models" / f"full_s{seed}"

    def subset_model(self, j: int, replicate: int = 0) -> Path:
        return self.root / "models" / _subset_name(j, replicate)

    def truth_cache(self, j: int, replicate: int = 0) -> Path:
        return self.root / "truth" / f"{_subset_name(j, replicate)}.npy"

    def store(self, name: str) -> Path:
        return self.root / "stores" / name

    @property
    def queries(self) -> Path:
        return self.root / "queries.npz"

    @property
    def truth(self) -> Path:
        return self.root / "truth.npz"


def prepare(root: str | Path, config: BenchConfig) -> tuple[BenchPaths, ArrayDataset, np.ndarray]:
    """Write (or check) the config, training set and subset masks under ``root``.

    Returns:
        (paths, dataset, subsets (m, N) bool).

    Raises:
        ValueError: ``root`` holds a benchmark made with other settings.
    """
    paths = BenchPaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    if paths.config.exists():
        old = json.loads(paths.config.read_text())
        if old != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"{paths.config} was made with other settings; use another --work directory")
    else:
        paths.config.write_text(json.dumps(config.to_dict(), indent=2))
    dataset = bench_dataset(config)
    if not paths.data.exists():
        np.savez(paths.data, images=dataset.array, labels=dataset.labels)
    if paths.subsets.exists():
        subsets = np.load(paths.subsets, allow_pickle=False)
    else:
        subsets = subset_masks(config, dataset)
        np.save(paths.subsets, subsets)
        for j, mask in enumerate(subsets):
            paths.mask(j).parent.mkdir(parents=True, exist_ok=True)
            np.save(paths.mask(j), mask)
    return paths, dataset, subsets


def load_prepared(root: str | Path) -> tuple[BenchConfig, BenchPaths, ArrayDataset, np.ndarray]:
    """Open a prepared benchmark: (config, paths, dataset, subsets)."""
    paths = BenchPaths(Path(root))
    if not paths.config.exists():
        raise FileNotFoundError(f"no benchmark under {root}; run `attribution bench prepare --work {root}` first")
    config = BenchConfig.from_dict(json.loads(paths.config.read_text()))
    _, dataset, subsets = prepare(root, config)
    return config, paths, dataset, subsets
