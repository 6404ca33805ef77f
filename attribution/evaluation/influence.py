"""EK-FAC / K-FAC in the LDS benchmark: factors per store variant, query features per damping, cached.

The damping of ekfac / kfac is the relative ``ridge`` of the selection grid (lambda_m =
ridge * mean(Lambda_m), :mod:`attribution.scoring.ekfac`), chosen on the validation queries like
TRAK's ridge. Unlike TRAK's, it changes the query features (P (H + lambda I)^-1 grad f):
the Eq. (3) gradient of each (query, step) is computed once and preconditioned for every
ridge of the grid; the projected features are cached per ridge under ``features/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..features import Store, get_method, get_output, per_step_grads
from ..models import DiffusionModel
from ..scoring import ekfac, query_noises
from ..tools import atomic_save_npy
from .queries import QuerySet, QuerySpec
from .scores import gradient_scores

Log = Callable[[str], None]


def influence_feature_cache(
    root: Path,
    store: Store,
    models: list[DiffusionModel],
    method: str,
    queries: QuerySet,
    spec: QuerySpec,
    ridges: tuple[float, ...],
    log: Log = print,
) -> dict[float, np.ndarray]:
    """{ridge: (M, Q, S, d) float32} features (1/N) P_m (H_m + lambda I)^-1 grad f_s of ``method`` (ekfac | kfac)."""
    m_ = get_method(method)
    cfg = store.config
    base = f"{m_.combine}-{cfg.proj_kind}{cfg.proj_dim}-p{cfg.proj_seed}-d{cfg.num_draws}-K{spec.num_resamples}-n{spec.noise_seed}"
    paths = {r: root / "features" / f"{base}-r{r:g}.npy" for r in ridges}
    Q, S = queries.x0_hat.shape[0], len(spec.steps)
    out = {}
    for r, p in paths.items():
        if p.exists():
            f = np.load(p, allow_pickle=False)
            if f.shape[:3] == (len(models), Q, S):
                out[r] = f
    todo = [r for r in ridges if r not in out]
    if not todo:
        return out
    from ..features import checkpoint_projector, select_params

    manifest = ekfac.open_manifest(store, models)
    output = get_output(m_.query_output)
    feats = {r: np.zeros((len(models), Q, S, store.proj_dim), dtype=np.float32) for r in todo}
    steps = list(spec.steps)
    for mi, model in enumerate(models):
        params = select_params(model, cfg.param_filter)
        projector = checkpoint_projector(cfg, store.manifest["num_params"], mi, model.device, params)
        layout, _ = ekfac.tracked_layout(model, params)
        factors = ekfac.load_factors(store, manifest, mi, m_.combine)
        pre = {r: ekfac.KroneckerPreconditioner(layout, factors, r) for r in todo}
        for q in range(Q):
            traj = queries.trajectory(q, spec.num_inference_steps)
            noises = query_noises(steps, spec.num_resamples, spec.noise_seed, tuple(traj.x0_hat.shape[1:]))
            ts = traj.timesteps[steps][:, None].expand(-1, spec.num_resamples)
            g = per_step_grads(model, params, output, traj.x0_hat[steps], ts, noises)  # (S, p), Eq. (3)
            for r in todo:
                feats[r][mi, q] = projector.project(pre[r](g).to(g.device) / store.num_train).cpu().numpy()
            if (q + 1) % 10 == 0:
                log(f"{method} query features, checkpoint {mi}: {q + 1}/{Q}")
    for r in todo:
        paths[r].parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(paths[r], feats[r])
        out[r] = feats[r]
    return out
