"""Featurize / query speed, peak memory and score agreement: attribution vs traker (TRAK).

Everything is measured in one run, on the same model, the same data, the same
(timestep, noise) draws (``attribution.features.featurize.draw_timesteps_and_noise``), the
same projection dimension d and the same number of checkpoints M:

* train examples/s featurized -- ours (``featurize`` with ``proj_kind="sjlt"``,
  ``"factorized"`` and ``"gaussian"``, one draw per example, float32 store) vs ``trak.TRAKer`` (a custom
  ``AbstractModelOutput`` with the DDPM loss, ``use_half_precision=False``, CPU
  ``BasicProjector``) at its default settings (blocks of 100 projection columns,
  regenerated at every call) and tuned (the whole matrix in one block, generated
  once per checkpoint, and larger featurize batches);
* the physical-limit proxy: plain batched forward+backward of the mean loss over
  the same examples (and over the 50 x K query rows);
* the query of one sample, all 50 steps with K = 20 (ours: ``Scorer.score``;
  traker: ``start_scoring_checkpoint`` / ``score`` / ``finalize_scores`` on the same
  50 Eq. (3) outputs, x0_hat fixed, same noises, same chunks of 10 steps), and one
  step with a new mask (ours);
* cold and warm featurize: every featurize worker (ours and traker) featurizes twice in its
  process; the first call is the end-to-end number a user gets from a fresh process (oneDNN
  primitive creation, allocator growth included), the second the throughput a long featurize
  settles at. The limit proxy is warm (one warm-up batch first). ``--no-warm-rerun`` skips it;
* peak RSS of every method (each in its own subprocess, featurize and query apart);
* ``--tune-malloc``: every worker (limit, ours, traker) first keeps freed memory in glibc's heap
  (``attribution.tools.allocator.tune_malloc``, what ``attribution featurize`` does), so the allocator is the
  same for all and the ratios compare the methods, not the allocators;
* Spearman correlation of the scores: ours vs traker with independent matrices,
  with traker given *our* sjlt or factorized matrices (same math -> rho ~ 1), and ours at larger d
  against the exact unprojected scores ``(G G^T + lambda I)^-1 G g`` (dual form, the
  same absolute ridge lambda for every d).

The ridge: ours uses lambda = ridge * trace(Phi^T Phi) / d; traker's ``lambda_reg``
is absolute and defaults to 0, which is singular here (N = 512 < d = 2048), so it is
set to the same *relative* value, 0.01 * trace(X^T X) / d of its own features, before
``finalize_features``. At larger d ours uses ridge = 0.01 * d / 2048 so lambda stays
the same absolute value as at d = 2048 (trace(K) is d-independent in expectation).

Usage::

    python benchmarks/bench_traker.py                      # full run, ~20-30 min on 2 cores
    python benchmarks/bench_traker.py --quick              # tiny sizes, smoke test
    python benchmarks/bench_traker.py --skip-large --n 256

Writes ``benchmarks/results/bench_traker.json`` (``--out``).
traker's fp16 path (its default, ``use_half_precision=True``) is not run: fp16 matmuls
are ~30x slower on this CPU (0.4 examples/s measured, docs/performance.md).
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

SCRIPT = Path(__file__).resolve()
RIDGE = 1e-2
K = 20
NUM_STEPS = 50
QUERY_CHUNK = 10
#: traker variants that project with one of our projections (variant -> proj_kind): same math as ours
OUR_MATRIX_VARIANTS = {"ours_matrix": "sjlt", "ours_factorized_matrix": "factorized"}


# ====================================================================== worker side
def _load(spec: dict[str, Any]):
    import torch

    from attribution.models import load_models

    torch.manual_seed(0)
    models = load_models([Path(p) for p in spec["model_dirs"]], _device(spec))
    ds = common.make_dataset(spec["data"], spec["n"])
    return models, ds


def _device(spec: dict[str, Any]) -> str:
    return spec.get("device", "cpu")


def _trajectory(model):
    from attribution.config import SamplingConfig
    from attribution.sampling import sample_trajectory

    return sample_trajectory(model, SamplingConfig(num_inference_steps=NUM_STEPS, seed=0))


def _train_draws(model, n: int):
    import numpy as np

    from attribution.config import FeaturizeConfig
    from attribution.features import draw_timesteps_and_noise

    cfg = FeaturizeConfig(num_draws=1)
    return draw_timesteps_and_noise(np.arange(n), cfg, model.num_train_timesteps, model.image_shape)


def worker_limit(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain batched forward+backward of the mean loss: train rows and the 50 x K query rows."""
    import torch

    from attribution.scoring import query_noises

    models, ds = _load(spec)
    n, bs = spec["n"], spec["batch_size"]
    x0_all = ds.images(range(n))
    ts, noises = _train_draws(models[0], n)
    ts, noises = ts[:, 0], noises[:, 0]
    out: dict[str, Any] = {}

    def fwd_bwd(unet, ab, x0, t, eps):
        a = ab.index_select(0, t).view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(x_t, t).sample, eps)
        loss.backward()

    for model in models:
        model.unet.requires_grad_(True)
    dev = models[0].device
    x0_all, ts, noises = x0_all.to(dev), ts.to(dev), noises.to(dev)
    # warm-up (allocator, oneDNN primitive caches)
    fwd_bwd(models[0].unet, models[0].alphas_cumprod, x0_all[:bs], ts[:bs], noises[:bs])
    common.sync_gpu()
    t0 = time.perf_counter()
    for model in models:
        ab = model.alphas_cumprod
        for s in range(0, n, bs):
            model.unet.zero_grad(set_to_none=True)
            fwd_bwd(model.unet, ab, x0_all[s : s + bs], ts[s : s + bs], noises[s : s + bs])
    common.sync_gpu()
    dt = time.perf_counter() - t0
    out["train_s"] = dt
    out["train_rows"] = n * len(models)
    out["train_examples_per_s"] = n * len(models) / dt

    if spec.get("query", True):
        traj = _trajectory(models[0])
        steps = list(range(NUM_STEPS))
        qn = query_noises(steps, K, 0, tuple(traj.x0_hat.shape[1:]))  # (S, K, C, H, W)
        x0 = traj.x0_hat[:, None].expand(-1, K, -1, -1, -1).reshape(-1, *traj.x0_hat.shape[1:])
        tq = traj.timesteps[:, None].expand(-1, K).reshape(-1)
        eq = qn.reshape(-1, *qn.shape[2:]).to(dev)
        x0, tq = x0.to(dev), tq.to(dev)
        rows = QUERY_CHUNK * K
        common.sync_gpu()
        t0 = time.perf_counter()
        for model in models:
            ab = model.alphas_cumprod
            for s in range(0, x0.shape[0], rows):
                model.unet.zero_grad(set_to_none=True)
                fwd_bwd(model.unet, ab, x0[s : s + rows], tq[s : s + rows], eq[s : s + rows])
        common.sync_gpu()
        out["query_all_steps_s"] = time.perf_counter() - t0
    return out


def worker_ours_featurize(spec: dict[str, Any]) -> dict[str, Any]:
    from attribution.config import FeaturizeConfig
    from attribution.features import checkpoint_projector, featurize, num_params, select_params

    models, ds = _load(spec)
    rss0 = common.rss_bytes()
    cfg = FeaturizeConfig(proj_kind=spec["proj_kind"], proj_dim=spec["proj_dim"], num_draws=1, store_dtype="float32")
    store_dir = Path(spec["store"])
    if store_dir.exists():
        shutil.rmtree(store_dir)
    out: dict[str, Any] = {"rss_after_load_bytes": rss0, "num_params": num_params(select_params(models[0]))}
    if spec["proj_kind"] == "sjlt":  # how long building the sparse sketch takes (part of featurize below)
        t0 = time.perf_counter()
        checkpoint_projector(cfg, out["num_params"], 0, _device(spec))
        common.sync_gpu()
        out["projector_build_s"] = time.perf_counter() - t0

    def featurize_into(directory: Path):
        t0 = time.perf_counter()
        st = featurize(models, ds, directory, cfg, batch_size=spec["batch_size"], chunk_size=spec["chunk_size"], finalize=False)
        return st, time.perf_counter() - t0

    store, out["featurize_s"] = featurize_into(store_dir)
    t0 = time.perf_counter()
    store.finalize()
    out["finalize_s"] = time.perf_counter() - t0
    rows = spec["n"] * len(models)
    out["rows"] = rows
    out["examples_per_s"] = rows / out["featurize_s"]
    if spec.get("warm_rerun"):  # the same featurize again in this process: oneDNN primitives and allocator warm
        warm_dir = store_dir.with_name(store_dir.name + "-warm")
        shutil.rmtree(warm_dir, ignore_errors=True)
        out["examples_per_s_warm"] = rows / featurize_into(warm_dir)[1]
        shutil.rmtree(warm_dir, ignore_errors=True)
    return out


def worker_ours_query(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from attribution.config import QueryConfig
    from attribution.features import Store
    from attribution.scoring import Scorer

    models, _ = _load(spec)
    traj = _trajectory(models[0])
    store = Store.open(spec["store"])
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    scorer = Scorer(store, models, "journey", QueryConfig(num_resamples=K, ridge=spec["ridge"], chunk_size=QUERY_CHUNK))
    out["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer.score(traj, steps=[0])  # first call: lazy projector blocks, oneDNN caches
    out["first_call_one_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    att = scorer.score(traj)
    out["query_all_steps_s"] = time.perf_counter() - t0
    h, w = traj.x0_hat.shape[-2:]
    times = []
    for k, (r0, c0) in enumerate(((4, 6), (12, 10), (18, 3))):  # three new masks, one step each
        mask = np.zeros((h, w), dtype=np.float32)
        mask[r0 : r0 + 10, c0 : c0 + 12] = 1
        t0 = time.perf_counter()
        scorer.score(traj, steps=[25 + k], mask=mask)
        times.append(time.perf_counter() - t0)
    out["one_step_new_mask_s"] = float(np.median(times))
    out["one_step_new_mask_all_s"] = times
    if spec.get("scores_out"):
        np.save(spec["scores_out"], att.scores)
    return out


def _trak_task():
    """A traker ``AbstractModelOutput``: the DDPM loss averaged over D (timestep, noise) draws.

    One example of the batch is ``(x0 (C,H,W), sqrt_ab (D,), sqrt_1mab (D,), t (D,), eps (D,C,H,W))``:
    D = 1 for train examples, D = K for the Eq. (3) query of one step. alpha-bar is
    gathered outside vmap (indexing with a batched timestep fails inside it).
    """
    import torch
    from torch.func import functional_call
    from trak.modelout_functions import AbstractModelOutput

    class DDPMLossOutput(AbstractModelOutput):
        def __init__(self) -> None:
            pass

        def get_output(self, model, weights, buffers, x0, sqrt_ab, sqrt_1mab, t, eps):
            x_t = sqrt_ab[:, None, None, None] * x0[None] + sqrt_1mab[:, None, None, None] * eps
            pred = functional_call(model, (weights, buffers), (x_t, t)).sample
            return ((eps - pred) ** 2).flatten(1).mean(1).mean()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    return DDPMLossOutput()


def _trak_projector(spec: dict[str, Any], params: dict[str, Any]):
    """traker projector of the variant: default (None: TRAKer builds BasicProjector, blocks of 100),
    tuned (BasicProjector with the whole matrix in one block), ours_matrix / ours_factorized_matrix (our sjlt /
    factorized matrices: the same projection as "ours, sjlt" / "ours, factorized", so each pair must agree to
    rounding). ``params``: the selected parameters, in traker's gradient order (the factorized shapes)."""
    import torch
    from trak.projectors import AbstractProjector, BasicProjector, ProjectionType
    from trak.utils import vectorize

    from attribution.features import num_params as count_params

    num_params = count_params(params)
    variant = spec["variant"]
    if variant in ("default", "tuned_batch"):  # TRAKer builds its CPU default: BasicProjector, blocks of 100
        return None
    if variant == "tuned":
        return BasicProjector(
            grad_dim=num_params,
            proj_dim=spec["proj_dim"],
            seed=0,
            proj_type=ProjectionType.normal,
            device=_device(spec),
            block_size=spec.get("trak_block_size", spec["proj_dim"]),
            dtype=torch.float32,
        )
    if variant in OUR_MATRIX_VARIANTS:
        from attribution.config import FeaturizeConfig
        from attribution.features import checkpoint_projector

        kind = OUR_MATRIX_VARIANTS[variant]
        cfg = FeaturizeConfig(proj_kind=kind, proj_dim=spec["proj_dim"], num_draws=1, store_dtype="float32")

        class OurProjector(AbstractProjector):
            """Our checkpoint projectors P_m (seed proj_seed + m) of ``kind`` behind traker's projector API."""

            def __init__(self) -> None:
                super().__init__(num_params, cfg.proj_dim, 0, ProjectionType.normal, _device(spec))
                self._projs: dict[int, Any] = {}

            def project(self, grads, model_id):
                if isinstance(grads, dict):
                    grads = vectorize(grads, device=_device(spec))
                if model_id not in self._projs:
                    self._projs[model_id] = checkpoint_projector(cfg, num_params, int(model_id), _device(spec), params)
                return self._projs[model_id].project(grads)

            def free_memory(self):
                pass

        return OurProjector()
    raise ValueError(variant)


def _traker(spec: dict[str, Any], models, load: bool):
    import logging

    from trak import TRAKer

    from attribution.features import select_params

    return TRAKer(
        model=models[0].unet,
        task=_trak_task(),
        train_set_size=spec["n"],
        save_dir=spec["trak_dir"],
        load_from_save_dir=load,
        device=_device(spec),
        projector=_trak_projector(spec, select_params(models[0])),
        proj_dim=spec["proj_dim"],
        use_half_precision=False,
        logging_level=logging.WARNING,
    )


def _trak_batch(model, x0, t, eps):
    """traker's batch ``(x0 (B,C,H,W), sqrt_ab (B,D), sqrt_1mab (B,D), t (B,D), eps (B,D,C,H,W))`` on the
    model's device (traker calls the model on the batch as given)."""
    dev = model.device
    t = t.to(dev)
    ab = model.alphas_cumprod.index_select(0, t.reshape(-1)).reshape(t.shape)
    return (x0.to(dev), ab.sqrt(), (1 - ab).sqrt(), t, eps.to(dev))


def _train_batch(model, ds, idx, ts, noises):
    return _trak_batch(model, ds.images(idx), ts[idx], noises[idx])


def worker_trak_featurize(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    models, ds = _load(spec)
    trak_dir = Path(spec["trak_dir"])
    if trak_dir.exists():
        shutil.rmtree(trak_dir)
    rss0 = common.rss_bytes()
    n, bs = spec["n"], spec["batch_size"]
    ts, noises = _train_draws(models[0], n)  # the same draws as ours (num_draws = 1)
    out: dict[str, Any] = {"rss_after_load_bytes": rss0}
    t0 = time.perf_counter()
    traker = _traker(spec, models, load=False)
    out["init_s"] = time.perf_counter() - t0

    def featurize_all(trk) -> float:
        t0 = time.perf_counter()
        for m, model in enumerate(models):
            trk.load_checkpoint(model.unet.state_dict(), model_id=m)
            for s in range(0, n, bs):
                idx = np.arange(s, min(n, s + bs))
                trk.featurize(batch=_train_batch(model, ds, idx, ts, noises), inds=idx)
        return time.perf_counter() - t0

    out["featurize_s"] = featurize_all(traker)
    if spec.get("warm_rerun"):  # as ours: a second featurize in this process (a new experiment directory)
        warm_dir = trak_dir.with_name(trak_dir.name + "-warm")
        shutil.rmtree(warm_dir, ignore_errors=True)
        out["examples_per_s_warm"] = n * len(models) / featurize_all(_traker(spec | {"trak_dir": str(warm_dir)}, models, load=False))
        shutil.rmtree(warm_dir, ignore_errors=True)
    # traker's lambda_reg is absolute (default 0: singular for N < d); use the same relative ridge as ours
    t0 = time.perf_counter()
    lams = []
    for m in range(len(models)):
        traker.saver.load_current_store(m)
        g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
        lams.append(RIDGE * float((g * g).sum()) / g.shape[1])
    traker.score_computer.lambda_reg = float(np.mean(lams))
    out["lambda_reg"] = traker.score_computer.lambda_reg
    out["lambda_per_checkpoint"] = lams
    traker.finalize_features()
    out["finalize_s"] = time.perf_counter() - t0
    out["rows"] = n * len(models)
    out["examples_per_s"] = out["rows"] / out["featurize_s"]
    return out


def worker_trak_query(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from attribution.scoring import query_noises

    models, _ = _load(spec)
    traj = _trajectory(models[0])
    steps = list(range(NUM_STEPS))
    noises = query_noises(steps, K, 0, tuple(traj.x0_hat.shape[1:]))  # same K noises as ours
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    traker = _traker(spec, models, load=True)
    out["setup_s"] = time.perf_counter() - t0

    def batch(model, sl):
        return _trak_batch(model, traj.x0_hat[sl], traj.timesteps[sl][:, None].expand(-1, K).contiguous(), noises[sl])

    def run(exp, step_list):
        for m, model in enumerate(models):
            traker.start_scoring_checkpoint(exp, model.unet.state_dict(), model_id=m, num_targets=len(step_list))
            for c in range(0, len(step_list), QUERY_CHUNK):
                sl = step_list[c : c + QUERY_CHUNK]
                traker.score(batch=batch(model, sl), num_samples=len(sl))
        return traker.finalize_scores(exp_name=exp)

    t0 = time.perf_counter()
    run("warmup", [0])
    out["first_call_one_step_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = np.asarray(run("query", steps))  # (N, S)
    out["query_all_steps_s"] = time.perf_counter() - t0
    if spec.get("scores_out"):
        np.save(spec["scores_out"], scores.T.astype(np.float32))
    return out


def worker_exact(spec: dict[str, Any]) -> dict[str, Any]:
    """Unprojected scores in dual form: tau = (G G^T + lambda I)^-1 G g, averaged over checkpoints.

    lambda = RIDGE * trace(G G^T) / d_ref: the absolute ridge the projected methods use at d_ref.
    """
    import numpy as np
    import torch

    from attribution.features import get_output, per_example_grads, select_params
    from attribution.scoring import query_noises

    models, ds = _load(spec)
    n = spec["n"]
    traj = _trajectory(models[0])
    ts, noises = _train_draws(models[0], n)
    steps = list(range(NUM_STEPS))
    qn = query_noises(steps, K, 0, tuple(traj.x0_hat.shape[1:]))
    qt = traj.timesteps[:, None].expand(-1, K)
    out_fn = get_output("loss")
    total = np.zeros((NUM_STEPS, n))
    t0 = time.perf_counter()
    for model in models:
        params = select_params(model)
        G = torch.cat(
            [per_example_grads(model, params, out_fn, ds.images(range(s, min(n, s + 64))), ts[s : s + 64], noises[s : s + 64], chunk_size=16)
             for s in range(0, n, 64)]
        ).double()  # (N, p)
        g = torch.cat(
            [per_example_grads(model, params, out_fn, traj.x0_hat[s : s + QUERY_CHUNK], qt[s : s + QUERY_CHUNK], qn[s : s + QUERY_CHUNK], chunk_size=QUERY_CHUNK)
             for s in range(0, NUM_STEPS, QUERY_CHUNK)]
        ).double()  # (S, p)
        gram = G @ G.T
        lam = RIDGE * float(torch.trace(gram)) / spec["d_ref"]
        tau = torch.linalg.solve(gram + lam * torch.eye(n, dtype=gram.dtype, device=gram.device), G @ g.T)  # (N, S)
        total += tau.T.cpu().numpy()
        del G, g
    np.save(spec["scores_out"], (total / len(models)).astype(np.float32))
    return {"exact_s": time.perf_counter() - t0}


WORKERS = {
    "limit": worker_limit,
    "ours_featurize": worker_ours_featurize,
    "ours_query": worker_ours_query,
    "trak_featurize": worker_trak_featurize,
    "trak_query": worker_trak_query,
    "exact": worker_exact,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    tuned = False
    if spec.get("tune_malloc"):  # every method alike: the limit, ours and traker
        from attribution.tools import tune_malloc

        tuned = tune_malloc()
    result = WORKERS[spec["kind"]](spec)
    result["malloc_tuned"] = tuned
    common.emit_result(result)


# ====================================================================== driver side
def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine repeated runs of one method on a shared machine: the fastest time of each timed
    quantity (``*_s``), the highest rate (``*_per_s``), the highest peak RSS; all runs kept in ``runs``."""
    out: dict[str, Any] = dict(runs[0])
    for key, value in runs[0].items():
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if not isinstance(value, (int, float)) or len(vals) != len(runs):
            continue
        if key.endswith(("per_s", "per_s_warm")) or key == "peak_rss_bytes":
            out[key] = max(vals)
        elif key.endswith("_s") and key != "process_wall_s":
            out[key] = min(vals)
    if "rows" in out and "featurize_s" in out:
        out["examples_per_s"] = out["rows"] / out["featurize_s"]
    if "train_rows" in out:
        out["train_examples_per_s"] = out["train_rows"] / out["train_s"]
    out["others_busy_cores"] = [r.get("others_busy_cores") for r in runs]
    out["repeats"] = len(runs)
    if len(runs) > 1:
        out["runs"] = runs
    return out


def spearman_rows(a, b) -> dict[str, float]:
    """Spearman rho between a[s] and b[s] for every row s: mean / min / max."""
    import numpy as np
    from scipy.stats import spearmanr

    rhos = [float(spearmanr(x, y).statistic) for x, y in zip(a, b)]
    return {"mean": float(np.mean(rhos)), "min": float(np.min(rhos)), "max": float(np.max(rhos))}


def run_model(name: str, cfg: dict[str, Any], work: Path, args, log) -> dict[str, Any]:
    """All methods on one model configuration; returns the raw worker results and derived ratios."""
    import numpy as np

    if args.projections:
        cfg["ours_projections"] = [k for k in cfg["ours_projections"] if k in args.projections]
    if args.trak_variants:
        cfg["trak_variants"] = [v for v in cfg["trak_variants"] if v[0] in args.trak_variants]
        cfg["trak_query_variants"] = [v for v in cfg.get("trak_query_variants", ()) if v in args.trak_variants]
    if args.no_query:
        cfg |= {"query": False, "query_projections": [], "trak_query_variants": [], "exact": False}
    base = {
        "model_dirs": [str(p) for p in cfg["model_dirs"]],
        "data": cfg["data"],
        "n": cfg["n"],
        "threads": args.threads,
        "warm_rerun": args.warm_rerun,
        "device": args.device,
        "tune_malloc": args.tune_malloc,
    }
    d = args.proj_dim
    res: dict[str, Any] = {"config": {k: v for k, v in cfg.items() if k != "model_dirs"} | {"model_dirs": base["model_dirs"]}}
    res["config"]["num_checkpoints"] = len(cfg["model_dirs"])

    def run(label, spec, repeats=None):
        repeats = repeats or cfg.get("repeats", args.repeats)
        runs = []
        for i in range(repeats):
            if args.wait_quiet:
                busy = common.wait_for_quiet(max_wait_s=args.wait_quiet, log=log)
                log(f"[{name}] others keep {busy:.2f} cores busy")
            log(f"[{name}] {label} ({i + 1}/{repeats}) ...")
            t0 = time.perf_counter()
            r = common.run_worker(SCRIPT, base | spec, timeout=args.timeout)
            log(f"[{name}] {label} done in {time.perf_counter() - t0:.1f} s: "
                + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float)))
            runs.append(r)
        res[label] = best_of(runs)
        return res[label]

    bs, chunk = cfg["batch_size"], cfg["chunk_size"]
    run("limit", {"kind": "limit", "batch_size": bs, "query": cfg.get("query", True)})
    scores: dict[str, Path] = {}
    for kind in cfg["ours_projections"]:
        store = work / f"{name}-store-{kind}"
        run(f"ours_{kind}_featurize", {"kind": "ours_featurize", "proj_kind": kind, "proj_dim": d, "store": str(store),
                                       "batch_size": bs, "chunk_size": chunk})
        if kind in cfg.get("query_projections", cfg["ours_projections"]):
            scores[f"ours_{kind}"] = work / f"{name}-scores-ours-{kind}.npy"
            run(f"ours_{kind}_query", {"kind": "ours_query", "store": str(store), "ridge": RIDGE,
                                       "scores_out": str(scores[f"ours_{kind}"])})
        shutil.rmtree(store, ignore_errors=True)
    for variant, tbs, n_override in cfg["trak_variants"]:
        tdir = work / f"{name}-trak-{variant}"
        spec = {"kind": "trak_featurize", "variant": variant, "proj_dim": d, "trak_dir": str(tdir), "batch_size": tbs}
        if n_override:
            spec["n"] = n_override
        one = 1 if variant in OUR_MATRIX_VARIANTS else None  # for the agreement only
        run(f"trak_{variant}_featurize", spec, repeats=one)
        if cfg.get("query", True) and variant in cfg.get("trak_query_variants", ()):
            scores[f"trak_{variant}"] = work / f"{name}-scores-trak-{variant}.npy"
            run(f"trak_{variant}_query", {"kind": "trak_query", "variant": variant, "proj_dim": d, "trak_dir": str(tdir),
                                          "scores_out": str(scores[f"trak_{variant}"])} | ({"n": n_override} if n_override else {}),
                repeats=one)
        shutil.rmtree(tdir, ignore_errors=True)
    for hd in cfg.get("high_d", ()):
        store = work / f"{name}-store-sjlt-{hd}"
        run(f"ours_sjlt_d{hd}_featurize", {"kind": "ours_featurize", "proj_kind": "sjlt", "proj_dim": hd, "store": str(store),
                                           "batch_size": bs, "chunk_size": chunk}, repeats=1)
        scores[f"ours_sjlt_d{hd}"] = work / f"{name}-scores-ours-sjlt-{hd}.npy"
        run(f"ours_sjlt_d{hd}_query", {"kind": "ours_query", "store": str(store), "ridge": RIDGE * hd / d,
                                       "scores_out": str(scores[f"ours_sjlt_d{hd}"])}, repeats=1)
        shutil.rmtree(store, ignore_errors=True)
    if cfg.get("exact"):
        scores["exact"] = work / f"{name}-scores-exact.npy"
        run("exact", {"kind": "exact", "d_ref": d, "scores_out": str(scores["exact"])}, repeats=1)

    # ---------------------------------------------------------------- derived numbers
    lim = res["limit"]
    der: dict[str, Any] = {"limit_examples_per_s": lim["train_examples_per_s"]}
    for kind in cfg["ours_projections"]:
        feat = res[f"ours_{kind}_featurize"]
        eps_ours = feat["examples_per_s"]
        der[f"ours_{kind}_over_limit"] = eps_ours / lim["train_examples_per_s"]
        if "examples_per_s_warm" in feat:
            der[f"ours_{kind}_warm_over_limit"] = feat["examples_per_s_warm"] / lim["train_examples_per_s"]
        for variant, _, _ in cfg["trak_variants"]:
            trak = res[f"trak_{variant}_featurize"]
            der[f"ours_{kind}_over_trak_{variant}"] = eps_ours / trak["examples_per_s"]
            if "examples_per_s_warm" in feat and "examples_per_s_warm" in trak:
                der[f"ours_{kind}_warm_over_trak_{variant}_warm"] = feat["examples_per_s_warm"] / trak["examples_per_s_warm"]
        if f"ours_{kind}_query" in res:
            q = res[f"ours_{kind}_query"]["query_all_steps_s"]
            der[f"ours_{kind}_query_over_limit"] = q / lim["query_all_steps_s"]
            for variant in cfg.get("trak_query_variants", ()):
                der[f"trak_{variant}_query_over_ours_{kind}"] = res[f"trak_{variant}_query"]["query_all_steps_s"] / q
    loaded = {k: np.load(p) for k, p in scores.items() if p.exists()}
    corr: dict[str, Any] = {}
    pairs = [(a, b) for a in loaded for b in loaded if a < b]
    for a, b in pairs:
        corr[f"{a}~{b}"] = spearman_rows(loaded[a], loaded[b])
    der["spearman"] = corr
    res["derived"] = der
    for p in scores.values():
        p.unlink(missing_ok=True)
    return res


def _mem(r: dict[str, Any] | None) -> str:
    """Peak RSS, and the peak GPU allocation where the worker used a GPU."""
    if not r:
        return "-"
    gpu = r.get("peak_gpu_bytes")
    return common.fmt_bytes(r["peak_rss_bytes"]) + (f" / GPU {common.fmt_bytes(gpu)}" if gpu is not None else "")


def _busy(r: dict[str, Any]) -> str:
    v = r.get("others_busy_cores")
    vals = v if isinstance(v, list) else [v]
    return ",".join("-" if x is None else f"{x:.1f}" for x in vals)


def tables(results: dict[str, Any]) -> str:
    """Markdown tables of every model's results."""
    out = []
    for name, res in results["models"].items():
        cfg = res["config"]
        lim = res["limit"]
        out.append(f"\n### {name}: {cfg['description']}, N = {cfg['n']}, M = {cfg['num_checkpoints']}, d = {results['proj_dim']}\n")
        rows = [["plain batched fwd+bwd (limit proxy)", f"{lim['train_examples_per_s']:.1f}", "1.00", "(warm)", "-",
                 _mem(lim), "-",
                 f"{lim['query_all_steps_s']:.2f}" if "query_all_steps_s" in lim else "-", "-", "-",
                 _busy(lim)]]
        labels = [(f"ours_{k}", f"ours, {k}") for k in cfg["ours_projections"]]
        labels += [(f"trak_{v}", f"traker fp32, {v} (batch {b}{', N=' + str(nn) if nn else ''})") for v, b, nn in cfg["trak_variants"]]
        for key, label in labels:
            f = res[f"{key}_featurize"]
            q = res.get(f"{key}_query")
            warm = f.get("examples_per_s_warm")
            rows.append([
                label,
                f"{f['examples_per_s']:.1f}",
                f"{f['examples_per_s'] / lim['train_examples_per_s']:.2f}",
                f"{warm:.1f} ({warm / lim['train_examples_per_s']:.2f})" if warm else "-",
                f"{f['finalize_s']:.2f}",
                _mem(f),
                _mem(q),
                f"{q['query_all_steps_s']:.2f}" if q else "-",
                f"{q['first_call_one_step_s']:.2f}" if q else "-",
                f"{q['one_step_new_mask_s']:.3f}" if q and "one_step_new_mask_s" in q else "-",
                _busy(f) + (f" / {_busy(q)}" if q else ""),
            ])
        out.append(common.print_table(rows, ["method", "featurize ex/s", "x limit", "2nd featurize ex/s (x limit)",
                                             "finalize s", "peak RSS featurize",
                                             "peak RSS query", "query 50 steps K=20 (s)", "first query call (s)",
                                             "1 step, new mask (s)", "others' busy cores (feat / query)"]))
        der = res["derived"]
        out.append("\nratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in der.items() if isinstance(v, float)))
        if der.get("spearman"):
            rows = [[k, f"{v['mean']:.4f}", f"{v['min']:.4f}"] for k, v in der["spearman"].items()]
            out.append("")
            out.append(common.print_table(rows, ["Spearman rho (per step, 50 steps)", "mean", "min"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    p.add_argument("--n", type=int, default=512, help="train examples, default model")
    p.add_argument("--large-n", type=int, default=64, help="train examples, large model")
    p.add_argument("--checkpoints", type=int, default=1, help="checkpoints M (same for every method)")
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--model-dir", action="append", type=Path,
                   help="default-model checkpoints (default: assets/ensemble/ddpm-seed{m} if present, else random weights)")
    p.add_argument("--app-checkpoints", type=int, default=3,
                   help="also time ours (sjlt) with this many checkpoints, the app's ensemble (0: skip)")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--skip-default", action="store_true")
    p.add_argument("--no-high-d", action="store_true", help="skip the d = 8192 / 16384 agreement runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads in workers (0: torch's default)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every default-model method; the fastest counts (the large model runs once)")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="before each method wait up to this many seconds for other processes to go idle")
    p.add_argument("--projections", nargs="+", help="run only these of ours (sjlt, factorized, gaussian)")
    p.add_argument("--no-query", action="store_true", help="featurize only (no query timings, no score agreement)")
    p.add_argument("--no-warm-rerun", dest="warm_rerun", action="store_false",
                   help="skip the second featurize in each worker (the warm-process throughput column)")
    p.add_argument("--trak-variants", nargs="+", help="run only these traker variants (default, tuned, ours_matrix, ours_factorized_matrix, tuned_batch)")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where every method runs (traker's default on cuda is its CudaProjector when "
                        "fast_jl is installed, else BasicProjector)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="every worker (limit, ours, traker) keeps freed memory in glibc's heap "
                        "(attribution.tools.allocator.tune_malloc, what `attribution featurize` does)")
    p.add_argument("--batch-size", type=int, default=64, help="featurize batch of ours, traker default and the limit (default model)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "bench_traker.json")
    p.add_argument("--work", type=Path, help="scratch directory (default: a fresh one under /tmp)")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_traker_"))
    work.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "other_cpu_users_at_start": common.other_cpu_users(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "tune_malloc": args.tune_malloc,
        "proj_dim": args.proj_dim,
        "ridge": RIDGE,
        "K": K,
        "num_steps": NUM_STEPS,
        "query_chunk_steps": QUERY_CHUNK,
        "models": {},
    }
    M = args.checkpoints
    if args.quick:
        args.n, args.large_n, args.proj_dim, args.repeats = 48, 8, 256, 1
        results["proj_dim"] = args.proj_dim
    if not args.skip_default:
        dirs = args.model_dir
        trained = False
        if not dirs:
            cand = [common.REPO / "assets" / "ensemble" / f"ddpm-seed{m}" for m in range(M)]
            if all((c / "model_index.json").exists() for c in cand):
                dirs, trained = cand, True
            else:
                dirs = [common.save_random_pipeline(work / f"default-m{m}", (1, 32, 32), (16, 32, 32), 1, seed=m) for m in range(M)]
        else:
            trained = True
        n = args.n
        cfg = {
            "description": "bundled default UNet2DModel (16, 32, 32), layers_per_block 1, no attention, 1x32x32"
            + (" (trained weights)" if trained else " (random weights)"),
            "model_dirs": dirs,
            "data": "digits",
            "n": n,
            "batch_size": args.batch_size,
            "chunk_size": None,  # featurize chooses (auto_chunk_size)
            "ours_projections": ["sjlt", "factorized", "gaussian"],
            # (variant, featurize batch, N override)
            "trak_variants": [("default", args.batch_size, None), ("tuned", 2 * args.batch_size, None),
                              ("ours_matrix", 2 * args.batch_size, None),
                              ("ours_factorized_matrix", 2 * args.batch_size, None)],
            "trak_query_variants": ["default", "tuned", "ours_matrix", "ours_factorized_matrix"],
            "high_d": [] if (args.no_high_d or args.quick) else [8192, 16384],
            "exact": True,
        }
        results["models"]["default"] = run_model("default", cfg, work, args, log)
        write(results, args.out)
    if args.app_checkpoints and not args.skip_default:
        # the app's setting: the ensemble of M checkpoints, sjlt; query times barely depend on N or num_draws
        M_app = args.app_checkpoints
        cand = [common.REPO / "assets" / "ensemble" / f"ddpm-seed{m}" for m in range(M_app)]
        trained = all((c / "model_index.json").exists() for c in cand)
        dirs = cand if trained else [
            common.save_random_pipeline(work / f"default-m{m}", (1, 32, 32), (16, 32, 32), 1, seed=m) for m in range(M_app)]
        cfg = {
            "description": f"bundled default UNet, ensemble of {M_app} checkpoints (the app's query setting)"
            + (" (trained weights)" if trained else " (random weights)"),
            "model_dirs": dirs,
            "data": "digits",
            "n": args.n,
            "batch_size": args.batch_size,
            "chunk_size": None,  # featurize chooses (auto_chunk_size)
            "ours_projections": ["sjlt", "factorized"],
            "trak_variants": [],
            "exact": False,
        }
        results["models"][f"default_M{M_app}"] = run_model(f"default_M{M_app}", cfg, work, args, log)
        write(results, args.out)
    if not args.skip_large:
        n = args.large_n
        boc = (8, 16) if args.quick else (80, 160, 240)
        dirs = [common.save_random_pipeline(work / f"large-m{m}", (3, 32, 32), boc, 1, seed=m) for m in range(M)]
        cfg = {
            "repeats": 1,
            "description": f"larger UNet2DModel {boc}, layers_per_block 1, no attention, 3x32x32, random weights",
            "model_dirs": dirs,
            "data": "random3",
            "n": n,
            "batch_size": n,
            "chunk_size": None,  # featurize chooses (auto_chunk_size)
            "ours_projections": ["sjlt", "factorized", "gaussian"],
            # traker default: batches of 32 (one call, the matrix regenerated per call; timed on 32 examples);
            # tuned: the whole N in one call (one matrix generation). A single-block matrix (p x d fp32,
            # ~85 GB here) does not fit in memory, so the block size stays at traker's default.
            "trak_variants": [("default", 32, min(32, n)), ("tuned_batch", n, None)],
            "trak_query_variants": [],
            # ours with the dense Gaussian regenerates the ~85 GB matrix at every call: query sjlt only
            "query_projections": ["sjlt", "factorized"],
            "exact": False,
        }
        results["models"]["large"] = run_model("large", cfg, work, args, log)
    results["other_cpu_users_at_end"] = common.other_cpu_users()
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_start
    results["tables_markdown"] = tables(results)
    write(results, args.out)
    log(f"wrote {args.out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
