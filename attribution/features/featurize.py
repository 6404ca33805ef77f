"""Train features for every checkpoint into a store; resumable and shardable by rank.

For checkpoint m and train example i (Algorithm 1 lines 3-9):

    phi_{m,i} = P_m grad_theta (1/D) sum_d f(theta_m; x_i, t_id, eps_id)

The D draws of example i are a pure function of ``(draw_seed, i)`` (or of
``draw_seed`` alone with ``draw_sharing="common"``: the same draws for every
example) so that any chunking, resumption, sharding or device gives the same features.

f is the output of the models' training objective (:mod:`attribution.models.objective`): the
loss ``||y_t - p_theta(a_t x_i + b_t eps, tau(t))||^2`` with that objective's noising, target
and timestep input (t indexes the sigma grid of flow models), or a D-TRAK norm of p.

Latent models: x_i is the VAE latent of train image i (computed once per VAE, see
:mod:`attribution.features.latents`) and the noises are drawn in latent space.
Text-conditional models: each example is conditioned on the embedding of its
caption (the empty caption, i.e. unconditional, when the dataset has none);
class-conditional models (DiT) on the class named by its image folder's subfolder.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import FeaturizeConfig
from ..data.datasets import ImageDataset, example_class_names
from ..models.base import DiffusionModel
from ..models.conditioning import Conditioning
from .gradients import DrawBatch, GradientTarget, num_params, select_params
from .latents import LatentDataset, dataset_fingerprint, model_space_dataset
from .outputs import get_output
from .projection import Projector, make_projector
from .projection.factorized import LAYOUT_VERSION as FACTORIZED_LAYOUT
from .store import Store, StoreSpec, store_lock

Progress = Callable[[int, int], None]

#: c / T of ``timestep_sampling="log-stratified"`` (strata equal in log(t + c)).
LOG_STRATA_OFFSET = 0.005


def _example_generator(seed: int, index: int | None) -> torch.Generator:
    """The generator of example ``index``'s draws; ``None``: the draws every example shares."""
    key = [int(seed), 7919, int(index)] if index is not None else [int(seed), 7919, 1, 0]
    state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def log_strata(lo: int, hi: int, d: int, num_train_timesteps: int, u: torch.Tensor) -> torch.Tensor:
    """(d,) int64 timesteps, one in each of d strata of [lo, hi) of equal width in log(t + c),
    c = ``LOG_STRATA_OFFSET`` * T; ``u`` (d,) uniform in [0, 1) places each draw in its stratum.

    Why: a loss gradient at timestep t is nearly orthogonal to the same image's gradient a
    few timesteps away when t is small but stays correlated over tens of timesteps when t
    is large, so equal strata in t leave the late sampling steps without a nearby train
    draw (``benchmarks/self_attribution.py``). On the bundled digits an uploaded training
    image ranks itself first at t = 0 when one of its draws is at t <= 4 and mostly not
    beyond; c = T/200 makes the first stratum [0, 4.7) for D = 8.
    """
    c = LOG_STRATA_OFFSET * num_train_timesteps
    edges = torch.linspace(math.log(lo + c), math.log(hi + c), d + 1, dtype=torch.float64)
    logt = edges[:-1] + u.double() * (edges[1:] - edges[:-1])
    return (logt.exp() - c).floor().long().clamp_(lo, hi - 1)


def draw_timesteps_and_noise(
    indices: np.ndarray,
    config: FeaturizeConfig,
    num_train_timesteps: int,
    image_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (timestep, noise) draws of examples ``indices``: ((B, D) int64, (B, D, C, H, W) float32), on CPU.

    Timesteps come from ``config.timestep_range`` (default ``[0, T)``). With
    ``config.draw_sharing == "common"`` every row holds the same draws.
    """
    d = config.num_draws
    lo, hi = config.timestep_range or (0, num_train_timesteps)
    if hi > num_train_timesteps:
        raise ValueError(f"timestep_range {config.timestep_range} exceeds the model's {num_train_timesteps} timesteps")
    sampling = config.effective_timestep_sampling
    ts, noises = [], []
    for i in indices:
        g = _example_generator(config.draw_seed, int(i) if config.draw_sharing == "per-example" else None)
        if sampling == "even":
            grid = torch.arange(lo, hi, max(1, (hi - lo) // d))
            t = grid.repeat(-(-d // len(grid)))[:d]  # a range narrower than d repeats its grid
        elif sampling == "uniform":
            t = torch.randint(lo, hi, (d,), generator=g)
        elif sampling == "log-stratified":
            t = log_strata(lo, hi, d, num_train_timesteps, torch.rand(d, generator=g))
        else:  # stratified: one uniform draw in each of d equal strata
            edges = torch.linspace(lo, hi, d + 1)
            t = (edges[:-1] + torch.rand(d, generator=g) * (edges[1:] - edges[:-1])).long().clamp_(lo, hi - 1)
        ts.append(t)
        noises.append(torch.randn((d, *image_shape), generator=g))
    return torch.stack(ts), torch.stack(noises)


def store_spec(
    models: list[DiffusionModel], dataset: ImageDataset, config: FeaturizeConfig, store_dir: str | Path | None = None
) -> StoreSpec:
    """The spec a store must match for these checkpoints, data and settings.

    Checkpoint paths are recorded relative to ``store_dir`` when given, so a store
    moved together with its models (e.g. a clone of the repo) still finds them;
    matching uses the content hashes only.
    """
    config = config.resolved()
    if any(not m.objective.matches(models[0].objective) for m in models[1:]):
        raise ValueError("the checkpoints have different training objectives or noise schedules; featurize them separately")
    params = select_params(models[0], config.param_filter)
    shape = models[0].image_shape if models[0].is_latent else dataset.image_shape
    return StoreSpec(
        config=config,
        checkpoints=tuple(checkpoint_entry(m, store_dir) for m in models),
        dataset={
            "name": dataset.name,
            "fingerprint": dataset_fingerprint(dataset, models[0]),
            "num_train": len(dataset),
            "image_shape": list(shape),
        },
        num_params=num_params(params),
        projection_layout=FACTORIZED_LAYOUT if config.proj_kind == "factorized" else None,
        objective=models[0].objective.identity,
    )


def checkpoint_entry(model: DiffusionModel, store_dir: str | Path | None) -> dict[str, Any]:
    """A checkpoint's manifest entry: path, content hash and, for pipelines, the hash of each component
    (unet or transformer, vae, text encoders, tokenizers, scheduler), so a refusal can name what differs."""
    entry: dict[str, Any] = {"path": os.path.relpath(model.path, store_dir) if store_dir else str(model.path),
                             "hash": model.checkpoint_hash}
    if model.component_hashes:
        entry["components"] = dict(model.component_hashes)
    return entry


def checkpoint_projector(
    config: FeaturizeConfig, dim_in: int, m: int, device: torch.device | str, params: dict[str, torch.Tensor] | None = None
) -> Projector:
    """The projection P_m of checkpoint m (seed ``proj_seed + m``); ``params``: the selected
    parameters (their shapes define the "factorized" projection)."""
    shapes = {k: tuple(v.shape) for k, v in params.items()} if params is not None else None
    return make_projector(config.proj_kind, dim_in, config.proj_dim, config.proj_seed + m, config.sjlt_nnz, device, shapes)


#: Bytes of per-example gradients held at once by :func:`auto_chunk_size`, and rows (examples x draws) per pass.
CHUNK_GRAD_BYTES = 1 << 30
CHUNK_MAX_ROWS = 512


def auto_chunk_size(num_params: int, num_draws: int, max_examples: int = 64) -> int:
    """Examples per per-example-gradient pass: as many as fit 1 GiB of (chunk, P) float32 gradients and
    512 forward rows (chunk x draws), at most ``max_examples`` (larger passes run the batched
    kernels closer to their peak: 64 examples are ~10 % faster than 32 on the bundled UNet)."""
    by_memory = CHUNK_GRAD_BYTES // (4 * max(num_params, 1))
    return int(max(1, min(max_examples, by_memory, CHUNK_MAX_ROWS // max(num_draws, 1))))


def featurize(
    models: list[DiffusionModel],
    dataset: ImageDataset,
    store_dir: str | Path,
    config: FeaturizeConfig = FeaturizeConfig(),
    *,
    batch_size: int = 64,
    chunk_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    finalize: bool = True,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    latent_cache_dir: str | Path | None = None,
) -> Store:
    """Featurize ``dataset`` for every checkpoint into ``store_dir``; resume if it exists.

    Args:
        dataset: train images at the model's pixel size (for latent models also a
            :class:`~attribution.features.latents.LatentDataset` of the same VAE).
        batch_size: examples written to the store per flush (rows buffered before projecting).
        chunk_size: examples per per-example-gradient pass (memory budget); None: :func:`auto_chunk_size`.
        rank, world_size: shard rows by ``i % world_size == rank`` (torchrun workers).
        finalize: compute the kernels once all rows are done (rank 0 only).
        progress: called with (rows done, rows total) of this shard.
        latent_cache_dir: latent models: where the train latents are cached as .npy
            (None: computed in memory for this call).

    Returns:
        The open store.
    """
    check_dataset(models[0], dataset)
    spec = store_spec(models, dataset, config, store_dir)
    if rank != 0:  # the other ranks of a distributed run share rank 0's lock
        return _featurize_locked(models, dataset, spec, Store.open(store_dir, spec, writable=True), config,
                                 batch_size, chunk_size, rank, world_size, finalize, progress, log, latent_cache_dir)
    with store_lock(store_dir):
        store = Store.create_or_open(store_dir, spec)
        return _featurize_locked(models, dataset, spec, store, config, batch_size, chunk_size, rank, world_size,
                                 finalize, progress, log, latent_cache_dir)


def _featurize_locked(
    models: list[DiffusionModel],
    dataset: ImageDataset,
    spec: StoreSpec,
    store: Store,
    config: FeaturizeConfig,
    batch_size: int,
    chunk_size: int | None,
    rank: int,
    world_size: int,
    finalize: bool,
    progress: Progress | None,
    log: Callable[[str], None],
    latent_cache_dir: str | Path | None,
) -> Store:
    """The body of :func:`featurize` once the store is open (and, on rank 0, locked)."""
    store_dir = store.root
    output = get_output(config.output)
    for m in range(len(models)):
        recheck_done_rows(store, m, rank, world_size, log)
    pending = [store.pending(m, rank, world_size) for m in range(len(models))]
    total = sum(len(p) for p in pending)
    if total == 0:
        log(f"found existing features for all {len(dataset)} examples in {store_dir}, skipping")
    done_rows = 0
    t0 = time.perf_counter()
    spaces: dict[str, ImageDataset] = {}  # model-space datasets, one per VAE
    for m, model in enumerate(models):
        if len(pending[m]) == 0:
            continue
        key = getattr(model, "vae_hash", "")
        if key not in spaces:
            spaces[key] = model_space_dataset(dataset, model, latent_cache_dir)
        data = spaces[key]
        if model.is_conditional and not model.is_class_conditional and dataset.captions is None:
            log("the dataset has no captions: train examples are conditioned on the empty prompt")
        params = select_params(model, config.param_filter)
        projector = checkpoint_projector(config, spec.num_params, m, model.device, params)
        target = GradientTarget(model, params, output)
        chunk = chunk_size or auto_chunk_size(spec.num_params, config.num_draws)
        skipped = len(dataset) // world_size - len(pending[m])
        if skipped > 0:
            log(f"checkpoint {m}: found {skipped} finished rows, resuming")
        for start in range(0, len(pending[m]), batch_size):
            idx = pending[m][start : start + batch_size]
            rows = example_rows(model, projector, target, data.images(idx), dataset, idx, config, chunk)
            store.write_rows(m, idx, rows)
            done_rows += len(idx)
            if progress:
                progress(done_rows, total)
    if total:
        log(f"featurized {total} rows in {time.perf_counter() - t0:.1f} s")
    if finalize and rank == 0 and store.is_complete():
        store.finalize()
    return store


def example_rows(
    model: DiffusionModel,
    projector: Projector,
    target: GradientTarget,
    x0: torch.Tensor,
    dataset: ImageDataset,
    indices: np.ndarray,
    config: FeaturizeConfig,
    chunk: int,
) -> np.ndarray:
    """(B, d) float32 features of train examples ``indices`` (x0: their (B, C, H, W) images in model space).

    The one computation of a row: featurize writes it, :mod:`attribution.features.verify`
    recomputes a few to check a store; the draws come from :func:`draw_timesteps_and_noise`.
    """
    ts, noises = draw_timesteps_and_noise(indices, config, model.num_train_timesteps, model.image_shape)
    cond = example_conditioning(model, dataset, indices)
    return projector.example_features(target, DrawBatch(x0, ts, noises, cond=cond), chunk).cpu().numpy()


def recheck_done_rows(store: Store, m: int, rank: int, world_size: int, log: Callable[[str], None]) -> int:
    """Clear the done flags of this shard's rows that fail their checksum, so they are computed again.

    Such rows were edited on disk or marked done without being written (e.g. a
    done file copied from elsewhere). Returns how many were cleared.
    """
    if not store.has_checksums or not np.asarray(store.done(m)).any():
        return 0
    bad = store.verify_all(m)
    bad = bad[bad % world_size == rank]
    if len(bad):
        log(f"checkpoint {m}: {len(bad)} row(s) marked done fail their checksum (e.g. row {int(bad[0])}); recomputing them")
        store.unmark(m, bad)
    return len(bad)


def check_dataset(model: DiffusionModel, dataset: ImageDataset) -> None:
    """Refuse a dataset whose images do not fit ``model`` (pixel size, or latents of another VAE)."""
    if isinstance(dataset, LatentDataset):
        if not model.is_latent or dataset.vae_hash != model.vae_hash:  # type: ignore[attr-defined]
            raise ValueError(f"the dataset's latents were made by another VAE than that of {model.path}")
        return
    want = model.pixel_shape
    if tuple(dataset.image_shape) != tuple(want):
        hint = " (load the images at model.pixel_shape; latents are computed by featurize)" if model.is_latent else ""
        raise ValueError(f"dataset images are {dataset.image_shape} but the model takes {want}{hint}")


def example_prompts(model: DiffusionModel, dataset: ImageDataset, indices: np.ndarray) -> list[str]:
    """What train examples ``indices`` are conditioned on: their captions (``""`` without any), or for a
    class-conditional model the names of their image folder's subfolders (:func:`~attribution.data.datasets.example_class_names`)."""
    if model.is_class_conditional:
        return example_class_names(dataset, indices)
    caps = dataset.captions
    return [caps[int(i)] if caps is not None else "" for i in indices]


def example_conditioning(model: DiffusionModel, dataset: ImageDataset, indices: np.ndarray) -> Conditioning | None:
    """Conditioning of train examples ``indices`` (B examples) for conditional models, else None."""
    if not model.is_conditional:
        return None
    return model.encode_prompts(example_prompts(model, dataset, indices))


def caption_embeddings(model: DiffusionModel, dataset: ImageDataset, indices: np.ndarray) -> torch.Tensor | None:
    """(B, L, D) caption embeddings of examples ``indices``, for callers that take a bare text tensor
    (EK-FAC); a model conditioned on more than a text sequence (SDXL, DiT) is refused."""
    cond = example_conditioning(model, dataset, indices)
    if cond is None:
        return None
    if set(cond.present()) != {"text"}:
        raise ValueError(f"{model.path} is conditioned on {', '.join(cond.present())}; this method supports "
                         f"text-sequence conditioning (Stable Diffusion 1.x/2.x) only")
    return cond.text
