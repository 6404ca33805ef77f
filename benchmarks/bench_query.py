"""The query-time budget on the bundled default: all 50 steps (K = 20) vs the plain passes they need.

Loads the app's setting -- the bundled journey-TRAK store (``assets/store/journey``,
M = 3 checkpoints, N = 4,000, d = 2,048, sjlt) and its three DDPMs -- samples one
50-step trajectory and times, alternating within one process so that a shared
machine's load hits both alike:

* ``limit``: the plain batched forward+backward of the mean loss over the same
  50 x K rows per checkpoint (batches of 200 rows, parameters requiring grad);
* ``ours``: ``Scorer.score`` for all 50 steps (gradients, projection, the solve and
  the pass over Phi), split into query features and scoring;
* ``mask``: ``Scorer.score`` of one step with a new patch mask (three masks, median).

Usage::

    python benchmarks/bench_query.py --repeats 3 --threads 2

Writes ``benchmarks/results/bench_query.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

K, NUM_STEPS, ROWS_PER_CALL = 20, 50, 200


def limit_pass(models, traj, noises) -> float:
    """Seconds for the batched forward+backward over the S x k query rows (noises (S, k, C, H, W)) of every checkpoint."""
    import torch

    k = noises.shape[1]
    x0 = traj.x0_hat[:, None].expand(-1, k, -1, -1, -1).reshape(-1, *traj.x0_hat.shape[1:])
    t = traj.timesteps[:, None].expand(-1, k).reshape(-1)
    eps = noises.reshape(-1, *noises.shape[2:])
    t0 = time.perf_counter()
    for model in models:
        unet = model.unet.requires_grad_(True)
        ab = model.alphas_cumprod
        for s in range(0, x0.shape[0], ROWS_PER_CALL):
            unet.zero_grad(set_to_none=True)
            a = ab.index_select(0, t[s : s + ROWS_PER_CALL]).view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0[s : s + ROWS_PER_CALL] + (1 - a).sqrt() * eps[s : s + ROWS_PER_CALL]
            torch.nn.functional.mse_loss(unet(x_t, t[s : s + ROWS_PER_CALL]).sample, eps[s : s + ROWS_PER_CALL]).backward()
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=common.REPO / "assets" / "store" / "journey")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=common.RESULTS / "bench_query.json")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from attribution.config import QueryConfig, SamplingConfig
    from attribution.features import Store
    from attribution.models import load_models
    from attribution.sampling import sample_trajectory
    from attribution.scoring import Scorer, query_noises

    torch.set_num_threads(args.threads)
    store = Store.open(args.store)
    models = load_models([(args.store / c["path"]).resolve() for c in store.manifest["checkpoints"]])
    scorer = Scorer(store, models, "journey", QueryConfig(num_resamples=K))
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=NUM_STEPS, seed=0))
    noises = query_noises(range(NUM_STEPS), K, 0, tuple(traj.x0_hat.shape[1:]))
    h, w = traj.x0_hat.shape[-2:]
    scorer.score(traj, steps=[0])  # warm-up: oneDNN caches, kernel factor already done in __init__
    limit_pass(models[:1], traj, noises[:, :2])
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        busy0, self0 = common.cpu_busy_s(), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        t_wall = time.perf_counter()
        run: dict[str, Any] = {"limit_s": limit_pass(models, traj, noises)}
        t0 = time.perf_counter()
        feats = scorer.query_features(traj, range(NUM_STEPS))
        run["ours_features_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer.scores_from_features(feats)
        run["ours_scoring_s"] = time.perf_counter() - t0
        run["ours_all_steps_s"] = run["ours_features_s"] + run["ours_scoring_s"]
        masks = []
        for k, (r0, c0) in enumerate(((4, 6), (12, 10), (18, 3))):
            mask = np.zeros((h, w), dtype=np.float32)
            mask[r0 : r0 + 10, c0 : c0 + 12] = 1
            t0 = time.perf_counter()
            scorer.score(traj, steps=[20 + 10 * k], mask=mask)
            masks.append(time.perf_counter() - t0)
        run["one_step_new_mask_s"] = float(np.median(masks))
        run["ratio_ours_over_limit"] = run["ours_all_steps_s"] / run["limit_s"]
        wall = time.perf_counter() - t_wall
        self_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - self0
        run["others_busy_cores"] = round(max(0.0, ((common.cpu_busy_s() - busy0) - self_cpu) / wall), 2)
        runs.append(run)
        print(json.dumps(run), flush=True)
    best = {k: min(r[k] for r in runs) for k in runs[0] if k.endswith("_s")}
    result = {
        "machine": common.machine_info(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "store": str(args.store), "num_checkpoints": store.num_checkpoints, "num_train": store.num_train,
        "proj_dim": store.proj_dim, "K": K, "num_steps": NUM_STEPS, "threads": args.threads,
        "runs": runs, "best": best,
        "ratio_best_ours_over_best_limit": best["ours_all_steps_s"] / best["limit_s"],
        "ratio_per_run_median": float(np.median([r["ratio_ours_over_limit"] for r in runs])),
    }
    print(json.dumps({k: result[k] for k in ("best", "ratio_best_ours_over_best_limit", "ratio_per_run_median")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
