"""EK-FAC / K-FAC influence (attribution.scoring.ekfac): cost on the bundled default, exact oracle, damping, sign test.

Parts (``--parts``, default all):

* ``bundled``: on the app's default (``assets/store/journey``: M = 3 checkpoints, N = 4,000,
  d = 2,048 sjlt, D = 8 draws), fit the factors of every checkpoint on a random subset of
  ``--fit-examples`` examples at two sizes (the time is linear in the items: covariance and
  Lambda passes; the eigendecomposition is fixed), extrapolate to all 4,000 x 8 items, report
  the disk of the factors (independent of the subset) and time ``Scorer.score`` per step for
  journey-TRAK, ekfac and kfac on one 50-step trajectory (same steps, alternated, best of
  ``--repeats``). The store is linked (not copied) into a scratch directory so that the
  factors are not written into ``assets/``.
* ``oracle``: a 2.7k-parameter UNet (tests/test_ekfac.py's micro model) on 16 examples: the
  exact Gauss-Newton over all parameters, over the tracked (Linear/Conv2d) ones, its
  block-diagonal part (one block per tracked module: what K-FAC's layer independence keeps),
  EK-FAC and K-FAC; correlations of each one's scores with the all-parameter oracle (what leaving out
  GroupNorm costs, what the Kronecker approximation costs), over a damping sweep.
* ``sign``: a tiny DDPM (4, 8 channels, 8x8) trained on 16 digits; for queries (generated
  samples x steps), remove the top-scored training example (ekfac) and, separately, the
  bottom-scored one, retrain coupled (same seed and random stream), and count how often
  f_t rises more without the top one; journey-TRAK (sjlt store, d = 2048) on the same
  queries for reference.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_ekfac.py --threads 1

Writes ``benchmarks/results/bench_ekfac.json`` (``--out``) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def linked_store(src: Path, dst: Path) -> Path:
    """A store directory whose array files are symlinks to ``src``'s and whose manifest is a copy."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "manifest.json":
            (dst / f.name).symlink_to(f.resolve())
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    return dst


def part_bundled(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from attribution.scoring import ekfac
    from attribution.config import QueryConfig, SamplingConfig
    from attribution.data import load_dataset
    from attribution.models import load_models
    from attribution.scoring import Scorer
    from attribution.features import Store
    from attribution.sampling import sample_trajectory
    from attribution.workspace import ASSETS_DIR

    models = load_models([ASSETS_DIR / "ensemble" / f"ddpm-seed{s}" for s in range(3)])
    ds = load_dataset("digits", models[0].pixel_shape)
    src = ASSETS_DIR / "store" / "journey"
    draws = Store.open(src).config.num_draws
    fits = []
    for n in args.fit_examples:  # checkpoint 0 at each size: the slope is the per-item cost
        store = Store.open(linked_store(src, scratch / f"fit{n}"))
        t0 = time.perf_counter()
        man = ekfac.fit_factors(store, models[:1], ds, ekfac.EkfacConfig(max_examples=n), log=print)
        fits.append({"examples": n, "items": n * draws, "seconds": time.perf_counter() - t0,
                     "bytes": ekfac.factor_bytes(store)})
        print(f"fit checkpoint 0 on {n} examples ({n * draws} items): {fits[-1]['seconds']:.1f} s")
    (a, b) = fits[0], fits[-1]
    per_item = (b["seconds"] - a["seconds"]) / max(b["items"] - a["items"], 1)
    fixed = max(a["seconds"] - per_item * a["items"], 0.0)
    full_items = len(ds) * draws
    extrapolated = len(models) * (fixed + per_item * full_items)
    # Factors of all three checkpoints on the largest subset, for the query timing.
    n = args.fit_examples[-1]
    store = Store.open(linked_store(src, scratch / "all"))
    t0 = time.perf_counter()
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(max_examples=n), log=print)
    fit_all = time.perf_counter() - t0
    disk = ekfac.factor_bytes(store)
    traj = sample_trajectory(models[0], SamplingConfig(num_inference_steps=50, seed=0))
    q = QueryConfig(ridge=args.ridge)
    scorers = {name: Scorer(store, models, name, q) for name in ("journey", "ekfac", "kfac")}
    steps = args.steps
    times: dict[str, list[float]] = {k: [] for k in scorers}
    for name, sc in scorers.items():  # warm-up
        sc.score(traj, steps[:1])
    for _ in range(args.repeats):
        for name, sc in scorers.items():
            t0 = time.perf_counter()
            sc.score(traj, steps)
            times[name].append((time.perf_counter() - t0) / len(steps))
    per_step = {k: min(v) for k, v in times.items()}
    manifest = json.loads((ekfac.factors_dir(store) / "manifest.json").read_text())
    out = {
        "fits_checkpoint0": fits, "per_item_s": per_item, "fixed_s": fixed,
        "full_items_per_checkpoint": full_items,
        "extrapolated_full_fit_s_3_checkpoints": extrapolated,
        "fit_3_checkpoints_subset_s": fit_all, "subset_examples": n,
        "factor_bytes_3_checkpoints": disk,
        "store_feature_bytes_3_checkpoints": int(sum(f.stat().st_size for f in src.glob("features_*.npy"))),
        "num_tracked_params": manifest["num_tracked"], "num_params": manifest["num_params"],
        "untracked_params": len(manifest["untracked_params"]),
        "untracked_numel": int(manifest["num_params"] - manifest["num_tracked"]),
        "query_steps": steps, "query_s_per_step": per_step, "query_s_all": times,
        "ratio_ekfac_to_journey": per_step["ekfac"] / per_step["journey"],
        "ratio_kfac_to_journey": per_step["kfac"] / per_step["journey"],
    }
    print("\n| measure | value |\n|---|---|")
    for k in ("per_item_s", "fixed_s", "extrapolated_full_fit_s_3_checkpoints", "factor_bytes_3_checkpoints",
              "ratio_ekfac_to_journey", "ratio_kfac_to_journey"):
        print(f"| {k} | {out[k]:.4g} |")
    for k, v in per_step.items():
        print(f"| query s/step {k} | {v:.3f} |")
    return out


def micro_models(root: Path, seeds: tuple[int, ...] = (0,)):
    sys.path.insert(0, str(common.REPO / "tests"))
    from test_ekfac import make_micro_pipeline

    from attribution.models import load_models

    return load_models([make_micro_pipeline(root / f"m{s}", s) for s in seeds])


def part_oracle(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from attribution.scoring import ekfac
    from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
    from attribution.data import ArrayDataset, digits_dataset
    from attribution.features import draw_timesteps_and_noise, featurize
    from attribution.features import per_step_grads, select_params
    from attribution.features import loss_output
    from attribution.scoring import query_noises
    from attribution.sampling import sample_trajectory

    models = micro_models(scratch / "oracle")
    model = models[0]
    digits = digits_dataset("train")
    n = 16
    imgs = torch.nn.functional.interpolate(digits.images(np.arange(n)), size=(8, 8), mode="area")
    ds = ArrayDataset(((imgs[:, 0] + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8), name="digits8")
    cfg = FeaturizeConfig(proj_kind="identity", num_draws=4, store_dtype="float32")
    store = featurize(models, ds, scratch / "oracle" / "store", cfg)
    ekfac.fit_factors(store, models, ds, ekfac.EkfacConfig(batch_size=16, dtype="float64"))
    many = featurize(models, ds, scratch / "oracle" / "store16", cfg)  # the same features, factors with 16 targets per item
    ekfac.fit_factors(many, models, ds, ekfac.EkfacConfig(batch_size=64, dtype="float64", fisher_samples=16))
    many_manifest = json.loads((ekfac.factors_dir(many) / "manifest.json").read_text())
    params = select_params(model)
    layout, untracked = ekfac.tracked_layout(model, params)
    idx_t = ekfac.tracked_indices(layout)
    idx_all = torch.arange(sum(v.numel() for v in params.values()))
    ts, noises = draw_timesteps_and_noise(np.arange(n), cfg, model.num_train_timesteps, model.image_shape)
    x0 = ds.images(np.arange(n))
    G_all = ekfac.exact_gauss_newton(model, params, x0, ts, noises)
    gi = per_step_grads(model, params, loss_output, x0, ts, noises)  # (N, p)
    steps, K = [2, 5, 8], 8
    trajs = [sample_trajectory(model, SamplingConfig(num_inference_steps=10, seed=s)) for s in range(args.oracle_queries)]
    gq = []
    for traj in trajs:
        nz = query_noises(steps, K, 0, model.image_shape)
        gq.append(per_step_grads(model, params, loss_output, traj.x0_hat[steps], traj.timesteps[steps][:, None].expand(-1, K), nz))
    gq = torch.cat(gq)  # (Q S, p)
    manifest = json.loads((ekfac.factors_dir(store) / "manifest.json").read_text())
    G_t = G_all[idx_t][:, idx_t]
    block = torch.cat([torch.full((mod.weight[1] - mod.weight[0] + (mod.bias[1] - mod.bias[0] if mod.bias else 0),), j)
                       for j, mod in enumerate(layout)])  # module id of each tracked entry (tracked_indices order)
    G_block = G_t * (block[:, None] == block[None, :])
    rows = []
    for ridge in args.ridges:
        pre = {
            "exact-all": ekfac.DensePreconditioner(G_all, idx_all, ridge),
            "exact-tracked": ekfac.DensePreconditioner(G_t, idx_t, ridge),
            "exact-blockdiag": ekfac.DensePreconditioner(G_block, idx_t, ridge),
            "ekfac": ekfac.KroneckerPreconditioner(layout, ekfac.load_factors(store, manifest, 0, "ekfac"), ridge),
            "kfac": ekfac.KroneckerPreconditioner(layout, ekfac.load_factors(store, manifest, 0, "kfac"), ridge),
            "ekfac-16-samples": ekfac.KroneckerPreconditioner(
                layout, ekfac.load_factors(many, many_manifest, 0, "ekfac"), ridge),
            "kfac-16-samples": ekfac.KroneckerPreconditioner(
                layout, ekfac.load_factors(many, many_manifest, 0, "kfac"), ridge),
        }
        scores = {k: (gi @ p(gq).T).T.numpy() / n for k, p in pre.items()}  # (Q S, N)
        ref = scores["exact-all"]
        for k, s in scores.items():
            rows.append({
                "ridge": ridge, "method": k,
                "spearman_vs_exact_all": float(np.mean([spearmanr(ref[j], s[j])[0] for j in range(len(ref))])),
                "pearson_vs_exact_all": float(np.mean([np.corrcoef(ref[j], s[j])[0, 1] for j in range(len(ref))])),
                "top1_agree": float(np.mean(ref.argmax(1) == s.argmax(1))),
            })
    print("\n| ridge | method | Spearman vs exact (all params) | Pearson | top-1 agreement |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ridge']:g} | {r['method']} | {r['spearman_vs_exact_all']:.3f} | {r['pearson_vs_exact_all']:.3f} | {r['top1_agree']:.2f} |")
    return {"num_params": int(idx_all.numel()), "num_tracked": int(idx_t.numel()), "untracked": untracked,
            "num_train": n, "num_draws": cfg.num_draws, "queries": len(gq), "rows": rows}


def part_sign(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from attribution.scoring import ekfac
    from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig, TrainConfig
    from attribution.data import ArrayDataset, digits_dataset
    from attribution.features import featurize
    from attribution.features import per_step_grads, select_params
    from attribution.models import load_models
    from attribution.features import loss_output
    from attribution.scoring import Scorer, query_noises
    from attribution.models import train_ddpm
    from attribution.sampling import sample_trajectory

    n = args.sign_train
    digits = digits_dataset("train")
    imgs = torch.nn.functional.interpolate(digits.images(np.arange(n)), size=(8, 8), mode="area")
    ds = ArrayDataset(((imgs[:, 0] + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.uint8), name="digits8")
    images = ds.images(np.arange(n))
    tc = TrainConfig(epochs=args.sign_epochs, batch_size=8, lr=4e-3, ema_decay=0.9, block_out_channels=(4, 8),
                     num_train_timesteps=100, seed=0)
    base_dir = train_ddpm(images, scratch / "sign" / "full", tc)
    model = load_models([base_dir])[0]
    store = featurize([model], ds, scratch / "sign" / "store",
                      FeaturizeConfig(proj_kind="identity", num_draws=8, store_dtype="float32"))
    ekfac.fit_factors(store, [model], ds, ekfac.EkfacConfig(batch_size=32))
    K = 16
    sjlt = featurize([model], ds, scratch / "sign" / "sjlt", FeaturizeConfig(proj_dim=2048, num_draws=8))
    scorers = {"ekfac": Scorer(store, [model], "ekfac", QueryConfig(num_resamples=K, ridge=args.ridge)),
               "journey": Scorer(sjlt, [model], "journey", QueryConfig(num_resamples=K))}
    trials = []
    params_of = lambda m: select_params(m)  # noqa: E731
    retrained: dict[int, Any] = {}

    def without(i: int):
        if i not in retrained:
            keep = np.ones(n, dtype=bool)
            keep[i] = False
            retrained[i] = load_models([train_ddpm(images, scratch / "sign" / f"without{i}", tc, subset=keep, coupled=True)])[0]
        return retrained[i]

    def f_t(m, traj, step) -> float:
        nz = query_noises([step], 64, 1, m.image_shape)  # more noises than the query: a sharper f_t
        x_t_ts = traj.timesteps[[step]][:, None].expand(-1, 64)
        with torch.no_grad():
            ab = m.alphas_cumprod[x_t_ts[0]][:, None, None, None]
            x = ab.sqrt() * traj.x0_hat[step][None] + (1 - ab).sqrt() * nz[0]
            return float(loss_output(m.unet(x, x_t_ts[0]).sample, nz[0]).mean())

    for seed in range(args.sign_queries):
        traj = sample_trajectory(model, SamplingConfig(num_inference_steps=10, seed=seed))
        for step in args.sign_steps:
            base = f_t(model, traj, step)
            for method, scorer in scorers.items():
                s = scorer.score(traj, [step]).scores[0]
                top, bottom = int(s.argmax()), int(s.argmin())
                d_top, d_bottom = f_t(without(top), traj, step) - base, f_t(without(bottom), traj, step) - base
                trials.append({"method": method, "seed": seed, "step": step, "top": top, "bottom": bottom,
                               "delta_top": d_top, "delta_bottom": d_bottom,
                               "pred_top": float(s[top]), "pred_bottom": float(s[bottom])})
                print(f"{method} query {seed} step {step}: remove top {top} -> df {d_top:+.2e}, "
                      f"bottom {bottom} -> {d_bottom:+.2e}")
    out: dict[str, Any] = {"num_train": n, "epochs": args.sign_epochs, "ridge": args.ridge, "trials": trials,
                           "retrained_models": len(retrained)}
    for method in scorers:
        tr = [t for t in trials if t["method"] == method]
        rate = float(np.mean([t["delta_top"] > t["delta_bottom"] for t in tr]))
        rises = float(np.mean([t["delta_top"] > 0 for t in tr]))
        out[method] = {"rate": rate, "top_removal_raises_rate": rises, "pairs": len(tr)}
        print(f"sign test {method}: f_t rises more without the top than without the bottom in {rate:.0%} of "
              f"{len(tr)} (query, step) pairs; without the top it rises in {rises:.0%}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["bundled", "oracle", "sign"], choices=["bundled", "oracle", "sign"])
    p.add_argument("--fit-examples", type=int, nargs=2, default=[64, 192], help="two subset sizes (checkpoint 0)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 40, 49])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ridge", type=float, default=0.1, help="relative damping of the timed / sign-test queries")
    p.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0], help="oracle damping sweep")
    p.add_argument("--oracle-queries", type=int, default=4)
    p.add_argument("--sign-train", type=int, default=16)
    p.add_argument("--sign-epochs", type=int, default=60)
    p.add_argument("--sign-queries", type=int, default=8)
    p.add_argument("--sign-steps", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=common.RESULTS / "bench_ekfac.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": common.machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.out.exists():  # keep the parts not rerun
        result.update({k: v for k, v in json.loads(args.out.read_text()).items() if k in ("bundled", "oracle", "sign")})
    with tempfile.TemporaryDirectory(prefix="bench_ekfac") as tmp:
        for part in args.parts:
            t0 = time.perf_counter()
            result[part] = {"fn": part, **globals()[f"part_{part}"](args, Path(tmp)),
                            "wall_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
