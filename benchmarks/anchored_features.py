"""Timestep-anchored train features with matched query noises: how many draws, checkpoints, dimensions?

Follow-up of ``class_signal_levers.py`` (which found that train features drawn at the query's
own timestep, with the query's Eq. 3 noises equal to the train draws' shared noises, carry
the class signal). Here, at the timesteps of ``--timesteps``, with D common draws at exactly
that timestep (``featurize --timestep-range t t+1 --draw-sharing common --num-draws D``):

- D = 1 vs D = ``--draws``;
- M = 1 vs all checkpoints (scores averaged, as the Scorer does);
- d = 2048 vs its first ``--low-dim`` coordinates;
- an anchor off the query's timestep: the single-draw store of ``class_signal_levers.py`` at
  the next grid timestep, the query still at its own timestep.

Validation samples only (seed offset 50,000): this chooses settings.

    python benchmarks/anchored_features.py --num-samples 12 --out benchmarks/results/anchored_features.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from class_signal_levers import GRID, TrakVariant, draw_store  # noqa: E402

from attribution.models.classifier import load_classifier  # noqa: E402
from attribution.config import QueryConfig, SamplingConfig  # noqa: E402
from attribution.data.datasets import digits_dataset  # noqa: E402
from attribution.evaluation.class_signal import class_measures, steps_of_timesteps  # noqa: E402
from attribution.features.gradients import DrawBatch, GradientTarget  # noqa: E402
from attribution.features.featurize import draw_timesteps_and_noise  # noqa: E402
from attribution.models.load import load_models  # noqa: E402
from attribution.scoring.scorer import Scorer  # noqa: E402
from attribution.features.store import Store  # noqa: E402
from attribution.sampling.trajectory import sample_trajectory  # noqa: E402

MODELS = [ROOT / "assets" / "ensemble" / f"ddpm-seed{s}" for s in range(3)]


def anchored_store(work: Path, t: int, draws: int, seed: int, threads: int) -> Store:
    """The D-draw CRN store of all checkpoints at timestep t (featurized once)."""
    path = work / f"t{t:03d}-d{draws}"
    if not (path / "manifest.json").exists() or not Store.open(path).is_complete():
        cmd = ["attribution", "featurize", "--data", "digits", "--store", str(path), "--num-draws", str(draws),
               "--timestep-range", str(t), str(t + 1), "--draw-sharing", "common", "--draw-seed", str(seed),
               "--device", "cpu"]
        for m in MODELS:
            cmd += ["--model", str(m)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return Store.open(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "levers", help="where the stores go")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[240, 480], help="query timesteps (grid points)")
    ap.add_argument("--draws", type=int, default=4, help="D of the multi-draw stores")
    ap.add_argument("--low-dim", type=int, default=1024, help="the lower projection dimension tried")
    ap.add_argument("--num-samples", type=int, default=12, help="validation samples")
    ap.add_argument("--seed-offset", type=int, default=50_000, help="first sampling seed (validation)")
    ap.add_argument("--ridge", type=float, default=0.1, help="relative ridge")
    ap.add_argument("--top-k", type=int, default=8, help="k of the class shares")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anchored_features.json",
                    help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = load_models(MODELS)
    shape = tuple(models[0].image_shape)
    labels = np.asarray(digits_dataset("train").labels)
    clf = load_classifier()
    variants, noises, scorer_of = {}, {}, {}
    for t in args.timesteps:
        multi = anchored_store(args.work, t, args.draws, 100 + t, args.threads)
        cfg = multi.config
        noises[(t, "multi")] = draw_timesteps_and_noise(np.array([0]), cfg, 1000, shape)[1][0]  # (D, C, H, W)
        phis = [torch.from_numpy(multi.read_rows(m, 0, multi.num_train).astype(np.float64)) for m in range(3)]
        for m in range(3):
            variants[(t, f"D{args.draws}", m)] = TrakVariant(phis[m], [args.ridge], False)
        variants[(t, f"D{args.draws} low-d", 0)] = TrakVariant(phis[0][:, : args.low_dim], [args.ridge], False)
        scorer_of[t] = Scorer(multi, models, "journey", QueryConfig())
        j = GRID.index(t)
        for name, k in (("D1", j), ("D1 next anchor", j + 1)):
            single = Store.open(draw_store(args.work, MODELS[0], GRID[k], k, args.threads))
            variants[(t, name, 0)] = TrakVariant(torch.from_numpy(single.read_rows(0, 0, single.num_train).astype(np.float64)),
                                                 [args.ridge], False)
            noises[(t, name)] = draw_timesteps_and_noise(np.array([0]), single.config, 1000, shape)[1][0]
    print(f"kernels factored ({time.perf_counter() - t0:.0f} s)", flush=True)

    def query(m: int, x0: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        sc = scorer_of[t]
        ts = torch.full((1, len(eps)), t, dtype=torch.long)
        target = GradientTarget(models[m], sc.params[m], sc.output)
        return sc.projectors[m].step_features(target, DrawBatch(x0[None], ts, eps[None]))[0].double()

    rows: dict[str, list] = {}
    for q in range(args.num_samples):
        traj = sample_trajectory(models[0], SamplingConfig(seed=args.seed_offset + q))
        c = int(clf.predict_proba(traj.sample[None])[0].argmax())
        steps = steps_of_timesteps(traj.timesteps, args.timesteps)
        for s, t in zip(steps, args.timesteps):
            x0 = traj.x0_hat[s]
            out = {}
            for name in ("D1", "D1 next anchor"):
                out[name] = variants[(t, name, 0)].scores(query(0, x0, t, noises[(t, name)]), args.ridge)
            eps = noises[(t, "multi")]
            g = [query(m, x0, t, eps) for m in range(3)]
            dname = f"D{args.draws}"
            out[dname] = variants[(t, dname, 0)].scores(g[0], args.ridge)
            out[f"{dname} M3"] = sum(variants[(t, dname, m)].scores(g[m], args.ridge) for m in range(3)) / 3
            out[f"{dname} d{args.low_dim}"] = variants[(t, f"{dname} low-d", 0)].scores(g[0][: args.low_dim], args.ridge)
            for name, sc in out.items():
                meas = class_measures(sc.numpy()[None], labels, c, args.top_k, 10)
                rows.setdefault(f"{name} t={t}", []).append([float(meas["top_pos_share"][0]),
                                                             float(meas["argmax_is_class"][0])])
        print(f"sample {q + 1}/{args.num_samples} ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = {k: np.mean(v, axis=0).tolist() for k, v in rows.items()}
    print("| variant | top-8 positive share | class sum is max |\n|---|---|---|")
    for k, (share, arg) in sorted(summary.items()):
        print(f"| {k} | {100 * share:.0f} % | {100 * arg:.0f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                    "wall_seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
