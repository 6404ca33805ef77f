"""Learned per-parameter-group weights for journey-TRAK (Li et al., ICLR 2026, arXiv 2506.05647): an offline ablation.

The UNet's parameters are cut into G groups (its blocks: conv_in, time embedding, each down
block, mid block, each up block, the output head). With the shipped store's projection P of
checkpoint 0 (sjlt, d = 2048, seed 0) restricted to a group's columns, P_g = P[:, g], every
train feature and query feature splits exactly into per-group parts,

    phi_i = sum_g phi_{g,i},  phi_{g,i} = P_g grad_g (1/D) sum_d L(theta; x_i, t_id, eps_id)   (train, the store's draws)
    q_s   = sum_g q_{g,s},    q_{g,s}   = P_g grad_g f_s(theta),  f_s = Eq. 3 at x0_hat_s, K fresh noises (query)

and each group gets its own TRAK score (per-group kernel, Eq. 3 with the TRAK estimator):

    s_g(q, i) = phi_{g,i}^T (Phi_g^T Phi_g + lambda_g I)^-1 q_g,   lambda_g = ridge * tr(Phi_g^T Phi_g) / d

The weighted score is tau_w(q, i) = sum_g w_g s_g(q, i), w >= 0, sum_g w_g = 1 (w = softmax(theta)).
Baselines: ``joint`` (the plain journey-TRAK score: one kernel of phi = sum_g phi_g, i.e. the
shipped store's checkpoint 0) and ``uniform`` (w_g = 1 / G).

**Objective (label-free, self-retrieval).** A training image x_i queried as if it were a
step's x0_hat (Eq. 3 at x_i, a timestep t of the sampling schedule, K noises drawn fresh, not
the store's) should retrieve itself. For such a self-query q with scores tau_w(q, .) (N,):

    z_w(q) = (tau_w(q, i) - mean_j tau_w(q, j)) / std_j tau_w(q, j)   (the self-score's z-score)
           = w^T a_q / sqrt(w^T C_q w),  a_q = s(q, i) - mean_j s(q, j) (G,),  C_q = cov_j s(q, j) (G, G)

and w maximizes the mean of z_w over the fit self-queries (Adam on theta). Reported also:
z on held-out self-queries (other training images, other noises), and the same fit with the
objective mean log-softmax_j (tau_w(q, j) / std_j tau_w(q, j))[i] (``--objective logsoftmax``,
a robustness check; the z-score objective was fixed before any class measure was seen).
Optionally (``--bands``) w is fitted separately on the self-queries of each timestep band and a
sample step uses its band's weights. No class label enters the fit.

**Class measures** (:func:`attribution.evaluation.class_signal.class_measures`) of every
variant (joint, uniform, learned, per-band, each group alone) at ``REPORT_TIMESTEPS``, on
validation samples (seed offset 50,000: the ridge of each variant is chosen there, by the mean
top-8 positive share at t <= 480) and on the reported samples (seeds 0..), which choose nothing.
The per-group-alone shares are diagnostic only (which groups carry the class signal).

    python benchmarks/layer_weighting.py --out benchmarks/results/layer_weighting.json

Intermediate arrays (per-group train features, query features) are cached under ``--work``.
The per-group sketch is :class:`attribution.features.projection.grouped.GroupedSketch`, the per-group
scores and the z-score fit :mod:`attribution.scoring.param_groups`; ``--checkpoints M`` averages the
scores over the store's first M checkpoints (w fitted on the averaged per-group scores).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.config import QueryConfig, SamplingConfig  # noqa: E402
from attribution.data.datasets import digits_dataset  # noqa: E402
from attribution.evaluation.class_signal import REPORT_TIMESTEPS, TARGETS, class_measures, steps_of_timesteps  # noqa: E402
from attribution.features.featurize import auto_chunk_size, checkpoint_projector, draw_timesteps_and_noise  # noqa: E402
from attribution.features.gradients import DrawBatch, GradientTarget, select_params  # noqa: E402
from attribution.features.outputs import get_output  # noqa: E402
from attribution.features.projection.grouped import GroupedSketch, param_groups  # noqa: E402
from attribution.features.store import Store  # noqa: E402
from attribution.models.classifier import load_classifier  # noqa: E402
from attribution.models.load import load_models  # noqa: E402
from attribution.sampling.trajectory import sample_trajectory  # noqa: E402
from attribution.scoring.anchored import checkpoint_dirs  # noqa: E402
from attribution.scoring.param_groups import GroupedTrak, fit_simplex_weights, self_moments, zscores  # noqa: E402
from attribution.scoring.scorer import query_noises  # noqa: E402

MEASURE_KEYS = ("top_pos_share", "top_neg_share", "argmax_is_class")


# ---------------------------------------------------------------- features


def cached(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``make()``'s arrays, saved to / loaded from ``path`` (.npz)."""
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def train_group_features(target: GradientTarget, sketch: GroupedSketch, dataset, store: Store, m: int, num_train: int,
                         batch: int, log: Callable[[str], None]) -> np.ndarray:
    """(G, N, d) float32 per-group train features phi_{g,i} of checkpoint m with the store's draws (Algorithm 1
    lines 3-9, split by group; the draws do not depend on m)."""
    cfg = store.config
    model = target.model
    chunk = auto_chunk_size(sum(p.numel() for p in target.params.values()), cfg.num_draws)
    out = np.empty((len(sketch.groups), num_train, sketch.d), dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, num_train, batch):
        idx = np.arange(start, min(start + batch, num_train))
        ts, noises = draw_timesteps_and_noise(idx, cfg, model.num_train_timesteps, model.image_shape)
        out[:, idx] = sketch.example_features(target, DrawBatch(dataset.images(idx), ts, noises), chunk).transpose(0, 1).numpy()
        if (start // batch) % 10 == 0:
            log(f"  checkpoint {m}: train features {idx[-1] + 1}/{num_train} ({time.perf_counter() - t0:.0f} s)")
    return out


def step_group_features(target: GradientTarget, sketch: GroupedSketch, x0: torch.Tensor, timesteps: torch.Tensor,
                        noises: torch.Tensor) -> torch.Tensor:
    """Per-group Eq. 3 query features (S, G, d): x0 (S, C, H, W), timesteps (S, K), noises (S, K, C, H, W)."""
    return sketch.step_features(target, DrawBatch(x0, timesteps, noises))


def self_query_set(num: int, num_train: int, schedule: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) training indices (distinct, random) and (Q,) timesteps drawn uniformly from the sampling schedule."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_train, size=num, replace=False), rng.choice(np.asarray(schedule), size=num)


# ---------------------------------------------------------------- per-group TRAK


@dataclass
class Ensemble:
    """Scores averaged over the M checkpoints, as the Scorer does: (1/M) sum_m s_{g,m} (queries: one per checkpoint)."""

    members: list[GroupedTrak]

    def group_scores(self, q: list[torch.Tensor], ridge: float) -> torch.Tensor:
        """q: M tensors (Q, G, d) -> (G, Q, N)."""
        return sum(t.group_scores(x, ridge) for t, x in zip(self.members, q)) / len(self.members)

    def joint_scores(self, q: list[torch.Tensor], ridge: float) -> torch.Tensor:
        """q: M tensors (Q, G, d) -> (Q, N)."""
        return sum(t.joint_scores(x, ridge) for t, x in zip(self.members, q)) / len(self.members)


# ---------------------------------------------------------------- the self-retrieval objective


def self_logsoftmax(w: torch.Tensor, s: torch.Tensor, self_idx: torch.Tensor) -> torch.Tensor:
    """(Q,) log-softmax over the N training examples of tau_w / std_j tau_w at the query's own example; s (G, Q, N)."""
    tau = torch.einsum("g,gqn->qn", w, s)
    tau = tau / tau.std(1, keepdim=True).clamp_min(1e-30)
    return torch.log_softmax(tau, 1)[torch.arange(tau.shape[0]), self_idx]


# ---------------------------------------------------------------- evaluation


def share(x: np.ndarray) -> list[float]:
    """x / sum(x) as a list (x (G,) non-negative)."""
    return (np.asarray(x, dtype=np.float64) / float(np.sum(x))).tolist()


def band_of(t: int, edges: list[int]) -> int:
    """Index of the band of timestep t: band b holds edges[b-1] < t <= edges[b] (edges increasing)."""
    return bisect.bisect_left(edges, t)


def measure(scores: np.ndarray, labels: np.ndarray, classes: list[int], top_k: int) -> dict[str, list[float]]:
    """Class measures averaged over samples: scores (P, S, N) -> {measure: (S,) means}."""
    rows = [class_measures(scores[p], labels, c, top_k, 10) for p, c in enumerate(classes)]
    return {k: np.mean([r[k] for r in rows], axis=0).astype(float).tolist() for k in MEASURE_KEYS}


def headline(m: dict[str, list[float]], timesteps: list[int]) -> float:
    """Mean top-k positive share over the report timesteps t <= 480: the validation criterion for the ridge."""
    return float(np.mean([v for v, t in zip(m["top_pos_share"], timesteps) if t <= 480]))


def table(rows: dict[str, dict], timesteps: list[int], title: str) -> str:
    """Markdown: per variant, top-k positive share per timestep and the argmax rate at t <= 480 (in %)."""
    ts = " | ".join(f"t={t}" for t in timesteps)
    lines = [f"**{title}**", "", f"| variant | ridge | {ts} | class sum is max, t<=480 |", "|---|---|" + "---|" * (len(timesteps) + 1)]
    for name, r in rows.items():
        m = r["measures"]
        cells = " | ".join(f"{100 * v:.0f}" for v in m["top_pos_share"])
        arg = np.mean([v for v, t in zip(m["argmax_is_class"], timesteps) if t <= 480])
        lines.append(f"| {name} | {r['ridge']:g} | {cells} | {100 * arg:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=ROOT / "assets" / "store" / "journey",
                    help="the store whose checkpoints and settings (draws, projection) the per-group features reproduce")
    ap.add_argument("--checkpoints", type=int, default=1,
                    help="the store's first M checkpoints (scores averaged over them); 1: checkpoint 0 alone")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "layer_weighting", help="cache of intermediate arrays")
    ap.add_argument("--num-train", type=int, default=None, help="first N training examples (default: the whole store)")
    ap.add_argument("--num-self", type=int, default=800, help="self-queries (training image, schedule timestep)")
    ap.add_argument("--self-seed", type=int, default=12345, help="seed of the self-queries' examples, timesteps and noises")
    ap.add_argument("--fit-share", type=float, default=0.5, help="share of the self-queries the weights are fitted on (the rest: held out)")
    ap.add_argument("--objective", choices=["zscore", "logsoftmax"], default="zscore",
                    help="the label-free objective whose weights are the 'learned' variant (the other is also fitted and reported)")
    ap.add_argument("--bands", type=int, nargs="*", default=[240, 600],
                    help="upper edges of the timestep bands of the per-band weights (the last band is above the last edge); none: no per-band fit")
    ap.add_argument("--fit-steps", type=int, default=400, help="Adam steps of the weight fit")
    ap.add_argument("--fit-lr", type=float, default=0.05, help="Adam learning rate of the weight fit")
    ap.add_argument("--num-val", type=int, default=20, help="validation samples (seeds --val-offset ...)")
    ap.add_argument("--val-offset", type=int, default=50_000, help="first seed of the validation samples")
    ap.add_argument("--num-report", type=int, default=50, help="reported samples (seeds --report-offset ...)")
    ap.add_argument("--report-offset", type=int, default=0, help="first seed of the reported samples")
    ap.add_argument("--ridges", type=float, nargs="+", default=[1e-2, 1e-1, 1.0], help="relative ridges tried")
    ap.add_argument("--top-k", type=int, default=8, help="k of the class shares")
    ap.add_argument("--batch", type=int, default=256, help="training examples per featurize pass")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_weighting.json",
                    help="JSON output (a .md summary is written beside it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    store = Store.open(args.store)
    cfg = store.config
    dirs = checkpoint_dirs(args.store)[: args.checkpoints]
    models = load_models(dirs)
    dataset = digits_dataset("train")
    n = args.num_train or store.num_train
    labels = np.asarray(dataset.labels)[:n]
    params = [select_params(m, cfg.param_filter) for m in models]
    groups = param_groups(params[0])
    names = [g.name for g in groups]
    sketches = [GroupedSketch(checkpoint_projector(cfg, store.manifest["num_params"], m, "cpu", params[m]), groups)
                for m in range(len(models))]
    targets = [GradientTarget(model, params[m], get_output(cfg.output)) for m, model in enumerate(models)]
    query_cfg = QueryConfig()
    log(f"{len(models)} checkpoint(s), {len(groups)} groups: " + ", ".join(f"{g.name} ({g.size})" for g in groups))

    # train features of every checkpoint, checked against the shipped store (float16) on their sum
    phis = []
    for m in range(len(models)):
        phi = cached(args.work / f"train_m{m}_n{n}.npz", lambda m=m: {
            "phi": train_group_features(targets[m], sketches[m], dataset, store, m, n, args.batch, log)})["phi"]
        shipped = store.read_rows(m, 0, min(n, 64)).astype(np.float32)
        rel = np.abs(phi[:, : len(shipped)].sum(0) - shipped).max() / np.abs(shipped).max()
        log(f"checkpoint {m}: per-group train features (G, N, d) = {phi.shape}; sum vs shipped store: max rel. diff {rel:.1e}")
        if rel > 1e-2:
            raise SystemExit("the per-group features do not add up to the shipped store's features")
        phis.append(phi)
    timings["train_features"] = time.perf_counter() - t0

    # trajectories of checkpoint 0 (as `bench class-signal`) and their query features under every checkpoint
    # (the Scorer's: x0_hat, K fresh noises from (noise_seed, step))
    def sample_set(offset: int, num: int) -> dict[str, np.ndarray]:
        trajs = [sample_trajectory(models[0], SamplingConfig(seed=offset + k)) for k in range(num)]
        clf = load_classifier()
        prob = torch.cat([clf.predict_proba(tr.sample[None]).detach() for tr in trajs])
        out = {"classes": prob.argmax(1).numpy(), "confidence": prob.max(1).values.numpy(),
               "schedule": trajs[0].timesteps.numpy()}

        def make(m: int) -> dict[str, np.ndarray]:
            feats = []
            for traj in trajs:
                steps = steps_of_timesteps(traj.timesteps, REPORT_TIMESTEPS)
                noises = query_noises(steps, query_cfg.num_resamples, query_cfg.noise_seed, tuple(traj.x0_hat.shape[1:]))
                ts = traj.timesteps[steps][:, None].expand(-1, noises.shape[1])
                feats.append(step_group_features(targets[m], sketches[m], traj.x0_hat[steps], ts, noises).numpy())
            return {"q": np.stack(feats)}
        out["q"] = [cached(args.work / f"samples_m{m}_{offset}_{num}.npz", lambda m=m: make(m))["q"] for m in range(len(models))]
        return out

    val = sample_set(args.val_offset, args.num_val)
    log(f"validation query features {len(val['q'])} x {val['q'][0].shape}")
    schedule = [int(t) for t in val["schedule"]]
    timings["validation_queries"] = time.perf_counter() - t0 - sum(timings.values())

    # self-queries: training image as x0, a schedule timestep, K noises fresh (not the store's)
    self_idx, self_t = self_query_set(args.num_self, n, schedule, args.self_seed)

    def make_self(m: int) -> dict[str, np.ndarray]:
        out = []
        for k, (i, t) in enumerate(zip(self_idx, self_t)):
            noises = query_noises([k], query_cfg.num_resamples, args.self_seed, models[m].image_shape)
            ts = torch.full((1, noises.shape[1]), int(t), dtype=torch.long)
            out.append(step_group_features(targets[m], sketches[m], dataset.images([int(i)]), ts, noises)[0].numpy())
            if k % 200 == 0:
                log(f"  checkpoint {m}: self-queries {k}/{len(self_idx)}")
        return {"q": np.stack(out)}

    self_q = [torch.from_numpy(cached(args.work / f"self_m{m}_n{n}_{args.num_self}_{args.self_seed}.npz",
                                      lambda m=m: make_self(m))["q"]) for m in range(len(models))]
    timings["self_queries"] = time.perf_counter() - t0 - sum(timings.values())
    log(f"self-query features {len(self_q)} x {tuple(self_q[0].shape)}")

    trak = Ensemble([GroupedTrak(torch.from_numpy(p), list(args.ridges)) for p in phis])
    timings["kernels"] = time.perf_counter() - t0 - sum(timings.values())
    log("kernels factored")
    num_fit = int(round(args.fit_share * len(self_idx)))
    fit, held = slice(0, num_fit), slice(num_fit, None)  # the query set is a random draw, so a prefix is a random split
    sidx = torch.from_numpy(self_idx)
    band_edges = list(args.bands)
    self_band = np.array([band_of(int(t), band_edges) for t in self_t])
    uniform = np.full(len(groups), 1.0 / len(groups))

    weights: dict[float, dict[str, np.ndarray]] = {}
    self_report: dict[str, dict] = {}
    for r in args.ridges:
        s = trak.group_scores(self_q, r)  # (G, Q, N)
        a, c = self_moments(s, sidx)
        joint = trak.joint_scores(self_q, r)
        ja, jc = self_moments(joint[None], sidx)
        fit_obj = {
            "zscore": lambda w, q=fit: zscores(w, a[q], c[q]).mean(),
            "logsoftmax": lambda w, q=fit: self_logsoftmax(w, s[:, q].double(), sidx[q]).mean(),
        }
        w_r = {obj: fit_simplex_weights(f, len(groups), args.fit_steps, args.fit_lr) for obj, f in fit_obj.items()}
        for b in range(len(band_edges) + 1) if band_edges else []:
            sel = torch.from_numpy(np.flatnonzero(self_band[:num_fit] == b))
            w_r[f"band{b}"] = fit_simplex_weights(lambda w, q=sel: zscores(w, a[q], c[q]).mean(), len(groups), args.fit_steps,
                                          args.fit_lr)
        weights[r] = w_r
        one = torch.ones(1, dtype=torch.float64)
        evals = {"joint": lambda q: zscores(one, ja[q], jc[q]), "uniform": lambda q: zscores(torch.from_numpy(uniform), a[q], c[q])}
        evals.update({f"learned-{obj}": (lambda q, w=w: zscores(torch.from_numpy(w), a[q], c[q])) for obj, w in w_r.items()
                      if not obj.startswith("band")})
        evals.update({f"group {g}": (lambda q, e=torch.eye(len(groups), dtype=torch.float64)[gi]: zscores(e, a[q], c[q]))
                      for gi, g in enumerate(names)})
        for name, fn in evals.items():
            z = {"fit": float(fn(fit).mean()), "held_out": float(fn(held).mean())}
            self_report.setdefault(name, {})[f"{r:g}"] = z
        log(f"ridge {r:g}: learned ({args.objective}) w = {np.round(w_r[args.objective], 3).tolist()}; held-out z: "
            f"joint {self_report['joint'][f'{r:g}']['held_out']:.2f}, uniform {self_report['uniform'][f'{r:g}']['held_out']:.2f}, "
            f"learned {self_report['learned-' + args.objective][f'{r:g}']['held_out']:.2f}")
        del s, joint
    timings["weight_fit"] = time.perf_counter() - t0 - sum(timings.values())

    def variant_scores(q: np.ndarray, r: float) -> dict[str, np.ndarray]:
        """Scores (P, S, N) of every variant for query features q (one (P, S, G, d) per checkpoint) at ridge r."""
        p, sn = q[0].shape[:2]
        flat = [torch.from_numpy(x.reshape(p * sn, *x.shape[2:])) for x in q]
        s = trak.group_scores(flat, r).numpy().reshape(len(groups), p, sn, -1)  # (G, P, S, N)
        out = {"joint": trak.joint_scores(flat, r).numpy().reshape(p, sn, -1),
               "uniform": np.einsum("g,gpsn->psn", uniform, s)}
        for obj in ("zscore", "logsoftmax"):
            out[f"learned-{obj}"] = np.einsum("g,gpsn->psn", weights[r][obj], s)
        if band_edges:
            wb = np.stack([weights[r][f"band{band_of(t, band_edges)}"] for t in REPORT_TIMESTEPS])  # (S, G)
            out["learned-zscore per band"] = np.einsum("sg,gpsn->psn", wb, s)
        out.update({f"group {g} alone": s[gi] for gi, g in enumerate(names)})
        return out

    def evaluate(samples: dict[str, np.ndarray], ridges: dict[str, float] | None) -> dict[str, dict]:
        """{variant: {"ridge", "measures"}}: every ridge when ``ridges`` is None (validation), else each variant's."""
        classes = samples["classes"].tolist()
        res: dict[str, dict] = {}
        for r in args.ridges:
            for name, sc in variant_scores(samples["q"], r).items():
                if ridges is None:
                    res.setdefault(name, {})[f"{r:g}"] = measure(sc, labels, classes, args.top_k)
                elif ridges[name] == r:
                    res[name] = {"ridge": r, "measures": measure(sc, labels, classes, args.top_k)}
        return res

    val_all = evaluate(val, None)
    chosen = {name: float(max(per, key=lambda r: headline(per[r], list(REPORT_TIMESTEPS)))) for name, per in val_all.items()}
    val_rows = {name: {"ridge": chosen[name], "measures": val_all[name][f"{chosen[name]:g}"]} for name in val_all}
    timings["validation_eval"] = time.perf_counter() - t0 - sum(timings.values())
    log("validation measured")
    print(table(val_rows, list(REPORT_TIMESTEPS), f"validation (seeds {args.val_offset}-{args.val_offset + args.num_val - 1}), "
                                                  f"each variant at its best ridge"), flush=True)

    rep = sample_set(args.report_offset, args.num_report)
    timings["report_queries"] = time.perf_counter() - t0 - sum(timings.values())
    rep_rows = evaluate(rep, chosen)
    rep_rows = {name: rep_rows[name] for name in val_rows}
    timings["report_eval"] = time.perf_counter() - t0 - sum(timings.values())
    title = f"reported (seeds {args.report_offset}-{args.report_offset + args.num_report - 1}), ridges chosen on validation"
    print(table(rep_rows, list(REPORT_TIMESTEPS), title), flush=True)

    chance = float(np.mean([np.mean(labels == c) for c in rep["classes"]]))
    # diagnostic: each group's share of the squared norm of checkpoint 0's train features and validation queries
    energy = {"train": share(np.einsum("gnd,gnd->g", phis[0], phis[0]))}
    energy.update({f"query t={t}": share(np.einsum("pgd,pgd->g", val["q"][0][:, s], val["q"][0][:, s]))
                   for s, t in enumerate(REPORT_TIMESTEPS)})
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "objective": args.objective,
        "groups": [{"name": g.name, "num_params": g.size} for g in groups],
        "num_train": n,
        "checkpoints": [str(d) for d in dirs],
        "chance_top_share": chance,
        "timesteps": list(REPORT_TIMESTEPS),
        "self_queries": {"num": len(self_idx), "num_fit": num_fit, "band_edges": band_edges,
                         "per_band_fit_counts": np.bincount(self_band[:num_fit], minlength=len(band_edges) + 1).tolist()},
        "weights": {f"{r:g}": {k: v.tolist() for k, v in w.items()} for r, w in weights.items()},
        "self_zscore": self_report,
        "validation_all_ridges": val_all,
        "validation": val_rows,
        "chosen_ridges": chosen,
        "report": rep_rows,
        "validation_classes": val["classes"].tolist(),
        "report_classes": rep["classes"].tolist(),
        "energy_share": energy,
        "timings_s": timings,
        "wall_seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    md = [f"# Learned parameter-group weights (`benchmarks/layer_weighting.py`)", "",
          f"{len(models)} checkpoint(s), {n} training examples (chance {100 * chance:.0f} %), {len(groups)} groups, objective "
          f"`{args.objective}` (self z-score of held-out self-queries; no labels), {len(self_idx)} self-queries "
          f"({num_fit} fit). {TARGETS}", "",
          table(val_rows, list(REPORT_TIMESTEPS), f"validation (seeds {args.val_offset}-{args.val_offset + args.num_val - 1}), each variant at its best ridge"),
          "", table(rep_rows, list(REPORT_TIMESTEPS), title), "", "**learned weights** (per ridge)", "",
          "| ridge | fit | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r, w in weights.items():
        for k, v in w.items():
            md.append(f"| {r:g} | {k} | " + " | ".join(f"{x:.3f}" for x in v) + " |")
    md += ["", "**self-retrieval z-score** (fit / held-out self-queries)", "",
           "| variant | " + " | ".join(f"ridge {r:g}" for r in args.ridges) + " |", "|---|" + "---|" * len(args.ridges)]
    for name, per in self_report.items():
        md.append(f"| {name} | " + " | ".join(f"{per[f'{r:g}']['fit']:.2f} / {per[f'{r:g}']['held_out']:.2f}" for r in args.ridges) + " |")
    md += ["", "**share of the squared feature norm** (checkpoint 0, %; train features and validation queries)", "",
           "| features | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    md += [f"| {k} | " + " | ".join(f"{100 * x:.1f}" for x in v) + " |" for k, v in energy.items()]
    md += ["", f"Wall time {result['wall_seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    args.out.with_suffix(".md").write_text("\n".join(md))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
