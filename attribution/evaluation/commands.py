"""``attribution bench`` subcommands: prepare, retrain, truth, score, counterfactual, report, all.

Each stage is resumable and skips what is on disk, so ``attribution bench all --work DIR``
can be rerun after an interruption.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from .setup import BenchConfig, load_prepared, prepare


def _config_from_args(args: argparse.Namespace) -> BenchConfig:
    base = BenchConfig()
    return BenchConfig(
        num_train=args.num_train,
        image_size=args.image_size,
        num_subsets=args.num_subsets,
        checkpoint_seeds=tuple(range(args.num_checkpoints)),
        train=__import__("dataclasses").replace(base.train, epochs=args.epochs),
    )


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def cmd_prepare(args: argparse.Namespace) -> None:
    paths, dataset, subsets = prepare(args.work, _config_from_args(args))
    print(f"benchmark under {paths.root}: {len(dataset)} training images {dataset.image_shape}, {len(subsets)} subsets")


def cmd_retrain(args: argparse.Namespace) -> None:
    from .retrain import lds_jobs, train_jobs

    _threads(args)
    config, paths, dataset, subsets = load_prepared(args.work)
    t0 = time.perf_counter()
    spent = train_jobs(lds_jobs(paths, config, subsets, args.limit), dataset, config.train, log=tqdm.write)
    print(f"retraining done: {spent:.0f} s training, {time.perf_counter() - t0:.0f} s wall")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``attribution bench ...`` on the main parser's subparsers."""
    b = sub.add_parser("bench", help="counterfactual benchmark: LDS per step, retrain without top-k, report")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--work", type=Path, default=Path("benchmarks/work"), help="benchmark work directory")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        return p

    base = BenchConfig()
    p = common(bsub.add_parser("prepare", help="write the training set and subset masks"))
    p.add_argument("--num-train", type=int, default=base.num_train)
    p.add_argument("--image-size", type=int, default=base.image_size)
    p.add_argument("--num-subsets", type=int, default=base.num_subsets)
    p.add_argument("--num-checkpoints", type=int, default=len(base.checkpoint_seeds))
    p.add_argument("--epochs", type=int, default=base.train.epochs)
    p.set_defaults(func=cmd_prepare)

    r = common(bsub.add_parser("retrain", help="train full-data checkpoints and subset models (resumable)"))
    r.add_argument("--limit", type=int, help="train only the first LIMIT models of the job list")
    r.set_defaults(func=cmd_retrain)
