"""Featurize throughput and one query step's time for the SDXL, DiT, SD3 and FLUX families, on random weights.

For each configuration (the tiny pipelines of the tests and one mid-size pipeline per
family, built by ``tests/family_builders.py``; nothing is downloaded) it times

  * featurize: N train examples x D draws, per-example gradients of every parameter,
    sjlt projection to d, on the CPU: examples per second (after the VAE latents are made);
  * one query step: the Eq. (3) gradient of one sampling step with K resamples, projected,
    and its TRAK scores against the store (the time the app waits for a step not yet cached).

    OMP_NUM_THREADS=1 python benchmarks/bench_families.py
    OMP_NUM_THREADS=1 python benchmarks/bench_families.py --configs dit-tiny dit-mid --num-train 32

Prints a table and writes JSON (with the machine's load) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import RESULTS, REPO, machine_info, print_table

sys.path.insert(0, str(REPO / "tests"))

from family_builders import (  # noqa: E402
    ID2LABEL, make_tiny_dit_pipeline, make_tiny_flux_pipeline, make_tiny_sd3_pipeline, make_tiny_sdxl_pipeline,
)

#: name -> (family, builder of the pipeline directory, what it is in words)
CONFIGS: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "sdxl-tiny": ("sdxl", make_tiny_sdxl_pipeline, "UNet (8, 16), latents 4x8x8"),
    "sdxl-mid": ("sdxl", lambda d: make_tiny_sdxl_pipeline(d, widths=(64, 128, 128), sample_size=16),
                 "UNet (64, 128, 128), latents 4x16x16"),
    "dit-tiny": ("dit", make_tiny_dit_pipeline, "DiT 2 layers, width 16, latents 4x8x8"),
    "dit-mid": ("dit", lambda d: make_tiny_dit_pipeline(d, layers=4, heads=6, head_dim=64, sample_size=16),
                "DiT 4 layers, width 384 (DiT-S), latents 4x16x16"),
    "sd3-tiny": ("sd3", make_tiny_sd3_pipeline, "SD3 MM-DiT 2 layers, width 16, CLIP x2 + T5, latents 4x8x8"),
    "sd3-mid": ("sd3", lambda d: make_tiny_sd3_pipeline(d, layers=4, heads=6, head_dim=64, sample_size=16),
                "SD3 MM-DiT 4 layers, width 384, CLIP x2 + T5, latents 4x16x16"),
    "flux-tiny": ("flux", make_tiny_flux_pipeline,
                  "FLUX 1 double + 1 single block, width 32, guidance embedding, CLIP + T5, latents 4x8x8"),
    "flux-mid": ("flux", lambda d: make_tiny_flux_pipeline(d, sample_size=32, layers=2, single_layers=4, heads=6,
                                                          head_dim=64, rope=(16, 24, 24)),
                 "FLUX 2 double + 4 single blocks, width 384, guidance embedding, CLIP + T5, latents 4x16x16"),
}
WORDS = ["red", "blue", "square", "circle", "stripes", "noise"]


def random_dataset(family: str, model, n: int):
    """N random images at the model's pixel size: captioned (SDXL, SD3, FLUX) or in the model's classes (DiT)."""
    from attribution.data import ArrayDataset

    rng = np.random.default_rng(0)
    c, h, w = model.pixel_shape
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    if family == "dit":
        names = [label.split(",")[0] for label in ID2LABEL.values()]
        return ArrayDataset(images, labels=np.arange(n) % len(names), class_names=names, name="random")
    return ArrayDataset(images, captions=[" ".join(rng.choice(WORDS, 3)) for _ in range(n)], name="random")


def bench_config(name: str, args: argparse.Namespace, work: Path) -> dict:
    from attribution.config import FeaturizeConfig, QueryConfig, SamplingConfig
    from attribution.features import encode_dataset, featurize, num_params, select_params
    from attribution.models import load_model
    from attribution.sampling import sample_trajectory
    from attribution.scoring import Scorer

    family, build, what = CONFIGS[name]
    model = load_model(build(work / name))
    data = random_dataset(family, model, args.num_train)
    latents = encode_dataset(data, model)
    cfg = FeaturizeConfig(num_draws=args.num_draws, proj_dim=args.proj_dim)
    t0 = time.perf_counter()
    store = featurize([model], latents, work / f"{name}-store", cfg, chunk_size=args.chunk_size)
    t_feat = time.perf_counter() - t0
    prompt = "blue circle" if family == "dit" else "a red square"
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=args.steps, seed=0, prompt=prompt))
    scorer = Scorer(store, [model], "journey", QueryConfig(num_resamples=args.resamples))
    scorer.score(traj, [0])  # warm-up: projector and kernel solve set up once
    times = []
    for step in range(1, 1 + args.query_repeats):
        t0 = time.perf_counter()
        scorer.score(traj, [step % traj.num_steps])
        times.append(time.perf_counter() - t0)
    return {
        "config": name, "what": what, "params": num_params(select_params(model)), "num_train": args.num_train,
        "num_draws": args.num_draws, "proj_dim": args.proj_dim, "featurize_s": t_feat,
        "featurize_examples_per_s": args.num_train / t_feat, "query_resamples": args.resamples,
        "query_step_s_median": float(np.median(times)), "query_step_s_all": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="which pipelines to time (default: all)")
    ap.add_argument("--num-train", type=int, default=16, help="train examples featurized per configuration")
    ap.add_argument("--num-draws", type=int, default=2, help="(timestep, noise) draws per train example")
    ap.add_argument("--proj-dim", type=int, default=2048, help="sjlt projection dimension d")
    ap.add_argument("--chunk-size", type=int, default=8, help="examples per vmapped gradient pass")
    ap.add_argument("--resamples", type=int, default=20, help="K, the noises of one query step (Eq. 3)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps of the query trajectory")
    ap.add_argument("--query-repeats", type=int, default=3, help="query steps timed (the median is reported)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_families.json", help="where the JSON goes")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            r = bench_config(name, args, Path(tmp))
            rows.append(r)
            print(f"{name}: featurize {r['featurize_examples_per_s']:.2f} examples/s, "
                  f"query step {r['query_step_s_median']:.2f} s", flush=True)
    info = machine_info()
    print(f"\nCPU, torch threads {torch.get_num_threads()}, load average {info.get('loadavg_at_start')}")
    table = print_table(
        [[r["config"], r["what"], f"{r['params']:,}", f"{r['featurize_examples_per_s']:.2f}",
          f"{r['query_step_s_median']:.2f}"] for r in rows],
        ["config", "denoiser", "params", f"featurize ex/s (D={args.num_draws}, d={args.proj_dim})",
         f"query step s (K={args.resamples})"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                    "results": rows, "table": table}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
