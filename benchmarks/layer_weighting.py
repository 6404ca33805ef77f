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
from attribution.features.gradients import GradientTarget, per_step_grads, select_params  # noqa: E402
from attribution.features.outputs import get_output  # noqa: E402
from attribution.features.projection import SparseSignProjector  # noqa: E402
from attribution.features.projection.factorized import example_grads_from_hooks  # noqa: E402
from attribution.features.store import Store  # noqa: E402
from attribution.models.classifier import load_classifier  # noqa: E402
from attribution.models.load import load_models  # noqa: E402
from attribution.sampling.trajectory import sample_trajectory  # noqa: E402
from attribution.scoring.scorer import query_noises  # noqa: E402

MEASURE_KEYS = ("top_pos_share", "top_neg_share", "argmax_is_class")


# ---------------------------------------------------------------- parameter groups and their projections


def block_of(name: str) -> str:
    """The group of parameter ``name``: its top-level module, down/up blocks by index; the output
    norm joins ``conv_out`` (the head: 177 parameters on the bundled UNet)."""
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return ".".join(parts[:2])
    return "conv_out" if parts[0] == "conv_norm_out" else parts[0]


def param_groups(params: dict[str, torch.Tensor]) -> list[tuple[str, int, int]]:
    """(name, start, stop) column ranges of the groups in the flattened gradient (parameter order).

    Raises ValueError when a group's parameters are not contiguous in that order."""
    out: list[tuple[str, int, int]] = []
    col = 0
    for name, p in params.items():
        g = block_of(name)
        if out and out[-1][0] == g:
            out[-1] = (g, out[-1][1], col + p.numel())
        elif any(o[0] == g for o in out):
            raise ValueError(f"group {g} is not contiguous in the parameter order (at {name})")
        else:
            out.append((g, col, col + p.numel()))
        col += p.numel()
    return out


class GroupedSketch:
    """The sjlt sketch P split by parameter group: projects a gradient into (G, d) parts P_g grad_g,
    whose sum over g is P grad (the unsplit projection).

    Duck-types the ``accumulate_columns`` / ``row_block`` / ``dim_out`` interface that
    :func:`example_grads_from_hooks` feeds, with dim_out = G * d: rows [g d, (g + 1) d) of the
    accumulator hold group g. Every group starts at a parameter, so at a block edge of ``base``.
    """

    def __init__(self, base: SparseSignProjector, groups: list[tuple[str, int, int]]):
        self.base, self.groups = base, groups
        self.d = base.dim_out
        self.dim_out = len(groups) * self.d
        self._starts = [a for _, a, _ in groups]
        self.row_block = base.row_block

    def accumulate_columns(self, part: torch.Tensor, start: int, acc_t: torch.Tensor) -> None:
        """acc_t[g d:(g + 1) d] += P[:, start:stop] part^T for the group g holding columns [start, stop)."""
        g = bisect.bisect_right(self._starts, start) - 1
        if start + part.shape[1] > self.groups[g][2]:
            raise ValueError(f"columns [{start}, {start + part.shape[1]}) cross the end of group {self.groups[g][0]}")
        self.base.accumulate_columns(part, start, acc_t[g * self.d : (g + 1) * self.d])

    def project_groups(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, P) full gradients -> (B, G, d) per-group projections."""
        acc = torch.zeros(self.dim_out, grads.shape[0])
        for _, a, b in self.groups:
            self.accumulate_columns(grads[:, a:b], a, acc)
        return acc.T.reshape(grads.shape[0], len(self.groups), self.d).contiguous()


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


def train_group_features(target: GradientTarget, sketch: GroupedSketch, dataset, store: Store, num_train: int,
                         batch: int, log: Callable[[str], None]) -> np.ndarray:
    """(G, N, d) float32 per-group train features phi_{g,i} with the store's draws (Algorithm 1 lines 3-9, split by group)."""
    cfg = store.config
    model = target.model
    chunk = auto_chunk_size(sum(p.numel() for p in target.params.values()), cfg.num_draws)
    out = np.empty((len(sketch.groups), num_train, sketch.d), dtype=np.float32)
    t0 = time.perf_counter()
    for start in range(0, num_train, batch):
        idx = np.arange(start, min(start + batch, num_train))
        ts, noises = draw_timesteps_and_noise(idx, cfg, model.num_train_timesteps, model.image_shape)
        rows = example_grads_from_hooks(model, target.params, target.output, dataset.images(idx), ts, noises, chunk,
                                        None, projector=sketch)  # (B, G * d)
        out[:, idx] = rows.reshape(len(idx), len(sketch.groups), sketch.d).transpose(0, 1).numpy()
        if (start // batch) % 10 == 0:
            log(f"  train features {idx[-1] + 1}/{num_train} ({time.perf_counter() - t0:.0f} s)")
    return out


def step_group_features(target: GradientTarget, sketch: GroupedSketch, x0: torch.Tensor, timesteps: torch.Tensor,
                        noises: torch.Tensor) -> torch.Tensor:
    """Per-group Eq. 3 query features (S, G, d): x0 (S, C, H, W), timesteps (S, K), noises (S, K, C, H, W)."""
    g = per_step_grads(target.model, target.params, target.output, x0, timesteps, noises)
    return sketch.project_groups(g)


def self_query_set(num: int, num_train: int, schedule: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q,) training indices (distinct, random) and (Q,) timesteps drawn uniformly from the sampling schedule."""
    rng = np.random.default_rng(seed)
    return rng.choice(num_train, size=num, replace=False), rng.choice(np.asarray(schedule), size=num)


# ---------------------------------------------------------------- per-group TRAK


@dataclass
class GroupTrak:
    """Per-group TRAK scores s_g(q, i) = phi_{g,i}^T (Phi_g^T Phi_g + lambda_g I)^-1 q_g and the joint score.

    phi: (G, N, d) float32 per-group train features. Kernels in float64, one Cholesky factor per (group, ridge)."""

    phi: torch.Tensor
    ridges: list[float]

    def __post_init__(self) -> None:
        self.kernels = [(p.double().T @ p.double()) for p in self.phi]
        joint = self.phi.sum(0).double()
        self.joint_phi = joint.float()
        self.kernels.append(joint.T @ joint)
        self.chol = {}
        for r in self.ridges:
            for g, k in enumerate(self.kernels):
                lam = r * float(torch.trace(k)) / k.shape[0]
                self.chol[(g, r)] = torch.linalg.cholesky(k + lam * torch.eye(k.shape[0], dtype=k.dtype))

    def _score(self, phi: torch.Tensor, chol: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """phi (N, d), q (Q, d) -> (Q, N)."""
        v = torch.cholesky_solve(q.double().T, chol).float()  # (d, Q)
        return (phi @ v).T

    def group_scores(self, q: torch.Tensor, ridge: float) -> torch.Tensor:
        """q (Q, G, d) -> (G, Q, N) per-group scores."""
        return torch.stack([self._score(self.phi[g], self.chol[(g, ridge)], q[:, g]) for g in range(self.phi.shape[0])])

    def joint_scores(self, q: torch.Tensor, ridge: float) -> torch.Tensor:
        """q (Q, G, d) -> (Q, N): the plain journey-TRAK score with phi = sum_g phi_g, q = sum_g q_g."""
        return self._score(self.joint_phi, self.chol[(len(self.kernels) - 1, ridge)], q.sum(1))


# ---------------------------------------------------------------- the self-retrieval objective


def self_moments(s: torch.Tensor, self_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For per-group scores s (G, Q, N) of self-queries of training examples ``self_idx`` (Q,):
    a (Q, G) = s(q, i_q) - mean_j s(q, j) and C (Q, G, G) = cov_j s(q, j), in float64, so that
    z_w(q) = w^T a_q / sqrt(w^T C_q w)."""
    s = s.double()
    centred = s - s.mean(2, keepdim=True)
    a = centred[:, torch.arange(s.shape[1]), self_idx].T  # (Q, G)
    c = torch.einsum("gqn,hqn->qgh", centred, centred) / s.shape[2]
    return a, c


def zscores(w: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(Q,) self z-scores of weights w (G,) from :func:`self_moments`."""
    return (a @ w) / torch.einsum("g,qgh,h->q", w, c, w).clamp_min(1e-30).sqrt()


def self_logsoftmax(w: torch.Tensor, s: torch.Tensor, self_idx: torch.Tensor) -> torch.Tensor:
    """(Q,) log-softmax over the N training examples of tau_w / std_j tau_w at the query's own example; s (G, Q, N)."""
    tau = torch.einsum("g,gqn->qn", w, s)
    tau = tau / tau.std(1, keepdim=True).clamp_min(1e-30)
    return torch.log_softmax(tau, 1)[torch.arange(tau.shape[0]), self_idx]


def fit_weights(objective: Callable[[torch.Tensor], torch.Tensor], num_groups: int, steps: int, lr: float) -> np.ndarray:
    """argmax over the simplex w = softmax(theta) of ``objective(w)`` (a scalar), by Adam from uniform w."""
    theta = torch.zeros(num_groups, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-objective(torch.softmax(theta, 0))).backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).numpy()


# ---------------------------------------------------------------- evaluation


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
                    help="the store whose settings (draws, projection) the per-group features reproduce (checkpoint 0)")
    ap.add_argument("--model", type=Path, default=ROOT / "assets" / "ensemble" / "ddpm-seed0",
                    help="the store's checkpoint 0")
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
    model = load_models([args.model])[0]
    if model.checkpoint_hash != store.manifest["checkpoints"][0]["hash"]:
        raise SystemExit(f"{args.model} is not checkpoint 0 of {args.store}")
    dataset = digits_dataset("train")
    n = args.num_train or store.num_train
    labels = np.asarray(dataset.labels)[:n]
    params = select_params(model, cfg.param_filter)
    groups = param_groups(params)
    names = [g for g, _, _ in groups]
    base = checkpoint_projector(cfg, store.manifest["num_params"], 0, "cpu", params)
    sketch = GroupedSketch(base, groups)
    query_cfg = QueryConfig()
    target = GradientTarget(model, params, get_output(cfg.output))
    log(f"{len(groups)} groups: " + ", ".join(f"{g} ({b - a})" for g, a, b in groups))
    tag = f"n{n}"

    # train features, checked against the shipped store (float16) on their sum
    phi = cached(args.work / f"train_{tag}.npz",
                 lambda: {"phi": train_group_features(target, sketch, dataset, store, n, args.batch, log)})["phi"]
    shipped = store.read_rows(0, 0, min(n, 64)).astype(np.float32)
    rel = np.abs(phi[:, : len(shipped)].sum(0) - shipped).max() / np.abs(shipped).max()
    log(f"per-group train features (G, N, d) = {phi.shape}; sum vs shipped store: max rel. diff {rel:.1e}")
    if rel > 1e-2:
        raise SystemExit("the per-group features do not add up to the shipped store's features")
    timings["train_features"] = time.perf_counter() - t0

    # sampled trajectories and their query features (the Scorer's: x0_hat, K fresh noises from (noise_seed, step))
    def sample_set(offset: int, num: int) -> dict[str, np.ndarray]:
        def make() -> dict[str, np.ndarray]:
            clf = load_classifier()
            feats, classes, conf = [], [], []
            for k in range(num):
                traj = sample_trajectory(model, SamplingConfig(seed=offset + k))
                prob = clf.predict_proba(traj.sample[None])[0].detach()
                classes.append(int(prob.argmax()))
                conf.append(float(prob.max()))
                steps = steps_of_timesteps(traj.timesteps, REPORT_TIMESTEPS)
                noises = query_noises(steps, query_cfg.num_resamples, query_cfg.noise_seed, tuple(traj.x0_hat.shape[1:]))
                ts = traj.timesteps[steps][:, None].expand(-1, noises.shape[1])
                feats.append(step_group_features(target, sketch, traj.x0_hat[steps], ts, noises).numpy())
                if k == 0:
                    schedule = traj.timesteps.numpy()
            return {"q": np.stack(feats), "classes": np.asarray(classes), "confidence": np.asarray(conf),
                    "schedule": schedule}
        return cached(args.work / f"samples_{offset}_{num}.npz", make)

    val = sample_set(args.val_offset, args.num_val)
    log(f"validation query features {val['q'].shape}")
    schedule = [int(t) for t in val["schedule"]]
    timings["validation_queries"] = time.perf_counter() - t0 - sum(timings.values())

    # self-queries: training image as x0, a schedule timestep, K noises fresh (not the store's)
    self_idx, self_t = self_query_set(args.num_self, n, schedule, args.self_seed)

    def make_self() -> dict[str, np.ndarray]:
        out = []
        for k, (i, t) in enumerate(zip(self_idx, self_t)):
            noises = query_noises([k], query_cfg.num_resamples, args.self_seed, model.image_shape)
            ts = torch.full((1, noises.shape[1]), int(t), dtype=torch.long)
            out.append(step_group_features(target, sketch, dataset.images([int(i)]), ts, noises)[0].numpy())
            if k % 100 == 0:
                log(f"  self-queries {k}/{len(self_idx)}")
        return {"q": np.stack(out)}

    self_q = torch.from_numpy(cached(args.work / f"self_{tag}_{args.num_self}_{args.self_seed}.npz", make_self)["q"])
    timings["self_queries"] = time.perf_counter() - t0 - sum(timings.values())
    log(f"self-query features {tuple(self_q.shape)}")

    trak = GroupTrak(torch.from_numpy(phi), list(args.ridges))
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
        w_r = {obj: fit_weights(f, len(groups), args.fit_steps, args.fit_lr) for obj, f in fit_obj.items()}
        for b in range(len(band_edges) + 1) if band_edges else []:
            sel = torch.from_numpy(np.flatnonzero(self_band[:num_fit] == b))
            w_r[f"band{b}"] = fit_weights(lambda w, q=sel: zscores(w, a[q], c[q]).mean(), len(groups), args.fit_steps,
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
        """Scores (P, S, N) of every variant for query features q (P, S, G, d) at ridge r."""
        p, sn = q.shape[:2]
        flat = torch.from_numpy(q.reshape(p * sn, *q.shape[2:]))
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
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "objective": args.objective,
        "groups": [{"name": g, "num_params": b - a} for g, a, b in groups],
        "num_train": n,
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
        "timings_s": timings,
        "wall_seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    md = [f"# Learned parameter-group weights (`benchmarks/layer_weighting.py`)", "",
          f"Checkpoint 0, {n} training examples (chance {100 * chance:.0f} %), {len(groups)} groups, objective "
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
    md += ["", f"Wall time {result['wall_seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    args.out.with_suffix(".md").write_text("\n".join(md))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
