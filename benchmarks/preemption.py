"""Does what the user just asked for pre-empt background scoring? (issue 20, "interactive paths first")

On the bundled default: one generated sample; the latency of scoring one masked step
(a painted patch, never cached) by :meth:`Workspace.scores` measured

* alone (no background work),
* while the app's background prefetch of the sample's other steps runs (``chunk=1``, as
  :func:`ui.progress` starts it: the lock is released between steps),
* and, for comparison, with a prefetch of ``chunk=5`` steps per lock hold.

The foreground request waits at most for the background step in flight, so its latency is
about one step alone plus up to one more step. Prints a table and writes JSON::

    python benchmarks/preemption.py --repeats 5 --json benchmarks/results/preemption.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from attribution.scoring import PatchMask
from attribution.tools import configure_torch_threads
from attribution.workspace import Workspace, default_bundle


def masked_step_latency(ws: Workspace, key: str, step: int, seed: int) -> float:
    """Seconds to score ``step`` of ``key`` under a fresh random patch mask (never a cache hit)."""
    h, w = ws.pixel_shape[1:]
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=np.float32)
    y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
    mask[y : y + 8, x : x + 8] = 1.0
    t0 = time.perf_counter()
    ws.scores(key, "journey", [step], mask=PatchMask.of(mask))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="masked requests per condition")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    configure_torch_threads()  # as the app does: one torch thread per Python thread
    ws = Workspace(default_bundle())
    key, traj = ws.generate(seed=0)
    steps = list(range(len(traj.timesteps)))
    ws.scores(key, "journey", [0])  # loads the scorer and its kernels once
    masked_step_latency(ws, key, 24, 0)  # and a first masked step
    out: dict[str, list[float]] = {"alone": []}
    seed = 0
    for _ in range(args.repeats):
        seed += 1
        out["alone"].append(masked_step_latency(ws, key, 25, seed))
    for chunk in (1, 5):
        name = f"background chunk={chunk}"
        out[name] = []
        for r in range(args.repeats):
            # a fresh background job over unscored steps: a new mask key each time keeps it busy
            bg_values = np.ones(ws.pixel_shape[1:], dtype=np.float32)
            bg_values[chunk, r] = 0.0  # a distinct mask per run: nothing cached
            bg_mask = PatchMask.of(bg_values)
            bg_key = ("scores", key, "journey", bg_mask.key)

            def work(job, bg_mask=bg_mask):
                for i in range(0, len(steps), chunk):
                    job.check()
                    ws.scores(key, "journey", steps[i : i + chunk], mask=bg_mask)
                    job.done = i + chunk

            job = ws.jobs.start(bg_key, f"bg-{chunk}-{r}", work, total=len(steps))
            time.sleep(1.0)  # let it get going
            seed += 1
            out[name].append(masked_step_latency(ws, key, 25, seed))
            job._stop.set()  # the runner's own stop signal: the job ends at its next check
            while job.running:
                time.sleep(0.05)
    ws.shutdown()
    print("condition                 median s   max s   (masked step 25, journey, bundled default)")
    for name, v in out.items():
        print(f"{name:24s}  {statistics.median(v):7.2f}  {max(v):7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": out, "repeats": args.repeats}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
