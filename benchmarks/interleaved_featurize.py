"""Train-feature throughput of ours vs the batched forward+backward limit, interleaved in one process.

On a shared machine, separate processes see different loads; this script alternates
the three computations round by round on the same examples and draws, so each
round's ratios are measured under the same load:

* ``limit``: plain batched forward+backward of the mean loss (parameters requiring grad);
* ``factorized``: ``FactorizedProjector.project_examples`` (one batched pass with hooks);
* ``vmap+sjlt``: ``per_example_grads`` (torch.func vmap) then the sparse sketch;
* ``hooks+sjlt``: ``SparseSignProjector.example_features``, featurize's default path:
  one batched pass per chunk whose layer hooks form each layer's per-example gradients
  (convolutions by the grouped weight-gradient kernel or im2col) and project them at once;
  im2col layers hand their gradients over in cache-sized tiles of output rows;
* ``hooks+sjlt untiled``: the same with the same matrix cut into a fixed grid of column blocks
  (``SparseSignProjector`` without the parameter shapes), so every layer's gradient is formed
  whole before it is projected (featurize's path before 2026-11-30).

Usage::

    python benchmarks/interleaved_featurize.py --n 128 --rounds 3 --threads 1
    python benchmarks/interleaved_featurize.py --large --n 52 --batch 26 --rounds 4 --threads 2 --skip-vmap

Writes ``benchmarks/results/interleaved_featurize.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=common.REPO / "assets" / "ensemble" / "ddpm-seed0")
    p.add_argument("--large", action="store_true",
                   help="the 10.3 M-parameter UNet of bench_traker.py (random weights, random 3x32x32 images)")
    p.add_argument("--skip-vmap", action="store_true", help="leave out vmap+sjlt (slow on large models)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="examples per call (the gradient chunk too; featurize's auto chunk is 64 here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--out", type=Path, default=common.RESULTS / "interleaved_featurize.json")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from attribution.config import FeaturizeConfig
    from attribution.features import (
        DrawBatch,
        GradientTarget,
        SparseSignProjector,
        checkpoint_projector,
        draw_timesteps_and_noise,
        get_output,
        num_params,
        per_example_grads,
        select_params,
    )
    from attribution.models import load_models

    torch.set_num_threads(args.threads)
    if args.large:
        args.model_dir = common.save_random_pipeline(Path(tempfile.mkdtemp(prefix="interleaved_")) / "large",
                                                     (3, 32, 32), (80, 160, 240), 1, seed=0)
    model = load_models([args.model_dir])[0]
    params = select_params(model)
    p_all = num_params(params)
    ds = common.make_dataset("random3" if args.large else "digits", args.n)
    x0 = ds.images(range(args.n))
    ts, noises = draw_timesteps_and_noise(np.arange(args.n), FeaturizeConfig(num_draws=1), model.num_train_timesteps,
                                          model.image_shape)
    out = get_output("loss")
    fact = checkpoint_projector(FeaturizeConfig(proj_kind="factorized", proj_dim=args.proj_dim), p_all, 0, "cpu", params)
    sjlt = checkpoint_projector(FeaturizeConfig(proj_kind="sjlt", proj_dim=args.proj_dim), p_all, 0, "cpu", params)
    starts = np.cumsum([0] + [v.numel() for v in params.values()])[:-1]
    untiled = SparseSignProjector(p_all, args.proj_dim, FeaturizeConfig().proj_seed, FeaturizeConfig().sjlt_nnz,
                                  boundaries=starts)

    def limit(sl):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        a = model.alphas_cumprod.index_select(0, ts[sl, 0]).view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0[sl] + (1 - a).sqrt() * noises[sl, 0]
        eps = torch.func.functional_call(model.unet, leaves, (x_t, ts[sl, 0])).sample
        torch.autograd.grad(out(eps, noises[sl, 0]).mean(), list(leaves.values()))

    methods = {
        "limit": limit,
        "factorized": lambda sl: fact.project_examples(model, params, out, x0[sl], ts[sl], noises[sl]),
        "vmap+sjlt": lambda sl: sjlt.project(per_example_grads(model, params, out, x0[sl], ts[sl], noises[sl],
                                                               chunk_size=args.batch)),
        "hooks+sjlt": lambda sl: sjlt.example_features(GradientTarget(model, params, out), DrawBatch(x0[sl], ts[sl], noises[sl]),
                                                         chunk_size=args.batch),
        "hooks+sjlt untiled": lambda sl: untiled.example_features(GradientTarget(model, params, out), DrawBatch(x0[sl], ts[sl], noises[sl]),
                                                                 chunk_size=args.batch),
    }
    if args.skip_vmap:
        del methods["vmap+sjlt"]
    for fn in methods.values():  # warm-up
        fn(slice(0, 8))
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            for s in range(0, args.n, args.batch):
                fn(slice(s, s + args.batch))
            row[name] = args.n / (time.perf_counter() - t0)
        for name in methods:
            if name != "limit":
                row[f"{name}_over_limit"] = row[name] / row["limit"]
        row["loadavg"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": common.machine_info(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "other_cpu_users": common.other_cpu_users(), "examples_per_s_rounds": rounds,
              "median_over_limit": {name: float(np.median([r[f"{name}_over_limit"] for r in rounds]))
                                    for name in methods if name != "limit"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
