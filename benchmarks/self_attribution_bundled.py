"""Self-attribution on the bundled default, as the app does it (issue 3).

Random training digits are uploaded (PNG bytes -> ``Workspace.upload``: refined DDIM
inversion, 50 steps) and scored with journey-TRAK against the shipped store (3
checkpoints, all 4,000 digits) at the late steps; each digit's rank among the 4,000
(0 = its own top influencer) is recorded for several relative ridges. ``--store`` scores
against another loss-output store instead, with the checkpoints it records (e.g. one built with
``attribution featurize --timestep-sampling stratified --num-draws 4``, the old default);
``--method journey-groups`` scores with one kernel per block (a block-sjlt store).

Usage (about 2 minutes on 2 idle cores):

    python benchmarks/self_attribution_bundled.py --digits 24

Writes ``benchmarks/results/self_attribution_bundled.json`` and prints the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, machine_info, print_table  # noqa: I001 (puts the checkout first on sys.path)
from PIL import Image

from attribution.config import QueryConfig
from attribution.features import get_method
from attribution.scoring import Scorer, checkpoint_dirs
from attribution.workspace import Workspace, default_bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--digits", type=int, default=24, help="random training digits uploaded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs="+", default=list(range(42, 50)), help="steps of 50 (49 = t 0)")
    ap.add_argument("--ridges", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    ap.add_argument("--store", type=Path, help="loss-output store to score against (default: the bundled one)")
    ap.add_argument("--method", default="journey", choices=["journey", "journey-groups"],
                    help="store method scored (journey-groups needs group weights fitted at every --ridges value)")
    ap.add_argument("--out", type=Path, default=RESULTS / "self_attribution_bundled.json", help="JSON output file")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bundle = default_bundle()
    if args.store:  # and the checkpoints that store was built from
        bundle = dataclasses.replace(bundle, stores={**bundle.stores, "loss": args.store},
                                     model_dirs=tuple(checkpoint_dirs(args.store)))
    ws = Workspace(bundle, device="cpu")
    base = ws.scorer("journey")
    scorers = {r: Scorer(base.store, ws.models, get_method(args.method), QueryConfig(ridge=r), dataset=ws.dataset)
               for r in args.ridges}
    ids = np.random.default_rng(args.seed).choice(ws.num_train, args.digits, replace=False)
    ranks: dict[float, list[list[int]]] = {r: [] for r in args.ridges}
    timesteps: list[int] = []
    for i in ids:
        png = io.BytesIO()
        Image.fromarray(ws.train_images([int(i)])[0][:, :, 0]).save(png, format="PNG")
        _, traj = ws.upload(png.getvalue(), num_steps=50)
        timesteps = traj.timesteps[args.steps].tolist()
        feats = base.query_features(traj, args.steps)
        for r, scorer in scorers.items():
            ranks[r].append([int((row > row[i]).sum()) for row in scorer.scores_from_features(feats)])
    rows = []
    for r, rr in ranks.items():
        a = np.array(rr)
        rows.append([f"{r:g}", "first"] + [f"{int(c)}/{len(a)}" for c in (a == 0).sum(0)])
        rows.append([f"{r:g}", "top 5"] + [f"{int(c)}/{len(a)}" for c in (a < 5).sum(0)])
    print(f"uploaded training digits ranked first / in the top 5 among {ws.num_train} ({args.method}, {base.store.root})")
    print_table(rows, ["ridge", "", *[f"t={t}" for t in timesteps]])
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine_info(),
           "store_settings": base.store.manifest["settings"], "digits": ids.tolist(), "timesteps": timesteps,
           "ranks": {str(r): rr for r, rr in ranks.items()}, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
