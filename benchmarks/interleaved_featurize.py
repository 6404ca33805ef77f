"""Train-feature throughput of ours vs the batched forward+backward limit, interleaved in one process.

On a shared machine, separate processes see different loads; this script alternates
the three computations round by round on the same examples and draws, so each
round's ratios are measured under the same load:

* ``limit``: plain batched forward+backward of the mean loss (parameters requiring grad);
* ``factorized``: ``FactorizedProjector.project_examples`` (one batched pass with hooks);
* ``vmap+sjlt``: ``per_example_grads`` (torch.func vmap) then the sparse sketch;
* ``hooks+sjlt``: ``projected_example_grads`` with the sjlt sketch, featurize's default path:
  one batched pass per chunk whose layer hooks form each layer's per-example gradients
  (convolutions by the grouped weight-gradient kernel) and project them at once.

Usage::

    python benchmarks/interleaved_featurize.py --n 128 --rounds 3 --threads 1

Writes ``benchmarks/results/interleaved_featurize.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=common.REPO / "assets" / "ensemble" / "ddpm-seed0")
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
    from attribution.factorized import projected_example_grads
    from attribution.featurize import checkpoint_projector, draw_timesteps_and_noise
    from attribution.gradients import num_params, per_example_grads, select_params
    from attribution.models import load_models
    from attribution.outputs import get_output

    torch.set_num_threads(args.threads)
    model = load_models([args.model_dir])[0]
    params = select_params(model)
    p_all = num_params(params)
    ds = common.make_dataset("digits", args.n)
    x0 = ds.images(range(args.n))
    ts, noises = draw_timesteps_and_noise(np.arange(args.n), FeaturizeConfig(num_draws=1), model.num_train_timesteps,
                                          model.image_shape)
    out = get_output("loss")
    fact = checkpoint_projector(FeaturizeConfig(proj_kind="factorized", proj_dim=args.proj_dim), p_all, 0, "cpu", params)
    sjlt = checkpoint_projector(FeaturizeConfig(proj_kind="sjlt", proj_dim=args.proj_dim), p_all, 0, "cpu", params)

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
        "hooks+sjlt": lambda sl: projected_example_grads(sjlt, model, params, out, x0[sl], ts[sl], noises[sl],
                                                         chunk_size=args.batch),
    }
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
        row["factorized_over_limit"] = row["factorized"] / row["limit"]
        row["vmap_sjlt_over_limit"] = row["vmap+sjlt"] / row["limit"]
        row["hooks_sjlt_over_limit"] = row["hooks+sjlt"] / row["limit"]
        row["loadavg"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": common.machine_info(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "other_cpu_users": common.other_cpu_users(), "examples_per_s_rounds": rounds,
              "median_factorized_over_limit": float(np.median([r["factorized_over_limit"] for r in rounds])),
              "median_vmap_sjlt_over_limit": float(np.median([r["vmap_sjlt_over_limit"] for r in rounds])),
              "median_hooks_sjlt_over_limit": float(np.median([r["hooks_sjlt_over_limit"] for r in rounds]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
