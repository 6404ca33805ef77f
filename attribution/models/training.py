"""Train a pixel-space diffusion model (UNet2DModel) on a dataset or a subset of it.

The objective is epsilon prediction on a DDPM schedule by default; ``prediction`` selects
v or sample prediction (a ``DDPMScheduler`` with that ``prediction_type``) or flow matching
(a ``FlowMatchEulerDiscreteScheduler``), each trained with its own loss
(:mod:`attribution.models.objective`), so tests can build tiny models of every kind.

Used for the bundled ensemble and for LDS / counterfactual retraining, so it is
deterministic from its seed and resumable: each epoch draws its shuffling,
timesteps and noise from a generator seeded by ``(seed, epoch)``, and the full
state (weights, EMA weights, Adam moments) is saved in safetensors after every
epoch under ``<out>.partial/``. A killed run restarts at the last finished epoch
and ends with the same weights as an uninterrupted one. The result (the EMA
weights) is written in ``DDPMPipeline`` layout to a temporary directory and
renamed to ``out``, so ``out`` is either absent or complete; a failed write (a
full disk) removes the temporary files and keeps the saved state. Resuming with
other settings or data is refused (the settings and a hash of the images are
kept in ``train_config.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from ..config import TrainConfig
from ..tools.files import atomic_write_bytes
from .objective import DiffusionObjective, PredictionType, make_training_scheduler

Progress = Callable[[int, int], None]


def make_unet(image_shape: tuple[int, int, int], config: TrainConfig) -> UNet2DModel:
    """An attention-free UNet2DModel sized by ``config`` for (C, H, W) images."""
    c, h, _ = image_shape
    n = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=h,
        in_channels=c,
        out_channels=c,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=min(8, min(config.block_out_channels)),
        add_attention=False,
    )


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), 31337, int(epoch)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _save_state(partial: Path, epoch: int, unet, ema, opt: torch.optim.Adam) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).cpu().contiguous()
    tmp = partial / f".state.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch)})
        os.replace(tmp, partial / "state.safetensors")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_state(partial: Path, unet, ema, opt: torch.optim.Adam) -> int:
    """Restore a saved state; returns the number of finished epochs (0 if none)."""
    path = partial / "state.safetensors"
    if not path.exists():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        epoch = int(f.metadata()["epoch"])
    tensors = load_file(str(path), device=str(next(unet.parameters()).device))
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)
    return epoch


def _check_partial_settings(partial: Path, settings: str) -> None:
    """Refuse to resume a partial run that was started with other settings or data."""
    path = partial / "train_config.json"
    if not (partial / "state.safetensors").exists() or not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except json.JSONDecodeError:
        before = None
    if before != json.loads(settings):
        raise FileExistsError(
            f"{partial} holds an interrupted run with other settings or data; rerun it with the same "
            f"arguments to resume, or delete {partial} to start over"
        )


def train_ddpm(
    images: torch.Tensor,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    subset: np.ndarray | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    coupled: bool = False,
    device: str | torch.device = "cpu",
    prediction: str = "epsilon",
    shift: float = 1.0,
) -> Path:
    """Train a diffusion model on ``images`` (or the rows where ``subset`` is True) and save it.

    Args:
        images: (N, C, H, W) float32 in [-1, 1].
        out_dir: destination (DDPMPipeline layout). If it exists, trained with the same
            settings and data, training is skipped; with other ones, FileExistsError.
        subset: optional (N,) bool mask of the training examples to use.
        progress: called with (steps done, total steps).
        coupled: with ``subset``, replay the full-data run of the same seed (its shuffling,
            timesteps, noises and number of steps) and drop the rows outside the subset
            from each minibatch, instead of a fresh run over the subset. Subset models
            of one seed then differ only through their data, not through the random
            stream (much less retraining noise in counterfactual measurements).
        device: where the UNet trains. The random draws (shuffling, timesteps, noises) are
            made on the CPU from the same generators whatever the device, so a CUDA run
            follows the same stream as a CPU run and differs only by float rounding; the
            saved state is on the CPU, so a run can resume on another device.
        prediction: the training objective, a :class:`~attribution.models.objective.PredictionType` value
            (``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow"``).
        shift: flow matching: the sigma shift of its ``FlowMatchEulerDiscreteScheduler``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    keep = None
    if subset is not None:
        subset = np.asarray(subset, dtype=bool)
        if subset.shape != (len(images),):
            raise ValueError(f"subset mask has shape {subset.shape}, expected ({len(images)},)")
        if coupled:
            keep = torch.from_numpy(subset)
        else:
            images = images[torch.from_numpy(subset)]
    n = len(images)
    if n == 0 or (keep is not None and not keep.any()):
        raise ValueError("no training images")
    partial = out_dir.with_name(out_dir.name + ".partial")
    data_hash = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    record = {**asdict(config), "num_images": n, "data_sha256": data_hash}
    # recorded only when set, so models trained before the options existed still match
    if keep is not None:
        record.update(coupled_subset=np.flatnonzero(subset).tolist(), num_images=int(keep.sum()))
    kind = PredictionType(prediction)
    if kind is not PredictionType.EPSILON:
        record.update(prediction=kind.value, **({"shift": shift} if kind.is_flow else {}))
    settings = json.dumps(record, indent=2)
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    if out_dir.exists():
        done = out_dir / "train_config.json"
        if not done.exists() or json.loads(done.read_text()) != json.loads(settings):
            raise FileExistsError(f"{out_dir} exists already (trained with other settings); choose another --out or delete it")
        shutil.rmtree(partial, ignore_errors=True)  # killed after the final rename
        log(f"found {out_dir} trained with these settings, skipping")
        return out_dir
    _check_partial_settings(partial, settings)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(partial / "train_config.json", settings.encode())

    device = torch.device(device)
    torch.manual_seed(config.seed)
    unet = make_unet(tuple(images.shape[1:]), config).to(device)
    sched = make_training_scheduler(kind, config.num_train_timesteps, shift)
    objective = DiffusionObjective.from_scheduler(sched)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.Adam(unet.parameters(), lr=config.lr)
    start_epoch = _load_state(partial, unet, ema, opt)
    if start_epoch:
        log(f"resuming {out_dir} after epoch {start_epoch}")
    images_dev = images.to(device)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    t0 = time.perf_counter()
    unet.train()
    for epoch in range(start_epoch, config.epochs):
        g = _epoch_generator(config.seed, epoch)
        perm = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            idx = perm[b * config.batch_size : (b + 1) * config.batch_size]
            t = objective.sample_timesteps(len(idx), g)
            eps = torch.randn((len(idx), *images.shape[1:]), generator=g)
            if keep is not None:  # the full run's draws, restricted to the subset's rows
                rows = keep[idx]
                if not rows.any():
                    continue
                idx, t, eps = idx[rows], t[rows], eps[rows]
            x0, t, eps = images_dev[idx.to(device)], t.to(device), eps.to(device)
            a, b = objective.coefficients(t)
            x_t = objective.noised(x0, eps, a, b)
            loss = torch.nn.functional.mse_loss(unet(x_t, objective.model_timesteps(t)).sample,
                                                objective.target(x0, eps, a, b))
            lr = config.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1 - config.ema_decay)
                    else:
                        ema[k].copy_(v)
            if progress:
                progress(step + 1, total)
        _save_state(partial, epoch + 1, unet, ema, opt)
        log(f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")

    unet.load_state_dict(ema)
    unet.eval().cpu()
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _save_pipeline(tmp, unet, sched, partial)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(partial)
    return out_dir


def _save_pipeline(tmp: Path, unet: UNet2DModel, sched, partial: Path) -> None:
    """Write the trained model in DDPMPipeline layout under ``tmp``."""
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    sched.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": __import__("diffusers").__version__,
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", type(sched).__name__],
            },
            indent=2,
        )
    )
    shutil.copy(partial / "train_config.json", tmp / "train_config.json")
