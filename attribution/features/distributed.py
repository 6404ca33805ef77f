"""Featurize with several processes (torchrun): one shard of rows per rank, one shared store.

Protocol (every rank runs :func:`featurize_distributed` with the same arguments):

1. rank 0 creates the store (``Store.create_or_open``), or checks that an existing
   one matches; its outcome is broadcast, so a mismatch stops every rank with the
   same message instead of leaving the others waiting;
2. every rank featurizes its shard, rows ``i % world_size == rank``
   (:func:`attribution.features.featurize.featurize` with ``finalize=False``); a shard that
   was interrupted resumes at its first row not marked done;
3. the ranks report to rank 0 (a gather: rank 0 waits for the slowest shard);
4. rank 0 reopens the store, checks that every row is done and computes the
   kernels (``Store.finalize``). The other ranks return as soon as they reported.

Process groups: gloo on the CPU, nccl on CUDA (one GPU per local rank); the
rendezvous comes from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Several nodes need a shared
filesystem for the store (see benchmarks/README.md for the commands).

Collectives wait up to ``ATTRIBUTION_DIST_TIMEOUT_S`` seconds (default 24 h): rank 0
waits at step 3 for the slowest shard. torchrun stops the whole job when one rank
dies, so a long timeout never leaves processes hanging.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..config import FeaturizeConfig
from ..data.datasets import ImageDataset
from ..models.base import DiffusionModel
from .featurize import featurize, store_spec
from .store import Store, StoreError

Progress = Callable[[int, int], None]
DEFAULT_TIMEOUT_S = 24 * 3600


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def local_device(device: str | torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for CUDA, the CPU otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", env_world()[2])
    return device


def init_from_env(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world_size).

    Uses nccl for CUDA devices (and makes ``cuda:LOCAL_RANK`` the current device),
    gloo otherwise. Outside torchrun (no ``WORLD_SIZE``) it returns (0, 1) without a group.

    Raises:
        RuntimeError: torch.distributed is unavailable, or the environment is incomplete.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"--distributed needs torchrun's environment; {', '.join(missing)} not set")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    device = local_device(device)
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    timeout = datetime.timedelta(seconds=float(os.environ.get("ATTRIBUTION_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _broadcast_from_0(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_to_0(obj: Any, rank: int, world_size: int) -> list[Any] | None:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def featurize_distributed(
    models: list[DiffusionModel],
    dataset: ImageDataset,
    store_dir: str | Path,
    config: FeaturizeConfig = FeaturizeConfig(),
    *,
    rank: int,
    world_size: int,
    batch_size: int = 64,
    chunk_size: int | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    finalize_progress: Progress | None = None,
    latent_cache_dir: str | Path | None = None,
) -> Store:
    """Featurize this rank's shard of ``dataset`` into the shared store (protocol in the module doc).

    Returns:
        The store (finalized on rank 0; on other ranks their view after their shard).

    Raises:
        StoreError: the store does not match (every rank), some shard failed or left rows
            unfinished (rank 0), or this rank's own featurize failed.
    """
    store_dir = Path(store_dir)
    spec = store_spec(models, dataset, config, store_dir)
    # 1. rank 0 creates (or checks) the store; the others wait for its outcome
    error = None
    if rank == 0:
        try:
            Store.create_or_open(store_dir, spec)
        except (StoreError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
    error = _broadcast_from_0(error)
    if error is not None:
        raise StoreError(f"rank 0 could not create or open the store: {error}")
    # 2. every rank featurizes its shard
    status: str | None = None
    store = None
    try:
        store = featurize(
            models, dataset, store_dir, config, batch_size=batch_size, chunk_size=chunk_size, rank=rank,
            world_size=world_size, finalize=False, progress=progress, log=log, latent_cache_dir=latent_cache_dir,
        )
    except Exception as e:  # noqa: BLE001 - reported to rank 0, then re-raised
        status = f"{type(e).__name__}: {e}"
        _gather_to_0(status, rank, world_size)
        raise
    # 3. report to rank 0
    statuses = _gather_to_0(status, rank, world_size)
    if rank != 0:
        log(f"rank {rank}: shard done")
        return store
    failed = [f"rank {r}: {s}" for r, s in enumerate(statuses or []) if s is not None]
    if failed:
        raise StoreError("featurize failed on " + "; ".join(failed) + ". Rerun the same command to resume.")
    # 4. rank 0 finalizes, reading the done flags afresh from disk
    store = Store.open(store_dir, spec, writable=True)
    if not store.is_complete():
        left = {m: int(len(store.pending(m))) for m in range(store.num_checkpoints)}
        raise StoreError(f"store {store_dir} still has unfinished rows after every shard reported {left}; rerun to resume")
    store.finalize(progress=finalize_progress)
    log(f"finalized {store_dir} ({world_size} shards)")
    return store
