"""The LDS stages of the benchmark: queries, ground truth, stores, scores, LDS with settings
chosen on the validation split.

Results are plain dicts (JSON-ready); see :mod:`.report` for the tables and figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import FeaturizeConfig
from ..data.datasets import ArrayDataset
from ..features.outputs import get_method
from ..models.base import DiffusionModel
from ..models.load import load_models
from ..scoring.ekfac import EkfacConfig, fit_factors
from ..tools.files import atomic_save_npy
from .influence import influence_feature_cache
from .lds import lds, subset_bootstrap, summarize
from .queries import QuerySet, QuerySpec, load_or_generate_queries, step_outputs
from .scores import (
    SIMILARITY,
    build_store,
    gradient_scores,
    query_feature_cache,
    similarity_scores,
    store_name,
)
from .setup import BenchPaths

Log = Callable[[str], None]


@dataclass(frozen=True)
class SelectionGrid:
    """Settings tried on the validation queries (the best mean validation LDS is reported).

    Attributes:
        ridges: relative ridges (TRAK-type methods).
        num_draws: (timestep, noise) draws per train example (store variants).
        signs: orientation of the datamodel (+1 = the documented convention).
    """

    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    num_draws: tuple[int, ...] = (4, 16)
    signs: tuple[float, ...] = (1.0, -1.0)


def replicate_truths(
    paths: BenchPaths, queries: QuerySet, spec: QuerySpec, num_subsets: int, replicates: int = 1, log: Log = print,
    reverse: bool = False, compute: bool = True, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """True outputs (R, m', Q, S) of the subset models trained so far, cached one file per model.

    A subset is included only when all ``replicates`` of its models (training seeds) are done.
    ``reverse``: visit the models from the last (a second process then meets the first halfway).
    ``compute``: False uses only the cached truths (models without one are left out).
    ``device``: where the subset models run to compute a missing truth.

    Returns:
        (truths, subset indices they cover).
    """
    found: dict[int, list[np.ndarray]] = {}
    for j in (reversed(range(num_subsets)) if reverse else range(num_subsets)):
        rows = []
        for r in range(replicates):
            cache, model_dir = paths.truth_cache(j, r), paths.subset_model(j, r)
            if cache.exists():
                rows.append(np.load(cache, allow_pickle=False))
            elif model_dir.exists() and compute:
                out = step_outputs(load_models([model_dir], device)[0], queries, spec)
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_npy(cache, out)
                rows.append(out)
        if len(rows) == replicates:
            found[j] = rows
    done = sorted(found)
    if done:
        log(f"ground truth of {len(done)} subsets x {replicates} training seeds")
    if not done:
        return np.zeros((replicates, 0, queries.x0_hat.shape[0], len(spec.steps))), np.zeros(0, dtype=int)
    return np.stack([np.stack(found[j]) for j in done], axis=1), np.asarray(done, dtype=int)


def ground_truth(
    paths: BenchPaths, queries: QuerySet, spec: QuerySpec, num_subsets: int, log: Log = print, reverse: bool = False,
    compute: bool = True, replicates: int = 1, device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """True outputs (m', Q, S): :func:`replicate_truths` averaged over the training seeds."""
    truths, ids = replicate_truths(paths, queries, spec, num_subsets, replicates, log, reverse, compute, device)
    return truths.mean(axis=0), ids


def import_truth(path: Path, paths: BenchPaths, subsets: np.ndarray) -> int:
    """Write the per-model truth caches held by a report's ``truth.npz`` into ``paths`` (existing caches are kept).

    The file's ``truth_replicates`` (R, m, Q, S) (or ``truth`` (m, Q, S), one seed, in files written before
    replicates existed) must be for the same subset masks as ``subsets`` (m_all, N).

    Returns:
        How many cache files were written.
    """
    z = np.load(path, allow_pickle=False)
    truths = z["truth_replicates"] if "truth_replicates" in z.files else z["truth"][None]
    ids = z["subset_ids"]
    if ids.max(initial=-1) >= len(subsets) or not np.array_equal(z["subsets"], subsets[ids]):
        raise ValueError(f"{path} was computed for other subsets than {paths.root}")
    written = 0
    for r in range(truths.shape[0]):
        for row, j in enumerate(ids):
            cache = paths.truth_cache(int(j), r)
            if not cache.exists():
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_save_npy(cache, truths[r, row])
                written += 1
    return written


@dataclass
class LdsRun:
    """Inputs of the LDS evaluation, loaded once."""

    paths: BenchPaths
    models: list[DiffusionModel]
    dataset: ArrayDataset
    subsets: np.ndarray
    spec: QuerySpec
    queries: QuerySet
    base: FeaturizeConfig
    grid: SelectionGrid = field(default_factory=SelectionGrid)
    log: Log = print

    @classmethod
    def open(cls, paths: BenchPaths, checkpoint_dirs: Sequence[Path], dataset: ArrayDataset, subsets: np.ndarray,
             spec: QuerySpec, base: FeaturizeConfig, grid: SelectionGrid = SelectionGrid(), log: Log = print) -> "LdsRun":
        models = load_models(list(checkpoint_dirs))
        queries = load_or_generate_queries(paths.queries, models[0], spec)
        return cls(paths, models, dataset, subsets, spec, queries, base, grid, log)

    def store(self, output: str, num_draws: int, timestep_range: tuple[int, int] | None = None):
        from dataclasses import replace

        cfg = replace(self.base, output=output, num_draws=num_draws, timestep_range=timestep_range)
        t0 = time.perf_counter()
        st = build_store(self.paths.root, self.models, self.dataset, cfg, log=self.log)
        self.log(f"store {store_name(cfg)} ready ({time.perf_counter() - t0:.0f} s)")
        return st

    def candidate_scores(self, method: str, num_checkpoints: int | None = None) -> dict[tuple, np.ndarray]:
        """{(num_draws, ridge): scores (Q, S, N)} for every setting of the grid that applies to ``method``.

        ``num_checkpoints``: average only the first M checkpoints (default all; M ablation).
        """
        if method in SIMILARITY:
            return {(None, None): similarity_scores(method, self.dataset, self.queries, self.spec)}
        m = get_method(method)
        out = {}
        for d in self.grid.num_draws:
            store = self.store(m.train_output, d)
            if m.combine in ("ekfac", "kfac"):  # the damping changes the query features, one set per ridge
                fit_factors(store, self.models, self.dataset, EkfacConfig(), log=self.log)
                per_ridge = influence_feature_cache(self.paths.root, store, self.models, method, self.queries,
                                                    self.spec, tuple(self.grid.ridges), self.log)
                for r in self.grid.ridges:
                    out[(d, r)] = gradient_scores(store, self.models, method, per_ridge[r][:num_checkpoints], r,
                                                  self.dataset)
                continue
            feats = query_feature_cache(self.paths.root, store, self.models, method, self.queries, self.spec, self.log)
            ridges = self.grid.ridges if m.combine == "trak" else (None,)
            for r in ridges:
                # scores_from_features averages over the checkpoints whose query features it is given
                out[(d, r)] = gradient_scores(store, self.models, method, feats[:num_checkpoints],
                                              r if r is not None else 0.0, self.dataset)
        return out

    def evaluate(self, methods: Sequence[str], truth: np.ndarray, subset_ids: np.ndarray) -> tuple[dict, dict]:
        """LDS per step and method on the reported queries, settings chosen on the validation ones.

        Returns:
            (results by method (JSON-ready), {method: scores (Q_rep, S, N) of the chosen setting}).
        """
        results, chosen = {}, {}
        for method in methods:
            t0 = time.perf_counter()
            label = get_method(method).label if method not in SIMILARITY else f"{method} similarity"
            results[method], chosen[method] = self.select(method, label, self.candidate_scores(method), truth, subset_ids)
            results[method]["seconds"] = time.perf_counter() - t0  # scores included
        return results, chosen

    def crossfit(self, cands: dict[tuple, np.ndarray], masks: np.ndarray, truth: np.ndarray) -> float:
        """Overall LDS with the setting chosen on other subsets as well as other queries.

        The validation and reported queries share most of their truth (one subset's model is
        better or worse for every query), so choosing on the validation queries still fits the
        reported ones' subset noise. Here the subsets are split in two halves (even / odd
        rows); the setting chosen on the validation queries of one half is reported on the
        reported queries of the other half, and the two overall values are averaged.
        """
        val, rep = self.spec.split()
        halves = [np.arange(len(masks)) % 2 == 0, np.arange(len(masks)) % 2 == 1]
        out = []
        for fit, report in ((0, 1), (1, 0)):
            f, g = halves[fit], halves[report]
            _, key, sign = max((
                (summarize(lds(sc[val], masks[f], truth[f][:, val], sg)).overall, key, sg)
                for key, sc in cands.items() for sg in self.grid.signs
            ), key=lambda x: x[0])
            out.append(summarize(lds(cands[key][rep], masks[g], truth[g][:, rep], sign)).overall)
        return float(np.mean(out))

    def select(
        self, name: str, label: str, cands: dict[tuple, np.ndarray], truth: np.ndarray, subset_ids: np.ndarray
    ) -> tuple[dict, np.ndarray]:
        """Pick the (num_draws, ridge, sign) of ``cands`` with the best validation LDS; report it on the others.

        Args:
            cands: {(num_draws, ridge): scores (Q, S, N)} over all queries (validation and reported).
            truth: (m', Q, S) true outputs of the subset models ``subset_ids``.

        Returns:
            (JSON-ready result, scores (Q_rep, S, N) of the chosen setting).
        """
        t0 = time.perf_counter()
        val, rep = self.spec.split()
        masks = self.subsets[subset_ids]
        best = None
        selection = []
        for (d, r), scores in cands.items():
            for sign in self.grid.signs:
                v = summarize(lds(scores[val], masks, truth[:, val], sign)).overall
                selection.append({"num_draws": d, "ridge": r, "sign": sign, "val_lds": v})
                if best is None or v > best[0]:
                    best = (v, d, r, sign)
        _, d, r, sign = best
        values = lds(cands[(d, r)][rep], masks, truth[:, rep], sign)
        s = summarize(values)
        # the documented sign (+1) too, so a flipped convention is visible
        fixed = summarize(lds(cands[(d, r)][rep], masks, truth[:, rep], 1.0))
        boot = subset_bootstrap(cands[(d, r)][rep], masks, truth[:, rep], sign)
        crossfit = self.crossfit(cands, masks, truth)
        result = {
            "label": label,
            "num_draws": d, "ridge": r, "sign": sign,
            "mean": s.mean.tolist(), "se": s.se.tolist(), "overall": s.overall, "overall_se": s.overall_se,
            "overall_se_subsets": float(boot.std(ddof=1)), "bootstrap": boot.tolist(), "overall_crossfit": crossfit,
            "overall_sign_plus": fixed.overall,
            "per_query": values.tolist(),
            "selection": selection,
            "seconds": time.perf_counter() - t0,
        }
        self.log(f"LDS {name}: {s.overall:.3f} ± {s.overall_se:.3f} (queries) ± {boot.std(ddof=1):.3f} (subsets), "
                 f"cross-fitted {crossfit:.3f} (draws {d}, ridge {r}, sign {sign:+.0f})")
        return result, cands[(d, r)][rep]
