"""How much class signal the group-counterfactual ground truth itself holds (issue 19's validity check).

On a prepared ``--design groups`` benchmark (leave one class out, then within-class style
clusters; several training seeds each), for every query q and evaluated step s, with
Delta f_g = f_s(theta_without_g) - f_s(theta_full) of the same training seed:

* ``seed_agreement``: Spearman across all groups between two seeds' Delta f (the validity
  that `bench lds` reports);
* ``own_class_top1``: share of queries whose own class (the bundled classifier's label of
  the generated sample) is the class group with the largest seed-mean Delta f (chance 10 %);
* ``own_class_top1_per_seed``: the same for each seed alone, and ``top1_seed_agreement``:
  share of queries where two seeds pick the same top class group;
* ``own_minus_other``: mean Delta f of removing the own class minus the mean over the other
  nine classes, and ``seed_sd``: the standard deviation over seeds of Delta f of one removal
  (the retraining noise it must stand out from).

Needs only cached truths and the full-data checkpoints (no retraining)::

    python benchmarks/group_truth_diagnostics.py --work benchmarks/work-groups --replicates 3 \
        --json benchmarks/results/group_truth_diagnostics.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attribution.evaluation.queries import QuerySpec, load_or_generate_queries, step_outputs
from attribution.evaluation.run import replicate_truths
from attribution.evaluation.setup import load_prepared
from attribution.models import load_classifier, load_model
from attribution.workspace import ASSETS_DIR


def query_labels(samples: torch.Tensor) -> np.ndarray:
    """Bundled classifier's labels of generated samples (Q, 1, H, W) in [-1, 1] -> (Q,)."""
    clf = load_classifier(ASSETS_DIR / "classifier")
    with torch.no_grad():
        x = F.interpolate(samples.float(), size=(32, 32), mode="bilinear", align_corners=False)
        return clf(x).argmax(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="prepared groups benchmark directory")
    ap.add_argument("--replicates", type=int, default=2, help="training seeds per group model to use")
    ap.add_argument("--num-queries", type=int, default=50, help="as for `bench lds` (the cached query set)")
    ap.add_argument("--num-val-queries", type=int, default=10, help="as for `bench lds`")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    config, paths, dataset, subsets = load_prepared(args.work)
    if config.subset_design != "groups":
        raise SystemExit(f"{args.work} is a {config.subset_design!r} benchmark, not a groups one")
    spec = QuerySpec(num_queries=args.num_queries, num_val_queries=args.num_val_queries)
    models = [load_model(paths.checkpoint(s)) for s in config.checkpoint_seeds]
    queries = load_or_generate_queries(paths.queries, models[0], spec)
    truths, ids = replicate_truths(paths, queries, spec, config.num_subsets, args.replicates, compute=False)
    seeds = [config.replicate_seed(r) for r in range(truths.shape[0])]
    full = np.stack([step_outputs(models[config.checkpoint_seeds.index(s)], queries, spec) for s in seeds])
    delta = truths - full[:, None]  # (R, G, Q, S)
    removed = ~subsets[ids]  # (G, N)
    labels = dataset.labels
    # class groups: those that remove exactly one whole class
    class_of = {g: int(c) for g, row in enumerate(removed) for c in np.unique(labels[row])
                if len(np.unique(labels[row])) == 1 and row.sum() == (labels == c).sum()}
    cls_groups = sorted(class_of, key=class_of.get)
    cls = np.array([class_of[g] for g in cls_groups])
    y = query_labels(queries.sample)
    d_cls = delta[:, cls_groups]  # (R, 10, Q, S)
    mean = d_cls.mean(0)  # (10, Q, S)
    own = (cls[:, None] == y[None])  # (10, Q)
    top_mean = cls[mean.argmax(0)]  # (Q, S)
    top_seed = cls[d_cls.argmax(1)]  # (R, Q, S)
    r = len(seeds)
    pair_same = [np.mean(top_seed[a] == top_seed[b], axis=0) for a in range(r) for b in range(a + 1, r)]
    own_d = (mean * own[:, :, None]).sum(0)
    other_d = (mean * ~own[:, :, None]).sum(0) / 9
    from attribution.evaluation.group_counterfactual import seed_agreement

    out = {
        "work": str(args.work), "seeds": seeds, "num_groups": int(len(ids)), "num_class_groups": len(cls_groups),
        "timesteps": queries.timesteps[list(spec.steps)].tolist(),
        "seed_agreement": seed_agreement(truths, full),
        "own_class_top1": np.mean(top_mean == y[:, None], axis=0).tolist(),
        "own_class_top1_per_seed": np.mean(top_seed == y[None, :, None], axis=1).tolist(),
        "top1_seed_agreement": np.mean(pair_same, axis=0).tolist() if pair_same else None,
        "own_minus_other": (own_d - other_d).mean(0).tolist(),
        "own_minus_other_se": ((own_d - other_d).std(0) / np.sqrt(len(y))).tolist(),
        "mean_abs_delta": np.abs(mean).mean(axis=(0, 1)).tolist(),
        "seed_sd": d_cls.std(0, ddof=1).mean(axis=(0, 1)).tolist() if r > 1 else None,
        "wall_seconds": time.perf_counter() - t0,
    }
    print("t      seed-agr  own-top1  own-top1/seed      top1 seed-agr  own-other (se)     seed sd")
    for s, t in enumerate(out["timesteps"]):
        per = " ".join(f"{v[s]:.2f}" for v in out["own_class_top1_per_seed"])
        agr = f"{out['top1_seed_agreement'][s]:.2f}" if pair_same else "  - "
        sd = f"{out['seed_sd'][s]:.2e}" if r > 1 else "-"
        print(f"{t:4d}   {out['seed_agreement'][s]:+.2f}     {out['own_class_top1'][s]:.2f}      {per:16s}  {agr}"
              f"           {out['own_minus_other'][s]:+.2e} ({out['own_minus_other_se'][s]:.1e})  {sd}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
