"""Timestep-anchored train features with matched query noises (a lower-variance journey-TRAK).

Algorithm 1 of journey-TRAK averages each train feature over (t, eps) draws from all of
[0, T), and Eq. (3) uses K fresh noises. Both are unbiased, but on the bundled digits the
variance they add buries the class signal (``benchmarks/class_signal_levers.py``). An
*anchored* store keeps the estimator (TRAK with the Eq. 3 output) and removes the two
sources of variance:

- for each anchor timestep a_j, a store of train features drawn at exactly a_j with D
  draws that every example shares (common random numbers):
  ``phi_{j,i} = P grad (1/D) sum_k L(theta; x_i, a_j, eps_{j,k})``;
- the query of a step at timestep t uses the anchor j nearest to t (in log(t + 5)) and
  evaluates Eq. (3) at its own timestep t with the anchor's D noises as its K noises:
  ``f_t = (1/D) sum_k || eps_{j,k} - eps_theta(sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_{j,k}, t) ||^2``
  for an epsilon model (the objective's noising and target otherwise, :mod:`attribution.models.objective`).

A step whose timestep is an anchor is then compared with every training example through
the same noises at the same noise level, so the ranking reflects x0_hat against x_i and
not the draws. Steps between anchors use the nearest anchor's features (the class signal
falls with the distance; ``benchmarks/anchored_features.py`` measures it).

Layout: ``root/anchors.json`` (format version, anchors, draws) and one ordinary store per
anchor, ``root/anchor_<a>/``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..config import FeaturizeConfig, QueryConfig
from ..data.datasets import ImageDataset
from ..features.featurize import draw_timesteps_and_noise, featurize, store_spec
from ..features.outputs import Method
from ..features.store import Store, StoreError
from ..models.base import DiffusionModel
from ..tools.files import atomic_write_bytes
from .masks import prepare_mask
from .scorer import Attribution, Scorer

if TYPE_CHECKING:  # annotations only (the sampling module imports diffusers)
    from ..sampling.trajectory import Trajectory

ANCHORS_FILE = "anchors.json"
FORMAT_VERSION = 1
Progress = Callable[[int, int], None]


def is_anchored(root: str | Path) -> bool:
    """Whether ``root`` holds an anchored store (an ``anchors.json``)."""
    return (Path(root) / ANCHORS_FILE).is_file()


def nearest_anchor(anchors: Sequence[int], timestep: int) -> int:
    """Index of the anchor nearest to ``timestep`` in log(t + 5) (ties: the smaller anchor)."""
    dist = [abs(math.log(a + 5) - math.log(int(timestep) + 5)) for a in anchors]
    return int(np.argmin(dist))


def anchor_config(base: FeaturizeConfig, anchor: int, index: int) -> FeaturizeConfig:
    """The featurize settings of anchor ``anchor`` (the ``index``-th): D shared draws at exactly that timestep."""
    return replace(base, timestep_range=(anchor, anchor + 1), draw_sharing="common",
                   draw_seed=base.draw_seed + index, timestep_sampling="uniform")


@dataclass(frozen=True)
class AnchoredStore:
    """An anchored store: its anchors (sorted timesteps) and one :class:`Store` per anchor."""

    root: Path
    anchors: tuple[int, ...]
    stores: tuple[Store, ...]

    @classmethod
    def open(cls, root: str | Path, models: list[DiffusionModel] | None = None,
             dataset: ImageDataset | None = None) -> "AnchoredStore":
        """Open ``root``; with ``models`` and ``dataset``, every anchor's store is checked against them."""
        root = Path(root)
        try:
            meta = json.loads((root / ANCHORS_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{root / ANCHORS_FILE} is unreadable: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{root} has anchored-store format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        anchors = tuple(int(a) for a in meta["anchors"])
        stores = []
        for j, a in enumerate(anchors):
            path = root / f"anchor_{a:04d}"
            spec = None
            if models is not None and dataset is not None:
                spec = store_spec(models, dataset, Store.open(path).config)
            store = Store.open(path, spec)
            cfg = store.config
            if cfg.timestep_range != (a, a + 1) or cfg.draw_sharing != "common":
                raise StoreError(f"{path} is not the store of anchor {a} (timestep_range {cfg.timestep_range}, "
                                 f"draw_sharing {cfg.draw_sharing!r})")
            stores.append(store)
        return cls(root, anchors, tuple(stores))

    def anchor_noises(self, j: int, image_shape: tuple[int, int, int], num_train_timesteps: int) -> torch.Tensor:
        """The D noises every train example of anchor j was drawn with: (D, C, H, W)."""
        return draw_timesteps_and_noise(np.array([0]), self.stores[j].config, num_train_timesteps, image_shape)[1][0]


def featurize_anchored(
    models: list[DiffusionModel],
    dataset: ImageDataset,
    root: str | Path,
    anchors: Sequence[int],
    base: FeaturizeConfig = FeaturizeConfig(num_draws=4),
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    **featurize_kwargs,
) -> AnchoredStore:
    """Featurize one store per anchor under ``root`` (each resumable) and write ``anchors.json`` last."""
    root = Path(root)
    anchors = sorted({int(a) for a in anchors})
    if not anchors:
        raise ValueError("an anchored store needs at least one anchor timestep")
    bad = [a for a in anchors if not 0 <= a < models[0].num_train_timesteps]
    if bad:
        raise ValueError(f"anchors {bad} lie outside the model's timesteps [0, {models[0].num_train_timesteps})")
    if is_anchored(root):
        meta = json.loads((root / ANCHORS_FILE).read_text())
        if [int(a) for a in meta["anchors"]] != anchors:
            raise StoreError(f"{root} holds anchors {meta['anchors']}, not {anchors}; use another directory")
    root.mkdir(parents=True, exist_ok=True)
    total = len(anchors) * len(models) * len(dataset)
    for j, a in enumerate(anchors):
        done = j * len(models) * len(dataset)
        log(f"anchor {a} ({j + 1}/{len(anchors)})")
        featurize(models, dataset, root / f"anchor_{a:04d}", anchor_config(base, a, j), log=log,
                  progress=(lambda d, t, done=done: progress(done + d, total)) if progress else None, **featurize_kwargs)
    meta = {"format_version": FORMAT_VERSION, "anchors": anchors, "num_draws": base.num_draws}
    atomic_write_bytes(root / ANCHORS_FILE, json.dumps(meta, indent=1).encode())
    return AnchoredStore.open(root)


class AnchorScorer(Scorer):
    """A :class:`Scorer` of one anchor's store whose Eq. (3) noises are the anchor's shared draws."""

    def __init__(self, anchored: AnchoredStore, j: int, models: list[DiffusionModel], method: str | Method,
                 query: QueryConfig, dataset: ImageDataset | None = None):
        super().__init__(anchored.stores[j], models, method, query, dataset=dataset)
        self.noises = anchored.anchor_noises(j, tuple(models[0].image_shape), models[0].num_train_timesteps)

    def step_noises(self, steps: Sequence[int], image_shape: tuple[int, int, int]) -> torch.Tensor:
        """The anchor's D noises for every step: (S, D, C, H, W)."""
        return self.noises[None].expand(len(steps), *self.noises.shape)


class AnchoredScorer:
    """Scores of an anchored store: each step is answered by its nearest anchor's :class:`AnchorScorer`.

    Offers :meth:`score` and :meth:`query_features` like :class:`Scorer`; the per-anchor scorers
    (kernels, projectors) are built on first use.
    """

    def __init__(self, anchored: AnchoredStore, models: list[DiffusionModel], method: str | Method = "journey",
                 query: QueryConfig = QueryConfig(), dataset: ImageDataset | None = None):
        self.anchored = anchored
        self.models = models
        self.query = query
        self.dataset = dataset
        self._method = method
        self._scorers: dict[int, AnchorScorer] = {}
        self.method = self.anchor_scorer(0).method

    @property
    def store(self) -> Store:
        """The first anchor's store (its manifest stands for the settings every anchor shares)."""
        return self.anchored.stores[0]

    def anchor_scorer(self, j: int) -> AnchorScorer:
        if j not in self._scorers:
            self._scorers[j] = AnchorScorer(self.anchored, j, self.models, self._method, self.query, self.dataset)
        return self._scorers[j]

    def anchor_of_steps(self, trajectory: Trajectory, steps: Sequence[int]) -> list[int]:
        """Anchor index of each step."""
        return [nearest_anchor(self.anchored.anchors, int(trajectory.timesteps[s])) for s in steps]

    def score(self, trajectory: Trajectory, steps: Sequence[int] | None = None,
              mask: torch.Tensor | np.ndarray | None = None, progress: Progress | None = None,
              prompt: str | None = None) -> Attribution:
        """Scores (S, N) of ``steps`` (default all), each from its nearest anchor."""
        steps = list(range(trajectory.num_steps)) if steps is None else [int(s) for s in steps]
        if any(s < 0 or s >= trajectory.num_steps for s in steps):
            raise ValueError(f"steps must lie in [0, {trajectory.num_steps})")
        mask_t = prepare_mask(mask, tuple(trajectory.x0_hat.shape[1:]), self.models[0])
        out = np.zeros((len(steps), self.anchored.stores[0].num_train), dtype=np.float32)
        which = self.anchor_of_steps(trajectory, steps)
        done = 0
        for j in sorted(set(which)):
            rows = [r for r, a in enumerate(which) if a == j]
            sc = self.anchor_scorer(j)
            feats = sc.query_features(trajectory, [steps[r] for r in rows], mask_t, prompt=prompt)
            out[rows] = sc.scores_from_features(feats)
            done += len(rows)
            if progress:
                progress(done, len(steps))
        return Attribution(scores=out, steps=np.asarray(steps), timesteps=trajectory.timesteps[steps].numpy(),
                           method=self.method.name)


def open_scorer(root: str | Path, models: list[DiffusionModel], method: str | Method = "journey",
                query: QueryConfig = QueryConfig(), dataset: ImageDataset | None = None,
                check: bool = True) -> Scorer | AnchoredScorer:
    """A scorer of the store at ``root``, anchored or not (``check``: the store must match models and data)."""
    if is_anchored(root):
        anchored = AnchoredStore.open(root, models if check else None, dataset if check else None)
        return AnchoredScorer(anchored, models, method, query, dataset)
    spec = store_spec(models, dataset, Store.open(root).config) if check and dataset is not None else None
    return Scorer(Store.open(root, spec), models, method, query, dataset=dataset)


def reference_store(root: str | Path) -> Store:
    """The store whose manifest describes ``root``: itself, or an anchored store's first anchor."""
    if is_anchored(root):
        anchors = json.loads((Path(root) / ANCHORS_FILE).read_text())["anchors"]
        return Store.open(Path(root) / f"anchor_{int(anchors[0]):04d}")
    return Store.open(root)


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """The model directories recorded in the store at ``root`` (anchored or not)."""
    store = reference_store(root)
    return [store.root / c["path"] for c in store.manifest["checkpoints"]]
