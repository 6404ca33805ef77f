"""Why an uploaded training image is not its own top influencer at late steps (issue 3).

Two measurements on a bundled checkpoint, with exact (unprojected) gradients:

1. Timestep structure: for a few training images, the mean loss gradient over
   ``--noises`` noises at each of a few timesteps, twice with independent noises.
   The cosine between the two means at one timestep says how well determined the
   gradient is; the cosine between timesteps says how much of the query's timestep
   survives in train features averaged over all timesteps.
2. Self-rank: for each image, uploaded (DDIM inversion, plain and with the fixed-point
   refinement :func:`attribution.sampling.inversion.invert_image` now does) and queried at late
   steps (Eq. 3, K = 20), its rank among the first ``--n`` training images (0 = first)
   with the TRAK kernel of train features drawn (a) over all timesteps in equal strata
   (the paper's choice), (b) over all timesteps in strata equal in log(t + T/200)
   (``timestep_sampling="log-stratified"``) and (c) all at the query's timestep.

Usage (about 8 minutes on 2 idle cores):

    python benchmarks/self_attribution.py --n 512 --draws 16

Writes ``benchmarks/results/self_attribution.json`` and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import REPO, RESULTS, machine_info, print_table  # noqa: I001 (puts the checkout first on sys.path)

from attribution.config import FeaturizeConfig
from attribution.data import digits_dataset
from attribution.features import draw_timesteps_and_noise, get_output, per_example_grads, per_step_grads, select_params
from attribution.models import load_model
from attribution.sampling import invert_image


def mean_grads(model, params, x: torch.Tensor, timesteps: list[int], noises: int, g: torch.Generator) -> torch.Tensor:
    """(len(timesteps), P): the loss gradient of image x (C, H, W) averaged over ``noises`` noises per timestep."""
    eps = torch.randn(len(timesteps), noises, *x.shape, generator=g)
    ts = torch.tensor(timesteps)[:, None].expand(-1, noises)
    return per_step_grads(model, params, get_output("loss"), x[None].expand(len(timesteps), -1, -1, -1), ts, eps)


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return ((a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None])).numpy()


def kernel_scores(phi: torch.Tensor, q: torch.Tensor, ridge: float) -> torch.Tensor:
    """TRAK scores (N,) of query gradient q (P,) against train gradients phi (N, P), in the dual form
    phi (phi^T phi + lam I)^-1 q = (phi phi^T + lam I)^-1 phi q, lam = ridge * mean diag(phi phi^T)."""
    k = phi @ phi.T
    lam = ridge * k.diagonal().mean()
    return torch.linalg.solve(k + lam * torch.eye(k.shape[0]), phi @ q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "assets/ensemble/ddpm-seed0"))
    ap.add_argument("--n", type=int, default=512, help="training images ranked (the first n of the bundled digits)")
    ap.add_argument("--images", type=int, nargs="+", default=[7, 100, 200, 300, 400, 450, 50, 250])
    ap.add_argument("--timesteps", type=int, nargs="+", default=[0, 5, 10, 20, 40, 80, 160, 320])
    ap.add_argument("--query-timesteps", type=int, nargs="+", default=[0, 20, 40, 80, 180])
    ap.add_argument("--noises", type=int, default=64, help="noises per mean gradient (measurement 1)")
    ap.add_argument("--draws", type=int, default=16, help="draws per train example (measurement 2)")
    ap.add_argument("--ridge", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    model = load_model(args.model)
    params = select_params(model)
    if max(args.images) >= args.n:
        raise SystemExit("--images must be below --n")
    x = digits_dataset("train").images(np.arange(args.n))
    shape = tuple(x.shape[1:])

    # 1. timestep structure of two images
    structure = {}
    for i in args.images[:2]:
        a = mean_grads(model, params, x[i], args.timesteps, args.noises, g)
        b = mean_grads(model, params, x[i], args.timesteps, args.noises, g)
        structure[i] = {"repeatability": np.diag(cosines(a, b)).tolist(), "across_timesteps": cosines(a, b).tolist(),
                        "norms": a.norm(dim=1).tolist()}
        rows = [[f"t={t}"] + [f"{c:+.2f}" for c in row] for t, row in zip(args.timesteps, cosines(a, b))]
        print(f"\nimage {i}: cosine of 64-noise mean loss gradients (rows: first set, columns: second set)")
        print_table(rows, ["", *[f"t={t}" for t in args.timesteps]])

    # 2. self-rank: train draws in equal strata, in log strata, or at the query's timestep; plain or refined inversion
    loss = get_output("loss")
    T = model.num_train_timesteps
    feats = {}
    for sampling in ("stratified", "log-stratified"):  # the library's draws, for the same examples
        ts, noise = draw_timesteps_and_noise(np.arange(args.n), FeaturizeConfig(num_draws=args.draws, timestep_sampling=sampling),
                                             T, shape)
        feats[f"all timesteps, {sampling}"] = per_example_grads(model, params, loss, x, ts, noise)
    phi_at = {t: per_example_grads(model, params, loss, x, torch.full((args.n, args.draws), t),
                                   torch.randn(args.n, args.draws, *shape, generator=g)) for t in args.query_timesteps}
    qts = torch.tensor(args.query_timesteps)[:, None].expand(-1, 20)
    ranks: dict[str, dict[int, list[int]]] = {}
    for i in args.images:
        for inversion, iters in (("plain", 0), ("refined", None)):
            traj = invert_image(model, x[i], 50, **({} if iters is None else {"refine_iters": iters}))
            steps = [int((traj.timesteps == t).nonzero()[0, 0]) for t in args.query_timesteps]
            q = per_step_grads(model, params, loss, traj.x0_hat[steps], qts, torch.randn(len(steps), 20, *shape, generator=g))
            for name in (*feats, "at the query's timestep"):
                r = []
                for s, t in enumerate(args.query_timesteps):
                    sc = kernel_scores(feats.get(name, phi_at[t]), q[s], args.ridge)
                    r.append(int((sc > sc[i]).sum()))
                ranks.setdefault(f"{name} | {inversion} inversion", {})[i] = r
    rows = [[name, str(i)] + [str(v) for v in r] for name, by in ranks.items() for i, r in by.items()]
    print(f"\nrank of the uploaded image among {args.n} (0 = its own top influencer), {args.draws} draws per example")
    print_table(rows, ["train draws | inversion", "image", *[f"t={t}" for t in args.query_timesteps]])
    firsts = [[name] + [f"{sum(r[s] == 0 for r in by.values())}/{len(by)}" for s in range(len(args.query_timesteps))]
              for name, by in ranks.items()]
    print("\nimages ranked first")
    print_table(firsts, ["train draws | inversion", *[f"t={t}" for t in args.query_timesteps]])
    out = {"args": vars(args), "machine": machine_info(), "structure": structure, "ranks": ranks,
           "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "self_attribution.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'self_attribution.json'} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
