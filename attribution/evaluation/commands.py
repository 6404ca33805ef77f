"""``attribution bench`` subcommands: prepare, retrain, truth, score, counterfactual, report, all.

Each stage is resumable and skips what is on disk, so ``attribution bench all --work DIR``
can be rerun after an interruption.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..config import DRAW_SHARINGS, TIMESTEP_SAMPLINGS
from . import BENCH_HELP
from .designs import SUBSET_DESIGNS
from .setup import BenchConfig, load_prepared, prepare


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig()
    num_subsets = args.num_subsets
    if args.design == "groups":  # one subset per class and per style cluster: the count follows from the data
        num_subsets = 10 * (1 + args.clusters_per_class)
    return BenchConfig(
        num_train=args.num_train,
        image_size=args.image_size,
        num_subsets=num_subsets,
        checkpoint_seeds=tuple(range(args.num_checkpoints)),
        subset_coupled=args.coupled,
        train=replace(base.train, epochs=args.epochs, block_out_channels=tuple(args.block_out_channels)),
        subset_design=args.design,
        dirichlet_alpha=args.dirichlet_alpha,
        clusters_per_class=args.clusters_per_class,
    )


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def cmd_prepare(args: argparse.Namespace) -> None:
    paths, dataset, subsets = prepare(args.work, _config_from_args(args))
    print(f"benchmark under {paths.root}: {len(dataset)} training images {dataset.image_shape}, {len(subsets)} subsets")


def cmd_retrain(args: argparse.Namespace) -> None:
    from ..models.base import resolve_device
    from .retrain import lds_jobs, train_jobs

    _threads(args)
    config, paths, dataset, subsets = load_prepared(args.work)
    t0 = time.perf_counter()
    jobs = lds_jobs(paths, config, subsets, args.limit, args.replicates)
    shard, num_shards = _shard(args)
    spent = train_jobs(jobs[shard::num_shards], dataset, config.train, log=tqdm.write, coupled=config.subset_coupled,
                       device=resolve_device(args.device))
    print(f"retraining done: {spent:.0f} s training, {time.perf_counter() - t0:.0f} s wall")


def _shard(args: argparse.Namespace) -> tuple[int, int]:
    shard, num_shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < num_shards:
        raise ValueError("--shard must be i/n with 0 <= i < n")
    return shard, num_shards


def _featurize_config(args: argparse.Namespace):
    from ..config import FeaturizeConfig

    return FeaturizeConfig(
        proj_dim=args.proj_dim, proj_kind=args.projection, timestep_sampling=args.timestep_sampling, store_dtype="float32",
        draw_sharing=args.draw_sharing,
    )


def _lds_run(args: argparse.Namespace):
    from .queries import QuerySpec
    from .run import LdsRun, SelectionGrid

    config, paths, dataset, subsets = load_prepared(args.work)
    missing = [s for s in config.checkpoint_seeds if not paths.checkpoint(s).exists()]
    if missing:
        raise FileNotFoundError(f"full-data checkpoints {missing} are not trained yet; run `attribution bench retrain` first")
    spec = QuerySpec(num_queries=args.num_queries, num_val_queries=args.num_val_queries, num_resamples=args.num_resamples)
    grid = SelectionGrid(ridges=tuple(args.ridges), num_draws=tuple(args.num_draws))
    run = LdsRun.open(paths, [paths.checkpoint(s) for s in config.checkpoint_seeds], dataset, subsets, spec,
                      _featurize_config(args), grid, log=tqdm.write)
    return config, run


def cmd_lds(args: argparse.Namespace) -> None:
    import json

    from .run import replicate_truths

    _threads(args)
    t0 = time.perf_counter()
    config, run = _lds_run(args)
    if args.warm_only:
        for method in args.methods:
            run.candidate_scores(method)
        print(f"caches warm ({time.perf_counter() - t0:.0f} s)")
        return
    if args.truth is not None:
        truths, ids = _load_truth(args, run)
    else:
        truths, ids = replicate_truths(run.paths, run.queries, run.spec, config.num_subsets, args.replicates,
                                       log=tqdm.write, compute=not args.cached_truth)
    truth = truths.mean(axis=0)
    if len(ids) < 8:
        raise RuntimeError(f"only {len(ids)} subset models are trained; the LDS needs at least 8")
    results, chosen = run.evaluate(args.methods, truth, ids)
    from .analyses import cross_query_agreement, paired_margins, replicate_agreement, step_correlation, top_k_overlap

    steps = list(run.spec.steps)
    col = steps.index(args.analysis_step) if args.analysis_step in steps else len(steps) // 2
    from .lds import query_specific_lds, summarize

    _, rep = run.spec.split()
    masks, rep_truth = run.subsets[ids], truth[:, rep]
    specific = {m: summarize(query_specific_lds(chosen[m], masks, rep_truth, results[m]["sign"])) for m in chosen}
    analyses = {
        "query_specific_lds": {m: {"mean": s.mean.tolist(), "se": s.se.tolist(), "overall": s.overall,
                                   "overall_se": s.overall_se} for m, s in specific.items()},
        "step": steps[col],
        "top_k_overlap": {m: top_k_overlap(chosen[m][:, col]) for m in chosen},
        "step_correlation": {m: step_correlation(chosen[m], steps) for m in chosen if m not in ("trak-final",)},
    }
    out = {
        "steps": list(run.spec.steps),
        "timesteps": run.queries.timesteps[list(run.spec.steps)].tolist(),
        "num_subsets": int(len(ids)),
        "num_queries": run.spec.num_queries,
        "num_val_queries": run.spec.num_val_queries,
        "num_resamples": run.spec.num_resamples,
        "featurize": run.base.to_dict(),
        "bench": config.to_dict(),
        "methods": results,
        "analyses": analyses,
        "paired": paired_margins(results, "journey"),
        "truth_replicates": int(truths.shape[0]),
        "replicate_agreement": replicate_agreement(truths[:, :, rep]),
        "cross_query_agreement": cross_query_agreement(rep_truth),
        "wall_seconds": time.perf_counter() - t0,
    }
    if config.subset_design == "groups":
        out["groups"] = _group_section(run, config, truths, ids, chosen, rep)
    path = run.paths.root / args.out_name
    path.write_text(json.dumps(out))
    print(f"wrote {path}")


def _group_section(run, config: BenchConfig, truths, ids, chosen: dict, rep) -> dict:
    """Group-counterfactual metrics (:mod:`.group_counterfactual`) of the chosen scores of every method.

    Replicate r of a group model replays the full-data run of seed ``replicate_seed(r)``: that
    full-data checkpoint is its reference."""
    import numpy as np

    from .group_counterfactual import group_metrics, measured_changes, seed_agreement
    from .queries import step_outputs

    seeds = [config.replicate_seed(r) for r in range(truths.shape[0])]
    missing = [s for s in seeds if s not in config.checkpoint_seeds]
    if missing:
        raise ValueError(f"group models of seeds {missing} have no full-data checkpoint to compare with")
    full = np.stack([step_outputs(run.models[config.checkpoint_seeds.index(s)], run.queries, run.spec) for s in seeds])
    removed = ~run.subsets[ids]
    delta = measured_changes(truths[:, :, rep], full[:, rep])
    return {
        "num_groups": int(len(ids)), "seeds": seeds,
        "seed_agreement": seed_agreement(truths[:, :, rep], full[:, rep]),
        "methods": {m: group_metrics(sc, removed, delta) for m, sc in chosen.items()},
    }


def cmd_truth(args: argparse.Namespace) -> None:
    from ..models.base import resolve_device
    from .run import ground_truth

    _threads(args)
    config, run = _lds_run(args)
    while True:
        _, ids = ground_truth(run.paths, run.queries, run.spec, config.num_subsets, log=lambda s: None,
                              reverse=args.reverse, replicates=args.replicates, device=resolve_device(args.device))
        tqdm.write(f"ground truth of {len(ids)}/{config.num_subsets} subset models cached")
        if not args.wait or len(ids) == config.num_subsets:
            break
        time.sleep(30)


def cmd_import_truth(args: argparse.Namespace) -> None:
    """Seed the work dir's ground-truth cache from a report's ``truth.npz``, so ``bench retrain --replicates R``
    trains only the training seeds the file lacks (the subset models of the cached seeds are not needed)."""
    from .run import import_truth

    _, paths, _, subsets = load_prepared(args.work)
    written = import_truth(args.truth, paths, subsets)
    print(f"imported {written} cached subset truths from {args.truth} into {paths.root / 'truth'}")


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    print(f"wrote {write_report(args.work, args.out)}")


def cmd_counterfactual(args: argparse.Namespace) -> None:
    from ..features.outputs import get_method
    from ..models.classifier import load_classifier
    from .counterfactual import (
        BOTTOM,
        CounterfactualSpec,
        measure,
        paired_with_random,
        removal_sets,
        retrain_removals,
        save_json,
        summarize_rows,
    )
    from .scores import SIMILARITY, classifier_embed, gradient_scores, query_feature_cache, similarity_scores

    _threads(args)
    t0 = time.perf_counter()
    config, run = _lds_run(args)
    _, rep = run.spec.split()
    if args.step not in run.spec.steps:
        raise ValueError(f"--step must be one of the evaluated steps {list(run.spec.steps)}")
    train_seeds = tuple(args.cf_train_seeds) if args.cf_train_seeds else config.checkpoint_seeds[:1]
    if train_seeds[0] != config.checkpoint_seeds[0] or not set(train_seeds) <= set(config.checkpoint_seeds):
        raise ValueError(f"--cf-train-seeds must start with checkpoint 0's seed {config.checkpoint_seeds[0]} and be "
                         f"seeds of full-data checkpoints {list(config.checkpoint_seeds)} (they are the references)")
    spec = CounterfactualSpec(query_rows=tuple(int(q) for q in rep[: args.num_cf_queries]), step=args.step,
                              ks=tuple(args.ks), kinds=tuple(args.kinds), train_seeds=train_seeds, coupled=args.coupled)
    col = list(run.spec.steps).index(spec.step)
    scores, settings = {}, {}
    for kind in sorted(spec.kinds, key=lambda k: k.endswith(BOTTOM)):  # a "-bottom" kind after its method
        if kind == "random":
            continue
        if kind.endswith(BOTTOM):  # the same ranking from the other end: the k most negative scores
            base = kind.removesuffix(BOTTOM)
            if base not in scores:
                raise ValueError(f"--kinds {kind} needs {base} among the kinds too")
            scores[kind] = -scores[base]
            continue
        if kind in SIMILARITY:
            scores[kind] = similarity_scores(kind, run.dataset, run.queries, run.spec)[:, col]
            continue
        m = get_method(kind)
        draws, ridge = settings[kind] = _cf_setting(args, run.paths.root, kind)
        store = run.store(m.train_output, draws)
        feats = query_feature_cache(run.paths.root, store, run.models, kind, run.queries, run.spec, tqdm.write)
        scores[kind] = gradient_scores(store, run.models, kind, feats, ridge if ridge is not None else 0.0, run.dataset)[:, col]
    removals = removal_sets(scores, spec, len(run.dataset))
    models_dir = run.paths.root / "models"
    save_json(run.paths.root / "removals.json", removals)
    spent = 0.0 if args.measure_only else retrain_removals(models_dir, removals, run.dataset, config.train, spec,
                                                           log=tqdm.write, shard=_shard(args))
    clf = load_classifier()
    embed = classifier_embed()

    def classify(x):
        import torch.nn.functional as F

        return clf(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)).argmax(1)

    references = {s: run.models[config.checkpoint_seeds.index(s)] for s in spec.train_seeds}
    rows = measure(models_dir, removals, run.queries, run.spec, spec, references, embed, classify)
    out = {
        "step": spec.step, "timestep": int(run.queries.timesteps[spec.step]), "ks": list(spec.ks), "kinds": list(spec.kinds),
        "query_rows": list(spec.query_rows), "query_seeds": [int(run.queries.seeds[q]) for q in spec.query_rows],
        "train_seeds": list(spec.train_seeds), "coupled": spec.coupled,
        "settings": {k: {"num_draws": d, "ridge": r} for k, (d, r) in settings.items()},
        "rows": rows, "summary": summarize_rows(rows), "paired_with_random": paired_with_random(rows),
        "models_expected": len(removals) * len(spec.train_seeds), "models_done": len(rows),
        "train_seconds": spent, "wall_seconds": time.perf_counter() - t0,
    }
    save_json(run.paths.root / "counterfactual.json", out)
    print(f"wrote {run.paths.root / 'counterfactual.json'}: {len(rows)}/{out['models_expected']} removal models measured")


def _load_truth(args: argparse.Namespace, run) -> tuple:
    """Ground truths (R, m', Q, S) of ``--replicates`` training seeds per subset, and the subset ids: from
    ``--truth`` (a report's truth.npz) or the work dir's cache."""
    import numpy as np

    from .run import replicate_truths

    R = args.replicates
    if args.truth is None:
        return replicate_truths(run.paths, run.queries, run.spec, len(run.subsets), R, log=tqdm.write, compute=False)
    z = np.load(args.truth, allow_pickle=False)
    # files written before replicates existed hold one seed as "truth" (m, Q, S)
    truths, ids = (z["truth_replicates"] if "truth_replicates" in z.files else z["truth"][None]), z["subset_ids"]
    if len(truths) < R:
        raise ValueError(f"{args.truth} holds {len(truths)} training seed(s) per subset; --replicates asks for {R}")
    if not np.array_equal(z["subsets"], run.subsets[ids]):
        raise ValueError(f"{args.truth} was computed for other subsets than {run.paths.root}")
    if truths.shape[2:] != (run.queries.x0_hat.shape[0], len(run.spec.steps)):
        raise ValueError(f"{args.truth} holds {truths.shape[2:]} (queries, steps), the run has "
                         f"{(run.queries.x0_hat.shape[0], len(run.spec.steps))}")
    return truths[:R], ids


def _ablation_variants(args: argparse.Namespace, run, method: str) -> dict[str, tuple[dict, dict]]:
    """{variant name: (its setting, candidate scores)} of one method, as asked by the ablation options."""
    from .ablation import checkpoint_candidates, featurize_candidates, matched_candidates, resample_candidates

    variants = {f"{method} all timesteps": ({"half_width": None}, run.candidate_scores(method))}
    for hw in args.half_widths:
        name = f"{method} matched ±{hw}" if hw else f"{method} matched exactly"
        variants[name] = ({"half_width": hw}, matched_candidates(run, method, args.matched_draws, hw))
    for mc in args.checkpoint_counts:
        variants[f"{method} M = {mc}"] = ({"num_checkpoints": mc}, checkpoint_candidates(run, method, mc))
    for pd in args.proj_dims:
        variants[f"{method} d = {pd}"] = ({"proj_dim": pd}, featurize_candidates(run, method, proj_dim=pd))
    for kind in args.proj_kinds:
        variants[f"{method} {kind} projection"] = ({"proj_kind": kind}, featurize_candidates(run, method, proj_kind=kind))
    for k in args.query_resamples:
        variants[f"{method} K = {k}"] = ({"num_resamples": k}, resample_candidates(run, method, k))
    for sampling in args.timestep_samplings:
        variants[f"{method} {sampling} draws"] = ({"timestep_sampling": sampling},
                                                  featurize_candidates(run, method, timestep_sampling=sampling))
    return variants


def cmd_ablation(args: argparse.Namespace) -> None:
    """LDS ablations of TRAK-type methods into ``ablation.json`` (written after each method, merged with
    earlier runs on the same steps and base settings)."""
    import json

    from ..features.outputs import get_method

    _threads(args)
    t0 = time.perf_counter()
    config, run = _lds_run(args)
    truths, ids = _load_truth(args, run)
    truth = truths.mean(axis=0)
    steps = list(run.spec.steps)
    out = {
        "steps": steps, "timesteps": run.queries.timesteps[steps].tolist(), "num_subsets": int(len(ids)),
        "truth_replicates": int(truths.shape[0]),
        "num_queries": run.spec.num_queries, "num_val_queries": run.spec.num_val_queries,
        "featurize": run.base.to_dict(), "bench": config.to_dict(), "variants": {}, "wall_seconds": 0.0,
    }
    path = run.paths.root / "ablation.json"
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(k, 1) == out[k] for k in ("timesteps", "num_subsets", "featurize", "num_queries", "truth_replicates")):
            out["variants"], out["wall_seconds"] = old["variants"], old.get("wall_seconds", 0.0)
    done = out["wall_seconds"]
    results = {}
    for method in args.methods:
        label = get_method(method).label
        for name, (setting, cands) in _ablation_variants(args, run, method).items():
            results[name], _ = run.select(name, label, cands, truth, ids)
            results[name]["variant"] = setting
        out["variants"].update(results)
        out["wall_seconds"] = done + time.perf_counter() - t0
        path.write_text(json.dumps(out))  # after each method: an interrupted run keeps what it finished
    head = " | ".join(f"t={t}" for t in out["timesteps"])
    print(f"| variant | {head} | mean | setting |\n|---|" + "---|" * (len(steps) + 2))
    for name, r in results.items():
        cells = " | ".join(f"{m:.3f} ± {e:.3f}" for m, e in zip(r["mean"], r["se"]))
        print(f"| {name} | {cells} | **{r['overall']:.3f} ± {r['overall_se']:.3f}** | "
              f"draws {r['num_draws']}, ridge {r['ridge']}, sign {r['sign']:+.0f} |")
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


def _cf_setting(args: argparse.Namespace, root: Path, kind: str) -> tuple[int, float | None]:
    """(draws, ridge) ranking ``kind``'s removals: the options if given, else what ``bench lds`` chose on the
    validation queries (``lds.json``), else 16 draws and ridge 0.1."""
    import json

    chosen = {}
    if (root / "lds.json").exists():
        chosen = json.loads((root / "lds.json").read_text())["methods"].get(kind, {})
    draws = args.cf_num_draws if args.cf_num_draws is not None else chosen.get("num_draws") or 16
    ridge = args.cf_ridge if args.cf_ridge is not None else chosen.get("ridge", 0.1)
    return int(draws), ridge


def add_query_args(p: argparse.ArgumentParser) -> None:
    """Options of the query set, the featurize base config and the selection grid."""
    from ..config import FeaturizeConfig
    from .queries import QuerySpec
    from .run import SelectionGrid

    grid, spec, fc = SelectionGrid(), QuerySpec(), FeaturizeConfig()
    p.add_argument("--num-queries", type=int, default=spec.num_queries)
    p.add_argument("--num-val-queries", type=int, default=spec.num_val_queries)
    p.add_argument("--num-resamples", type=int, default=spec.num_resamples, help="K of Eq. (3)")
    p.add_argument("--ridges", type=float, nargs="+", default=list(grid.ridges))
    p.add_argument("--num-draws", type=int, nargs="+", default=list(grid.num_draws))
    p.add_argument("--proj-dim", type=int, default=fc.proj_dim)
    p.add_argument("--projection", default=fc.proj_kind, choices=["sjlt", "gaussian", "identity", "factorized"])
    p.add_argument("--timestep-sampling", default=fc.timestep_sampling, choices=list(TIMESTEP_SAMPLINGS),
                   help="how the train timesteps are drawn")
    p.add_argument("--draw-sharing", default=fc.draw_sharing, choices=list(DRAW_SHARINGS),
                   help="per-example draws, or common random numbers (every example the same draws)")
    p.add_argument("--out-name", default="lds.json", help="file name of the result under the work directory")
    _replicates_arg(p)


def _shard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", default="0/1",
                   help="i/n: train every n-th job from the i-th (parallel workers; rerun without it to measure all)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or auto: where models train / run (training draws the same random stream on every device)")


def _replicates_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicates", type=int, default=1,
                   help="training seeds per subset model; the ground truth averages them")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``attribution bench ...`` on the main parser's subparsers."""
    b = sub.add_parser("bench", help=BENCH_HELP)
    bsub = b.add_subparsers(dest="bench_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--work", type=Path, default=Path("benchmarks/work"), help="benchmark work directory")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        return p

    base = BenchConfig()
    p = common(bsub.add_parser("prepare", help="write the training set and subset masks"))
    p.add_argument("--num-train", type=int, default=base.num_train)
    p.add_argument("--image-size", type=int, default=base.image_size)
    p.add_argument("--num-subsets", type=int, default=base.num_subsets)
    p.add_argument("--num-checkpoints", type=int, default=len(base.checkpoint_seeds))
    p.add_argument("--epochs", type=int, default=base.train.epochs)
    p.add_argument("--block-out-channels", type=int, nargs="+", default=list(base.train.block_out_channels))
    p.add_argument("--coupled", action="store_true",
                   help="subset models replay the full-data run of their seed without the other rows (less training noise)")
    p.add_argument("--design", default=base.subset_design, choices=list(SUBSET_DESIGNS),
                   help="stratified: fixed class make-up (within-class effects); dirichlet: class proportions drawn "
                        "from a Dirichlet; groups: leave one class or style cluster out (group counterfactuals)")
    p.add_argument("--dirichlet-alpha", type=float, default=base.dirichlet_alpha,
                   help="concentration of the dirichlet design (smaller: more uneven class make-up)")
    p.add_argument("--clusters-per-class", type=int, default=base.clusters_per_class,
                   help="k-means style clusters of classifier embeddings per class (groups design)")
    p.set_defaults(func=cmd_prepare)

    r = common(bsub.add_parser("retrain", help="train full-data checkpoints and subset models (resumable)"))
    r.add_argument("--limit", type=int, help="train only the first LIMIT models of the job list")
    _shard_arg(r)
    _replicates_arg(r)
    _device_arg(r)
    r.set_defaults(func=cmd_retrain)

    from .setup import LDS_METHODS

    l = common(bsub.add_parser("lds", help="LDS per step of every method (settings chosen on validation queries)"))
    l.add_argument("--methods", nargs="+", default=list(LDS_METHODS))
    add_query_args(l)
    l.add_argument("--analysis-step", type=int, default=22, help="step of the top-k overlap analysis")
    l.add_argument("--cached-truth", action="store_true", help="use only the cached ground truth (see `bench truth`)")
    l.add_argument("--warm-only", action="store_true", help="only build stores, query features and caches")
    l.add_argument("--truth", type=Path, help="ground truth from a report's truth.npz instead of the work dir's cache")
    l.set_defaults(func=cmd_lds)

    c = common(bsub.add_parser("counterfactual", help="retrain without top-k influencers and regenerate"))
    add_query_args(c)
    c.add_argument("--num-cf-queries", type=int, default=2, help="reported queries used (the first ones)")
    c.add_argument("--step", type=int, default=22, help="step whose scores choose the removals")
    c.add_argument("--ks", type=int, nargs="+", default=[50, 25])
    c.add_argument("--kinds", nargs="+", default=["journey", "random", "pixel", "embedding"],
                   help="methods whose top-k are removed, 'random', and METHOD-bottom: METHOD's k most negative scores "
                        "(a direct check of the sign convention: top-k removal should raise f_t, bottom-k lower it)")
    c.add_argument("--cf-num-draws", type=int, help="draws of the stores ranking the removals (default: as chosen by `bench lds`)")
    c.add_argument("--cf-ridge", type=float, help="relative ridge of the ranking (default: as chosen by `bench lds`)")
    c.add_argument("--cf-train-seeds", type=int, nargs="+",
                   help="training seeds of every removal model, each compared with the full-data checkpoint of that "
                        "seed (default: checkpoint 0's seed only)")
    c.add_argument("--coupled", action="store_true",
                   help="retrain by replaying the full-data run of each seed without the removed rows")
    c.add_argument("--measure-only", action="store_true", help="measure the finished models, train nothing")
    _shard_arg(c)
    c.set_defaults(func=cmd_counterfactual)

    a = common(bsub.add_parser("ablation", help="LDS ablations: train timesteps matched to each step, M, d"))
    add_query_args(a)
    a.add_argument("--methods", nargs="+", default=["journey"])
    a.add_argument("--matched-draws", type=int, nargs="+", default=[4], help="draws per example of the matched stores")
    a.add_argument("--half-widths", type=int, nargs="*", default=[0, 10],
                   help="matched stores draw from [t_s - w, t_s + w] (0: exactly t_s)")
    a.add_argument("--checkpoint-counts", type=int, nargs="*", default=[],
                   help="also average only the first M checkpoints, for each M given")
    a.add_argument("--proj-dims", type=int, nargs="*", default=[], help="also project to each of these d")
    a.add_argument("--proj-kinds", nargs="*", default=[], choices=["sjlt", "gaussian", "factorized"],
                   help="also use each of these projections (same d)")
    a.add_argument("--timestep-samplings", nargs="*", default=[], choices=list(TIMESTEP_SAMPLINGS),
                   help="also draw the train timesteps this way (same draws per example)")
    a.add_argument("--query-resamples", type=int, nargs="*", default=[],
                   help="also average the query features over each of these K noises (the truth keeps --num-resamples)")
    a.add_argument("--truth", type=Path, help="ground truth from a report's truth.npz instead of the work dir's cache")
    a.set_defaults(func=cmd_ablation)

    t = common(bsub.add_parser("truth", help="cache the LDS ground truth of the subset models trained so far"))
    add_query_args(t)
    t.add_argument("--wait", action="store_true", help="keep polling until every subset model is done")
    t.add_argument("--reverse", action="store_true", help="visit models from the last (a second worker)")
    _device_arg(t)
    t.set_defaults(func=cmd_truth)

    it = common(bsub.add_parser("import-truth", help="seed the ground-truth cache from a report's truth.npz"))
    it.add_argument("--truth", type=Path, default=Path("benchmarks/results/bench/truth.npz"))
    it.set_defaults(func=cmd_import_truth)

    from .class_signal_command import add_class_signal_parser

    add_class_signal_parser(bsub)

    rp = common(bsub.add_parser("report", help="write report.json, report.md and HTML figures"))
    rp.add_argument("--out", type=Path, default=Path("benchmarks/results/bench"))
    rp.set_defaults(func=cmd_report)
