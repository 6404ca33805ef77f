"""``attribution bench class-signal``: the class measures of :mod:`.class_signal` on a store's models.

Writes ``class_signal.json`` (per-sample arrays and per-step summaries) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .class_signal import ClassSignalSpec, measure_class_signal, spec_dict, summary_table

SIMILARITY = ("pixel", "embedding")


def _trajectories(model, spec: ClassSignalSpec) -> list:
    from ..config import SamplingConfig
    from ..sampling.trajectory import sample_trajectory

    return [sample_trajectory(model, SamplingConfig(num_inference_steps=spec.num_inference_steps, seed=s))
            for s in spec.seeds]


def cmd_class_signal(args: argparse.Namespace) -> None:
    from ..scoring.baselines import SimilarityBaseline
    from ..models.classifier import load_classifier
    from ..config import QueryConfig
    from ..data.datasets import load_dataset
    from ..models.load import load_models
    from ..scoring.anchored import checkpoint_dirs, is_anchored, open_scorer, reference_store

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    store = reference_store(args.store)
    models = load_models(checkpoint_dirs(args.store))
    dataset = load_dataset(args.data or store.manifest["dataset"]["name"])
    if dataset.labels is None:
        raise ValueError(f"dataset {args.data!r} has no labels: the class measures need them")
    labels = np.asarray(dataset.labels)
    clf = load_classifier(args.classifier) if args.classifier else load_classifier()
    spec = ClassSignalSpec(num_samples=args.num_samples, seed_offset=args.seed_offset, top_k=args.top_k,
                           timesteps=tuple(args.timesteps))
    trajs = _trajectories(models[0], spec)
    classify = lambda x: clf.predict_proba(x)  # noqa: E731
    results = []
    for method in args.methods:
        if method in SIMILARITY:
            base = SimilarityBaseline(dataset, clf.embed if method == "embedding" else None, method)
            score_fn = lambda traj, steps, b=base: b.scores(traj.x0_hat[steps])  # noqa: E731
            settings = {}
        else:
            query = QueryConfig(num_resamples=args.num_resamples, ridge=args.ridge)
            scorer = open_scorer(args.store, models, method, query, dataset=dataset)
            score_fn = lambda traj, steps, s=scorer: s.score(traj, steps).scores  # noqa: E731
            settings = {"ridge": args.ridge, "num_resamples": args.num_resamples, "store": store.config.to_dict(), "anchored": is_anchored(args.store),
                        "num_checkpoints": store.num_checkpoints}
        r = measure_class_signal(score_fn, trajs, labels, classify, spec, method, settings=settings)
        results.append(r)
        tqdm.write(f"{method}: top-{spec.top_k} positive share {np.round(100 * r.top_pos_share.mean(0)).tolist()} "
                   f"({r.seconds:.0f} s)")
    summaries = [r.summary() for r in results]
    conf = np.asarray(results[0].sample_confidence)
    out = {
        "store": str(args.store), "spec": spec_dict(spec), "summaries": summaries,
        "sample_classes": results[0].sample_classes, "sample_confidence": conf.tolist(),
        "share_confident_0.9": float((conf >= 0.9).mean()),
        "per_sample": {r.method: {"top_pos_share": r.top_pos_share.tolist(), "top_neg_share": r.top_neg_share.tolist(),
                                  "argmax_is_class": r.argmax_is_class.tolist(), "class_sums": r.class_sums.tolist()}
                       for r in results},
        "wall_seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out))
    print(summary_table(summaries))
    print(f"samples classified with confidence >= 0.9: {100 * out['share_confident_0.9']:.0f} %")
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")


def add_class_signal_parser(bsub: argparse._SubParsersAction) -> None:
    """Register ``attribution bench class-signal``."""
    from ..config import DEFAULT_RIDGE, QueryConfig

    spec = ClassSignalSpec()
    p = bsub.add_parser("class-signal", help="share of the sample's class among the top influencers, and group "
                                              "influence by class, at the issue's timesteps")
    p.add_argument("--store", type=Path, required=True, help="store directory (its manifest names the models)")
    p.add_argument("--data", help="training set spec (default: the one the store's manifest names)")
    p.add_argument("--classifier", type=Path, help="digit classifier directory (default: the bundled one)")
    p.add_argument("--methods", nargs="+", default=["journey", "pixel", "embedding"],
                   help="store methods by name (journey, tracin, ...) and the similarity baselines pixel, embedding")
    p.add_argument("--num-samples", type=int, default=spec.num_samples, help="generated samples measured")
    p.add_argument("--seed-offset", type=int, default=spec.seed_offset,
                   help="first sampling seed (use another offset for validation runs that choose settings)")
    p.add_argument("--top-k", type=int, default=spec.top_k, help="k of the top-k class shares")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(spec.timesteps),
                   help="timesteps of the measured steps (each must be a step of the 50-step DDIM schedule)")
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="relative ridge of TRAK-type methods")
    p.add_argument("--num-resamples", type=int, default=QueryConfig().num_resamples, help="K of Eq. (3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/class_signal.json"), help="JSON output file")
    p.set_defaults(func=cmd_class_signal)
