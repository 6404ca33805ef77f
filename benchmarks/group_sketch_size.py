"""How small can per-group sketches be? The store budget of parameter-group kernels (issue 19).

``layer_weighting.py`` scores with one TRAK kernel per UNet block on per-group features of the
shipped sketch's width (G = 10 groups x d = 2,048 per example and checkpoint: 10x the shipped
store, over the 120 MB asset budget). This script reads its cached per-group features of
checkpoint 0 and shrinks them by a second, seeded Gaussian sketch per group (R_g: d x d_g, entries
N(0, 1/d_g); a sketch of a sketch is again a Johnson-Lindenstrauss sketch of the gradient), keeping
either all groups or only the groups the label-free weights use (weight >= ``--min-weight`` when
fitted at full width). For each (groups, d_g) it fits the weights again on the self-queries (no
labels), chooses the ridge on the validation samples and reports the class measures on seeds 0-49,
beside the store's bytes per example and checkpoint (float16).

Needs ``python benchmarks/layer_weighting.py`` (checkpoint 0) to have filled ``--work`` first.

    python benchmarks/group_sketch_size.py --out benchmarks/results/group_sketch_size.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_weighting as lw  # noqa: E402
from attribution.config import SamplingConfig  # noqa: E402
from attribution.data.datasets import digits_dataset  # noqa: E402
from attribution.evaluation.class_signal import REPORT_TIMESTEPS  # noqa: E402
from attribution.features.gradients import select_params  # noqa: E402
from attribution.features.projection.grouped import param_groups  # noqa: E402
from attribution.models.classifier import load_classifier  # noqa: E402
from attribution.models.load import load_models  # noqa: E402
from attribution.sampling.trajectory import sample_trajectory  # noqa: E402
from attribution.scoring.param_groups import GroupedTrak, fit_self_retrieval_weights, self_moments  # noqa: E402

ROOT = lw.ROOT


def load_npz(path: Path, key: str) -> np.ndarray:
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python benchmarks/layer_weighting.py` first (it caches it)")
    with np.load(path) as f:
        return f[key]


def sample_classes(model, offset: int, num: int) -> list[int]:
    """The classifier's class of the samples of seeds offset..offset+num-1 (as layer_weighting's sample_set)."""
    clf = load_classifier()
    return [int(clf.predict_proba(sample_trajectory(model, SamplingConfig(seed=offset + k)).sample[None]).argmax())
            for k in range(num)]


def reproject(x: np.ndarray, groups: list[int], d_small: int, seed: int) -> torch.Tensor:
    """Per-group features x (..., G, d) -> (..., len(groups), d_small) through R_g (d, d_small) ~ N(0, 1/d_small)
    seeded by (seed, g); d_small >= d keeps the features as they are."""
    sel = torch.from_numpy(np.ascontiguousarray(x[..., groups, :]))
    d = sel.shape[-1]
    if d_small >= d:
        return sel
    out = []
    for j, g in enumerate(groups):
        r = torch.randn(d, d_small, generator=torch.Generator().manual_seed(seed * 1000 + g)) / d_small ** 0.5
        out.append(sel[..., j, :] @ r)
    return torch.stack(out, -2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "layer_weighting", help="layer_weighting.py's cache")
    ap.add_argument("--num-train", type=int, default=4000, help="training examples of the cached features")
    ap.add_argument("--num-self", type=int, default=800, help="self-queries of the cache")
    ap.add_argument("--self-seed", type=int, default=12345, help="seed of the cached self-queries")
    ap.add_argument("--fit-share", type=float, default=0.5, help="share of the self-queries the weights are fitted on")
    ap.add_argument("--num-val", type=int, default=20, help="validation samples of the cache (seeds 50000...)")
    ap.add_argument("--num-report", type=int, default=50, help="reported samples of the cache (seeds 0...)")
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 512, 256, 128], help="per-group sketch widths d_g")
    ap.add_argument("--min-weight", type=float, default=0.02,
                    help="the 'used groups' keep the groups whose full-width learned weight is at least this")
    ap.add_argument("--ridges", type=float, nargs="+", default=[1e-2, 1e-1, 1.0], help="relative ridges tried")
    ap.add_argument("--top-k", type=int, default=8, help="k of the class shares")
    ap.add_argument("--seed", type=int, default=0, help="seed of the second sketches")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "group_sketch_size.json",
                    help="JSON output (a .md table beside it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    n = args.num_train
    phi = load_npz(args.work / f"train_m0_n{n}.npz", "phi")  # (G, N, d)
    q_val = load_npz(args.work / f"samples_m0_50000_{args.num_val}.npz", "q")  # (P, S, G, d)
    q_rep = load_npz(args.work / f"samples_m0_0_{args.num_report}.npz", "q")
    q_self = load_npz(args.work / f"self_m0_n{n}_{args.num_self}_{args.self_seed}.npz", "q")  # (Q, G, d)
    num_groups, _, d_full = phi.shape
    labels = np.asarray(digits_dataset().labels)[:n]
    model = load_models([ROOT / "assets" / "ensemble" / "ddpm-seed0"])[0]
    schedule = [int(t) for t in sample_trajectory(model, SamplingConfig(seed=50_000)).timesteps]
    self_idx, _ = lw.self_query_set(args.num_self, n, schedule, args.self_seed)
    fit = slice(0, int(round(args.fit_share * len(self_idx))))
    sidx = torch.from_numpy(self_idx)[fit]
    classes = {"validation": sample_classes(model, 50_000, args.num_val), "report": sample_classes(model, 0, args.num_report)}
    names = [g.name for g in param_groups(select_params(model))]  # the shipped store differentiates every parameter
    if len(names) != num_groups:
        raise SystemExit(f"the cache has {num_groups} groups, the model {len(names)}")

    def run(groups: list[int], d_small: int) -> dict:
        trak = GroupedTrak(reproject(phi.transpose(1, 0, 2), groups, d_small, args.seed).transpose(0, 1).contiguous(),
                           args.ridges)
        sq = reproject(q_self, groups, d_small, args.seed)[fit]
        # query features (P, S, G', d_g) -> flat (P S, G', d_g), sketched once for every ridge
        val_q, rep_q = (reproject(q, groups, d_small, args.seed).flatten(0, 1) for q in (q_val, q_rep))

        def scores(w, q: torch.Tensor, r: float) -> np.ndarray:
            """(P, S, N) weighted scores of the flat query features q at ridge r."""
            return w.combine(trak.group_scores(q, r)).numpy().reshape(-1, len(REPORT_TIMESTEPS), n)

        weights = {}
        for r in args.ridges:
            a, c = self_moments(trak.group_scores(sq, r), sidx)
            weights[r] = fit_self_retrieval_weights(a, c, [names[g] for g in groups])
        val = {r: lw.measure(scores(w, val_q, r), labels, classes["validation"], args.top_k) for r, w in weights.items()}
        best = max(val, key=lambda r: lw.headline(val[r], list(REPORT_TIMESTEPS)))
        return {"groups": groups, "d_g": min(d_small, d_full), "bytes_per_example": 2 * len(groups) * min(d_small, d_full),
                "ridge": best, "weights": weights[best].to_dict(), "validation": val[best],
                "report": lw.measure(scores(weights[best], rep_q, best), labels, classes["report"], args.top_k)}

    full = run(list(range(num_groups)), d_full)
    used = [g for g, v in enumerate(full["weights"].values()) if v >= args.min_weight]
    rows = []
    for subset, groups in (("all groups", list(range(num_groups))), (f"groups with w >= {args.min_weight:g}", used)):
        for d_small in args.dims:
            r = full if (groups == full["groups"] and d_small >= d_full) else run(groups, d_small)
            rows.append({"variant": f"{subset}, d_g = {r['d_g']}", **r})
            m = r["report"]["top_pos_share"]
            print(f"{rows[-1]['variant']:<36} {r['bytes_per_example']:>6} B  ridge {r['ridge']:<5g} reported top-8 share "
                  + " ".join(f"{100 * v:3.0f}" for v in m), flush=True)

    ts = " | ".join(f"t={t}" for t in REPORT_TIMESTEPS)
    md = ["# Per-group sketch size (`benchmarks/group_sketch_size.py`)", "",
          f"Checkpoint 0, {n} training digits, per-group features of `layer_weighting.py` shrunk by a second Gaussian "
          "sketch per group; weights refitted on self-queries (no labels), ridge chosen on validation (seeds "
          f"50000-{50000 + args.num_val - 1}), measured on seeds 0-{args.num_report - 1}. The shipped store holds 4,096 bytes "
          "per example and checkpoint (d = 2,048, float16).", "",
          f"| variant | bytes / example / checkpoint | ridge | {ts} | class sum is max, t<=480 |",
          "|---|---|---|" + "---|" * (len(REPORT_TIMESTEPS) + 1)]
    for r in rows:
        m = r["report"]
        arg = np.mean([v for v, t in zip(m["argmax_is_class"], REPORT_TIMESTEPS) if t <= 480])
        md.append(f"| {r['variant']} | {r['bytes_per_example']} | {r['ridge']:g} | "
                  + " | ".join(f"{100 * v:.0f}" for v in m["top_pos_share"]) + f" | {100 * arg:.0f} |")
    md += ["", f"Wall time {time.perf_counter() - t0:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "timesteps": list(REPORT_TIMESTEPS),
                                    "rows": rows, "wall_seconds": time.perf_counter() - t0}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
