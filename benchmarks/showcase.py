"""Recompute the bundled counterfactual showcase into assets/showcase/ (see attribution/counterfactual/showcase.py).

    OMP_NUM_THREADS=1 python benchmarks/showcase.py --rules top --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/showcase.py --rules random --seeds 0 1 2 3 4 5   # one shared retraining
    python benchmarks/showcase.py --table            # the measured table of what is there

Each retraining of the bundled checkpoint takes about 8 min on 2 CPU cores (about 15 min on one busy
core); results already in the cache or in the output are not recomputed. Each entry is exactly what
``attribution counterfactual`` (printed per entry) writes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attribution.counterfactual.showcase import (  # noqa: E402
    SHOWCASE_K,
    SHOWCASE_SEEDS,
    SHOWCASE_STEP,
    entries,
    reproduce_command,
    showcase_table,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SHOWCASE_SEEDS), help="sample seeds")
    p.add_argument("--rules", nargs="+", default=["top", "random"], help="removal rules (top, bottom, random)")
    p.add_argument("--step", type=int, default=SHOWCASE_STEP, help="step whose scores choose the removals")
    p.add_argument("--k", type=int, default=SHOWCASE_K, help="images removed")
    p.add_argument("--out", type=Path, default=REPO / "assets" / "showcase", help="showcase directory")
    p.add_argument("--cache", type=Path, help="result and work cache (default: the app's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--table", action="store_true", help="only print the measured table of --out")
    args = p.parse_args(argv)
    if not args.table:
        from attribution.workspace import Workspace, default_bundle

        ws = Workspace(default_bundle(), device=args.device)
        ws.counterfactual_shipped = ()
        if args.cache:
            ws.counterfactual_cache = args.cache
        args.out.mkdir(parents=True, exist_ok=True)
        for rule in args.rules:
            for i, seed in enumerate(args.seeds):
                t0 = time.perf_counter()
                key, _ = ws.generate(seed)
                req = ws.counterfactual_request(key, args.step, rule, args.k)
                # random removal is the same set for every sample: keep its model for the next seeds
                res = ws.run_counterfactual(req, log=print, keep_model=rule == "random" and i < len(args.seeds) - 1)
                dest = args.out / res.path.name
                if not dest.exists():
                    shutil.copytree(res.path, dest)
                print(f"seed {seed} {req.label()}: {time.perf_counter() - t0:.0f} s -> {dest}\n  {reproduce_command(res)}",
                      flush=True)
    results = entries(args.out)
    print(json.dumps(showcase_table(results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
