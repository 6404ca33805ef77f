"""Sample quality of the bundled ensemble: share of samples the digit classifier labels with confidence >= 0.9.

Usage: python benchmarks/sample_quality.py [--num-samples 100] [--steps 50] [--seed 0] [--models DIR ...]
       [--out runs/sample_quality.json]
Prints a table (one row per checkpoint) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attribution.models import load_classifier, load_models
from attribution.workspace import default_bundle


@torch.no_grad()
def sample_batch(model, num: int, steps: int, seed: int) -> torch.Tensor:
    """num DDIM samples (num, C, H, W) from seed (batched; same sampler as the app)."""
    from attribution.config import SamplingConfig
    from attribution.sampling import make_scheduler

    sched = make_scheduler(model, SamplingConfig(num_inference_steps=steps))
    x = torch.randn((num, *model.image_shape), generator=torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        x = sched.step(model.unet(x, t.expand(num)).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-samples", type=int, default=100, help="samples per checkpoint")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of each sample")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noises (the same for every checkpoint)")
    ap.add_argument("--models", type=Path, nargs="+", help="model directories (default: the bundled ensemble)")
    ap.add_argument("--out", type=Path, default=Path("runs/sample_quality.json"), help="JSON output file")
    args = ap.parse_args()
    bundle = default_bundle()
    clf = load_classifier(bundle.classifier_dir)
    rows = []
    dirs = list(args.models or bundle.model_dirs)
    for path, model in zip(dirs, load_models(dirs)):
        t0 = time.perf_counter()
        p = clf.predict_proba(sample_batch(model, args.num_samples, args.steps, seed=args.seed))
        conf = p.max(1).values
        rows.append({
            "checkpoint": str(path),
            "share_confident_0.9": float((conf >= 0.9).float().mean()),
            "mean_confidence": float(conf.mean()),
            "class_counts": torch.bincount(p.argmax(1), minlength=10).tolist(),
            "seconds": round(time.perf_counter() - t0, 1),
        })
    print(f"{'checkpoint':<40} {'conf>=0.9':>9} {'mean conf':>9}  class counts")
    for r in rows:
        print(f"{r['checkpoint']:<40} {r['share_confident_0.9']:>9.2f} {r['mean_confidence']:>9.3f}  {r['class_counts']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
