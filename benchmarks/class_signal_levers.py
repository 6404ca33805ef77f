"""Which train-feature levers carry the class signal? An offline ablation on the bundled digits.

For one checkpoint, train features are computed once per (timestep, noise) draw with common
random numbers (every example the same draw): D single-draw stores at the timesteps of
``--grid``. Every variant below is then a different average of those draws (no new gradients):

- ``all``: the mean over all D draws (a CRN store with D draws over [0, T));
- ``band-w``: for a query at timestep t, the mean over the w grid timesteps nearest to t
  in log(t + 5) (a per-timestep-band store);
- the query with fresh noises (Eq. 3's K = 20, as the app) or ``matched``: Eq. 3 at the
  query's timestep with the K = w noises of the band's train draws (common random numbers
  between query and train features);
- each with and without centering (the mean train feature removed from Phi before the kernel);
- the ridge sweep.

Compared with the per-example-draw store shipped in ``assets/store/journey`` (checkpoint 0 alone).
The class measures (:mod:`attribution.evaluation.class_signal`) are computed on validation
samples only (seed offset 50,000 by default): this chooses settings, it reports nothing final.

    python benchmarks/class_signal_levers.py --num-samples 20 --out benchmarks/results/class_signal_levers.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.models.classifier import load_classifier  # noqa: E402
from attribution.config import QueryConfig, SamplingConfig  # noqa: E402
from attribution.data.datasets import digits_dataset  # noqa: E402
from attribution.config import FeaturizeConfig  # noqa: E402
from attribution.evaluation.class_signal import REPORT_TIMESTEPS, class_measures, steps_of_timesteps  # noqa: E402
from attribution.features.gradients import DrawBatch, GradientTarget  # noqa: E402
from attribution.features.featurize import draw_timesteps_and_noise  # noqa: E402
from attribution.models.load import load_models  # noqa: E402
from attribution.scoring.scorer import Scorer  # noqa: E402
from attribution.features.store import Store  # noqa: E402
from attribution.sampling.trajectory import sample_trajectory  # noqa: E402

GRID = (0, 2, 5, 10, 20, 40, 70, 110, 160, 240, 330, 480, 600, 740, 860, 980)


def draw_store(work: Path, model: Path, t: int, k: int, threads: int) -> Path:
    """Featurize (or reuse) the single-draw CRN store of timestep t (draw seed k)."""
    path = work / f"t{t:03d}"
    if not (path / "manifest.json").exists() or not Store.open(path).is_complete():
        subprocess.run(["attribution", "featurize", "--model", str(model), "--data", "digits", "--store", str(path),
                        "--num-draws", "1", "--timestep-range", str(t), str(t + 1), "--draw-sharing", "common", "--draw-seed", str(k),
                        "--device", "cpu"], check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)},
                       cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def log_distance(a: float, b: float) -> float:
    return abs(math.log(a + 5) - math.log(b + 5))


class TrakVariant:
    """TRAK scores phi (phi^T phi + lambda I)^-1 g of one train-feature variant, factored once.

    phi (N, d) float64 (centred if asked); one Cholesky factor per ridge."""

    def __init__(self, phi: torch.Tensor, ridges: list[float], center: bool):
        self.phi = phi - phi.mean(0, keepdim=True) if center else phi
        k = self.phi.T @ self.phi
        eye = torch.eye(k.shape[0], dtype=k.dtype)
        self.chol = {r: torch.linalg.cholesky(k + r * float(torch.trace(k)) / k.shape[0] * eye) for r in ridges}

    def scores(self, g: torch.Tensor, ridge: float) -> torch.Tensor:
        """g (d,) -> (N,)."""
        return self.phi @ torch.cholesky_solve(g[:, None], self.chol[ridge])[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "levers", help="where the single-draw stores go")
    ap.add_argument("--num-samples", type=int, default=20, help="validation samples")
    ap.add_argument("--seed-offset", type=int, default=50_000, help="first sampling seed (validation)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 16], help="band widths w (16 = all draws)")
    ap.add_argument("--ridges", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0], help="relative ridges")
    ap.add_argument("--top-k", type=int, default=8, help="k of the class shares")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "class_signal_levers.json",
                    help="JSON output")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model_dir = ROOT / "assets" / "ensemble" / "ddpm-seed0"
    stores = [Store.open(draw_store(args.work, model_dir, t, k, args.threads)) for k, t in enumerate(GRID)]
    draws = torch.stack([torch.from_numpy(s.read_rows(0, 0, s.num_train).astype(np.float64)) for s in stores])  # (D, N, d)
    shipped = Store.open(ROOT / "assets" / "store" / "journey")
    per_example = torch.from_numpy(shipped.read_rows(0, 0, shipped.num_train).astype(np.float64))  # (N, d)
    labels = np.asarray(digits_dataset("train").labels)
    model = load_models([model_dir])[0]
    clf = load_classifier()
    scorer = Scorer(stores[0], [model], "journey", QueryConfig())
    shape = tuple(model.image_shape)
    draw_noise = torch.stack([
        draw_timesteps_and_noise(np.array([0]), FeaturizeConfig(num_draws=1, timestep_range=(t, t + 1),
                                                                draw_sharing="common", draw_seed=k), 1000, shape)[1][0, 0]
        for k, t in enumerate(GRID)])  # (D, C, H, W): the noise of each single-draw store

    def matched_query(x0: torch.Tensor, t: int, near: list[int]) -> torch.Tensor:
        ts = torch.full((1, len(near)), t, dtype=torch.long)
        target = GradientTarget(model, scorer.params[0], scorer.output)
        return scorer.projectors[0].step_features(target, DrawBatch(x0[None], ts, draw_noise[near][None]))[0].double()
    results: dict[str, dict] = {}
    nears = {w: [sorted(range(len(GRID)), key=lambda j: log_distance(GRID[j], t))[:w] for t in REPORT_TIMESTEPS]
             for w in args.widths}
    variants = {(w, si, center): TrakVariant(draws[near].mean(0), args.ridges, center)
                for w in args.widths for si, near in enumerate(nears[w]) for center in (False, True)}
    shipped_variants = {center: TrakVariant(per_example, args.ridges, center) for center in (False, True)}
    print(f"kernels factored ({time.perf_counter() - t0:.0f} s)", flush=True)
    for q in range(args.num_samples):
        traj = sample_trajectory(model, SamplingConfig(seed=args.seed_offset + q))
        c = int(clf.predict_proba(traj.sample[None])[0].argmax())
        steps = steps_of_timesteps(traj.timesteps, REPORT_TIMESTEPS)
        g = scorer.query_features(traj, steps)[0].double()  # (S, d)
        for w in args.widths:
            matched = [matched_query(traj.x0_hat[s], t, near) for s, t, near in zip(steps, REPORT_TIMESTEPS, nears[w])]
            for query, qfeats in (("fresh", g), ("matched", matched)):
                for center in (False, True):
                    for ridge in args.ridges:
                        rows = [variants[(w, si, center)].scores(qfeats[si], ridge) for si in range(len(steps))]
                        band = "all" if w >= len(GRID) else f"band-{w}"
                        name = f"crn {band} {query}{' centred' if center else ''} ridge {ridge:g}"
                        m = class_measures(torch.stack(rows).numpy(), labels, c, args.top_k, 10)
                        r = results.setdefault(name, {"top_pos_share": [], "argmax_is_class": [], "top_neg_share": []})
                        for key in r:
                            r[key].append(m[key].tolist())
        for center in (False, True):
            for ridge in args.ridges:
                sc = torch.stack([shipped_variants[center].scores(g[si], ridge) for si in range(len(steps))])
                m = class_measures(sc.numpy(), labels, c, args.top_k, 10)
                r = results.setdefault(f"shipped per-example d8{' centred' if center else ''} ridge {ridge:g}",
                                       {"top_pos_share": [], "argmax_is_class": [], "top_neg_share": []})
                for key in r:
                    r[key].append(m[key].tolist())
        print(f"sample {q + 1}/{args.num_samples} (class {c}) {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {name: {k: np.mean(v, axis=0).tolist() for k, v in r.items()} for name, r in results.items()}
    ts = " | ".join(f"t={t}" for t in REPORT_TIMESTEPS)
    print(f"| variant | {ts} | argmax at t<=480 |\n|---|" + "---|" * (len(REPORT_TIMESTEPS) + 1))
    for name, s in sorted(summary.items(), key=lambda kv: -np.mean(kv[1]["top_pos_share"][2:])):
        cells = " | ".join(f"{100 * v:.0f}" for v in s["top_pos_share"])
        print(f"| {name} | {cells} | {100 * np.mean(s['argmax_is_class'][2:]):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"grid": GRID, "timesteps": REPORT_TIMESTEPS, "num_samples": args.num_samples,
                                    "seed_offset": args.seed_offset, "top_k": args.top_k, "summary": summary,
                                    "wall_seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
