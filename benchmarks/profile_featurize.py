"""Where featurize spends its time: gradients vs projection vs store I/O vs the rest.

Wraps the functions :func:`attribution.features.featurize.featurize` calls (per-example
gradients, the projector, the (timestep, noise) draws, image loading, store
writes, the kernel in ``finalize``) with timers, without editing the core, and
runs one featurize of the bundled default model. Optionally adds torch.profiler's
top operators (``--torch-profiler``) and a sweep of the gradient chunk size and of
the rows per projection call (``--sweep``).

Usage::

    python benchmarks/profile_featurize.py                       # n = 512, sjlt, factorized, gaussian, d = 2048
    python benchmarks/profile_featurize.py --n 128 --torch-profiler --sweep

Writes ``benchmarks/results/profile_featurize.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _timer(acc: dict[str, float], key: str, fn):
    # On a GPU each part is synchronized, so its wall time is its own; this removes the overlap
    # of the parts, so the GPU total is a little above an unprofiled run's.
    def wrapped(*a, **k):
        common.sync_gpu()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            common.sync_gpu()
            acc[key] += time.perf_counter() - t0

    return wrapped


def profile_once(models, ds, proj_kind: str, proj_dim: int, batch_size: int, chunk_size: int, work: Path,
                 torch_profiler: bool = False) -> dict[str, Any]:
    import attribution.features.featurize as F
    import attribution.features.projection.dense as DENSE
    import attribution.features.projection.sjlt as SJLT
    from attribution.config import FeaturizeConfig
    from attribution.features import Store

    acc: dict[str, float] = defaultdict(float)
    saved = {name: getattr(F, name) for name in ("draw_timesteps_and_noise", "checkpoint_projector")}
    # the projectors' example_features call these through their modules' globals
    saved_grads, saved_hooks = DENSE.per_example_grads, DENSE.example_grads_from_hooks
    saved_write, saved_finalize = Store.write_rows, Store.finalize
    saved_images = type(ds).images

    def make_projector(*a, **k):
        t0 = time.perf_counter()
        proj = saved["checkpoint_projector"](*a, **k)
        acc["projector build"] += time.perf_counter() - t0
        proj.project = _timer(acc, "projection", proj.project)
        if hasattr(proj, "project_examples"):
            proj.project_examples = _timer(acc, "factorized: batched forward+backward with projecting hooks",
                                           proj.project_examples)
        return proj

    DENSE.per_example_grads = _timer(acc, "per-example gradients (vmap)", saved_grads)
    DENSE.example_grads_from_hooks = SJLT.example_grads_from_hooks = _timer(acc, "per-example gradients (hooks)",
                                                                            saved_hooks)
    F.draw_timesteps_and_noise = _timer(acc, "draws (timesteps, noise)", saved["draw_timesteps_and_noise"])
    F.checkpoint_projector = make_projector
    Store.write_rows = _timer(acc, "store writes (+flush)", saved_write)
    Store.finalize = _timer(acc, "finalize (kernel)", saved_finalize)
    type(ds).images = _timer(acc, "load images", saved_images)
    store_dir = work / f"store-{proj_kind}"
    shutil.rmtree(store_dir, ignore_errors=True)
    cfg = FeaturizeConfig(proj_kind=proj_kind, proj_dim=proj_dim, num_draws=1)
    prof = None
    try:
        if torch_profiler:
            from torch.profiler import ProfilerActivity, profile

            gpu = models[0].device.type == "cuda"
            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []), record_shapes=False)
            prof.__enter__()
        import resource

        busy0, self0 = common.cpu_busy_s(), sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        t0 = time.perf_counter()
        F.featurize(models, ds, store_dir, cfg, batch_size=batch_size, chunk_size=chunk_size)
        total = time.perf_counter() - t0
        others = ((common.cpu_busy_s() - busy0) - (sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - self0)) / total
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        for name, fn in saved.items():
            setattr(F, name, fn)
        DENSE.per_example_grads, DENSE.example_grads_from_hooks = saved_grads, saved_hooks
        SJLT.example_grads_from_hooks = saved_hooks
        Store.write_rows, Store.finalize = saved_write, saved_finalize
        type(ds).images = saved_images
        shutil.rmtree(store_dir, ignore_errors=True)
    parts = dict(acc)
    parts["other (spec, hashing, store create, python)"] = total - sum(parts.values())
    out: dict[str, Any] = {"proj_kind": proj_kind, "total_s": total, "rows": len(ds) * len(models),
                           "others_busy_cores": round(max(0.0, others), 2),
                           "examples_per_s": len(ds) * len(models) / total, "parts_s": parts}
    if prof is not None:
        sort = "self_cuda_time_total" if models[0].device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
        out["torch_profiler_top_ops"] = table
    return out


def sweep(models, ds, proj_dim: int) -> dict[str, Any]:
    """Gradient throughput vs chunk size, projection throughput vs rows per call."""
    import numpy as np
    import torch

    from attribution.config import FeaturizeConfig
    from attribution.features import (
        DrawBatch,
        GradientTarget,
        checkpoint_projector,
        draw_timesteps_and_noise,
        get_output,
        num_params,
        per_example_grads,
        select_params,
    )

    model = models[0]
    params = select_params(model)
    p = num_params(params)
    n = 64
    x0 = ds.images(range(n))
    ts, noises = draw_timesteps_and_noise(np.arange(n), FeaturizeConfig(num_draws=1), model.num_train_timesteps, model.image_shape)
    out: dict[str, Any] = {"grad_examples_per_s_by_chunk": {}, "projection_rows_per_s": {}}
    per_example_grads(model, params, get_output("loss"), x0[:8], ts[:8], noises[:8], chunk_size=8)  # warm-up
    for chunk in (8, 16, 32, 64):
        t0 = time.perf_counter()
        per_example_grads(model, params, get_output("loss"), x0, ts, noises, chunk_size=chunk)
        out["grad_examples_per_s_by_chunk"][chunk] = n / (time.perf_counter() - t0)

    fact = checkpoint_projector(FeaturizeConfig(proj_kind="factorized", proj_dim=proj_dim), p, 0, model.device, params)
    out["factorized_examples_per_s_by_chunk"] = {}
    for chunk in (16, 32, 64):
        t0 = time.perf_counter()
        fact.example_features(GradientTarget(model, params, get_output("loss")), DrawBatch(x0, ts, noises), chunk_size=chunk)
        out["factorized_examples_per_s_by_chunk"][chunk] = n / (time.perf_counter() - t0)
    # the Eq. (3) query: 50 steps x K = 20 rows, steps per vmapped call (QueryConfig.chunk_size, default 10)
    from attribution.config import SamplingConfig
    from attribution.sampling import sample_trajectory
    from attribution.scoring import query_noises

    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=50, seed=0))
    qn = query_noises(range(50), 20, 0, model.image_shape)
    qt = traj.timesteps[:, None].expand(-1, 20)
    out["query_50_steps_s_by_chunk"] = {}
    per_example_grads(model, params, get_output("loss"), traj.x0_hat[:2], qt[:2], qn[:2], chunk_size=2)  # warm-up
    for chunk in (5, 10, 25, 50):
        t0 = time.perf_counter()
        for s in range(0, 50, chunk):
            per_example_grads(model, params, get_output("loss"), traj.x0_hat[s : s + chunk], qt[s : s + chunk],
                              qn[s : s + chunk], chunk_size=chunk)
        out["query_50_steps_s_by_chunk"][chunk] = time.perf_counter() - t0
    # the same 50 gradients with plain autograd, one step (K rows in one batch) at a time (what queries use)
    from attribution.features import per_step_grads

    t0 = time.perf_counter()
    looped = per_step_grads(model, params, get_output("loss"), traj.x0_hat, qt, qn)
    out["query_50_steps_s_looped_autograd"] = time.perf_counter() - t0
    vm = per_example_grads(model, params, get_output("loss"), traj.x0_hat[:10], qt[:10], qn[:10], chunk_size=10)
    out["query_looped_vs_vmap_max_rel_diff"] = float((looped[:10] - vm).abs().max() / vm.abs().max())
    # the limit proxy for the same 1000 rows: batched forward+backward of the mean loss, 200 rows per call
    ab = model.alphas_cumprod
    unet = model.unet.requires_grad_(True)
    x0r = traj.x0_hat[:, None].expand(-1, 20, -1, -1, -1).reshape(-1, *traj.x0_hat.shape[1:])
    tr, er = qt.reshape(-1), qn.reshape(-1, *qn.shape[2:])
    t0 = time.perf_counter()
    for s in range(0, 1000, 200):
        a = ab.index_select(0, tr[s : s + 200]).view(-1, 1, 1, 1)
        xt = a.sqrt() * x0r[s : s + 200] + (1 - a).sqrt() * er[s : s + 200]
        torch.nn.functional.mse_loss(unet(xt, tr[s : s + 200]).sample, er[s : s + 200]).backward()
    out["query_limit_batched_fwd_bwd_s"] = time.perf_counter() - t0
    unet.requires_grad_(False)
    g = torch.randn(256, p, device=model.device)
    for kind in ("sjlt", "gaussian"):
        proj = checkpoint_projector(FeaturizeConfig(proj_kind=kind, proj_dim=proj_dim), p, 0, model.device)
        proj.project(g[:16])  # builds / caches the matrix
        for rows in (16, 64, 256):
            reps = max(1, 256 // rows)
            t0 = time.perf_counter()
            for r in range(reps):
                proj.project(g[r * rows % 256 : r * rows % 256 + rows])
            out["projection_rows_per_s"][f"{kind}@{rows}"] = rows * reps / (time.perf_counter() - t0)
        del proj
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--projections", nargs="+", default=["sjlt", "factorized", "gaussian"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--model-dir", type=Path, help="a default-model checkpoint (default: random weights)")
    p.add_argument("--torch-profiler", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=common.RESULTS / "profile_featurize.json")
    args = p.parse_args(argv)

    from attribution.models import load_models

    work = Path(tempfile.mkdtemp(prefix="profile_featurize_"))
    model_dir = args.model_dir or common.save_random_pipeline(work / "model", (1, 32, 32), (16, 32, 32), 1)
    models = load_models([model_dir], args.device)
    ds = common.make_dataset("digits", args.n)
    result: dict[str, Any] = {"machine": common.machine_info(), "other_cpu_users": common.other_cpu_users(),
                              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                              "n": args.n, "proj_dim": args.proj_dim, "batch_size": args.batch_size,
                              "chunk_size": args.chunk_size, "runs": []}
    # warm-up: oneDNN primitive caches, allocator (not counted)
    profile_once(models, common.make_dataset("digits", 16), "sjlt", args.proj_dim, 16, args.chunk_size, work)
    for kind in args.projections:
        r = profile_once(models, ds, kind, args.proj_dim, args.batch_size, args.chunk_size, work, args.torch_profiler)
        result["runs"].append(r)
        print(f"\n{kind}: {r['examples_per_s']:.1f} examples/s, {r['total_s']:.2f} s for {r['rows']} rows "
              f"(other processes kept {r['others_busy_cores']:.2f} cores busy)")
        rows = [[k, f"{v:.2f}", f"{100 * v / r['total_s']:.0f} %"] for k, v in sorted(r["parts_s"].items(), key=lambda kv: -kv[1])]
        common.print_table(rows, ["part", "seconds", "share"])
        if "torch_profiler_top_ops" in r:
            print(r["torch_profiler_top_ops"])
    if args.sweep:
        result["sweep"] = sweep(models, ds, args.proj_dim)
        print(json.dumps(result["sweep"], indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
