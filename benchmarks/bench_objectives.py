"""Cost of each training objective: featurize examples/s and one query step (K = 20) per objective.

For every model size (``tiny``: the tests' UNet2DModel, 1x8x8; ``mid``: a ~10 M-parameter
UNet2DModel (80, 160, 240), 3x32x32; random weights) and every objective (epsilon,
v_prediction, sample, flow), it saves a random pipeline with that objective's scheduler and
times, after one untimed warm-up, alternating the objectives within each round so that a shared machine's load hits
them alike (the fastest round counts):

* ``featurize``: :func:`attribution.features.featurize` of N random images into a fresh
  sjlt store (examples/s);
* ``query step``: :meth:`attribution.scoring.Scorer.score` of one mid-trajectory step
  with K = 20 noises (seconds; the trajectory is sampled outside the timer).

The objective changes only elementwise math around the same network call, so the
ratios to epsilon should be ~1.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_objectives.py --sizes tiny mid --repeats 2

Writes ``benchmarks/results/bench_objectives.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

OBJECTIVES = ("epsilon", "v_prediction", "sample", "flow")
#: size -> (image shape, block_out_channels, default N)
SIZES = {"tiny": ((1, 8, 8), (4, 8), 512), "mid": ((3, 32, 32), (80, 160, 240), 24)}
K = 20


def _dataset(shape: tuple[int, int, int], n: int):
    import numpy as np

    from attribution.data import ArrayDataset

    c, h, w = shape
    rng = np.random.default_rng(0)
    size = (n, h, w) if c == 1 else (n, h, w, c)
    return ArrayDataset(rng.integers(0, 256, size=size, dtype=np.uint8), name=f"random{c}x{h}x{w}[{n}]")


def time_objective(model, dataset, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one featurize of ``dataset`` and of one Eq. (3) query step, for one model."""
    from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
    from attribution.features import featurize
    from attribution.sampling import sample_trajectory
    from attribution.scoring import Scorer

    root = Path(tempfile.mkdtemp(dir=work))
    cfg = FeaturizeConfig(proj_dim=args.proj_dim, num_draws=args.num_draws)
    t0 = time.perf_counter()
    store = featurize([model], dataset, root / "store", cfg)
    featurize_s = time.perf_counter() - t0
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=args.num_steps, seed=0))
    scorer = Scorer(store, [model], "journey", QueryConfig(num_resamples=K))
    t0 = time.perf_counter()
    scorer.score(traj, [args.num_steps // 2])
    query_s = time.perf_counter() - t0
    shutil.rmtree(root)
    return {"featurize_s": featurize_s, "query_step_s": query_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="model sizes to measure")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES),
                   help="training objectives to measure")
    p.add_argument("--n", type=int, default=None, help="train examples featurized (default: 512 tiny, 24 mid)")
    p.add_argument("--num-draws", type=int, default=1, help="(timestep, noise) draws per train example")
    p.add_argument("--proj-dim", type=int, default=2048, help="projection dimension d of the sjlt store")
    p.add_argument("--num-steps", type=int, default=10, help="sampling steps of the query trajectory (its middle step is timed)")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the objectives; the fastest round of each counts")
    p.add_argument("--shift", type=float, default=3.0, help="sigma shift of the flow-matching scheduler")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "bench_objectives.json", help="JSON result file")
    args = p.parse_args(argv)

    import torch

    from attribution.models import load_model

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_objectives"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": common.machine_info(), "argv": sys.argv, "K": K, "sizes": {}}
    rows = []
    for size in args.sizes:
        shape, boc, n_default = SIZES[size]
        n = args.n or n_default
        dataset = _dataset(shape, n)
        models = {kind: load_model(common.save_random_pipeline(work / f"{size}-{kind}", shape, boc, 1, seed=0,
                                                               prediction=kind, shift=args.shift))
                  for kind in args.objectives}
        params = sum(v.numel() for v in next(iter(models.values())).unet.parameters())
        time_objective(next(iter(models.values())), dataset, work, args)  # warm-up (first calls, allocator), untimed
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for kind, model in models.items():
                t = time_objective(model, dataset, work, args)
                best[kind] = {k: min(v, best.get(kind, {}).get(k, float("inf"))) for k, v in t.items()}
        ref = best.get("epsilon", next(iter(best.values())))
        entry = {"image_shape": list(shape), "block_out_channels": list(boc), "num_params": params, "n": n,
                 "objectives": {}}
        for kind, t in best.items():
            ex_s = n / t["featurize_s"]
            entry["objectives"][kind] = {**t, "featurize_examples_per_s": ex_s,
                                         "featurize_ratio_to_epsilon": t["featurize_s"] / ref["featurize_s"],
                                         "query_ratio_to_epsilon": t["query_step_s"] / ref["query_step_s"]}
            e = entry["objectives"][kind]
            rows.append([size, f"{params / 1e6:.2f} M", kind, f"{ex_s:.1f}", f"{e['featurize_ratio_to_epsilon']:.2f}",
                         f"{t['query_step_s']:.3f}", f"{e['query_ratio_to_epsilon']:.2f}"])
        results["sizes"][size] = entry
    results["loadavg_at_end"] = list(__import__("os").getloadavg())
    results["table"] = common.print_table(rows, ["size", "params", "objective", "featurize ex/s", "time / epsilon",
                                                 f"query step (K={K}) s", "time / epsilon"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
