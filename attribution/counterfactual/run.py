"""Run one counterfactual: coupled retraining without the removed set, regeneration, metrics, result on disk.

Layout under the cache directory (``$ATTRIBUTION_CACHE/counterfactuals`` in the app)::

    <key>/                 the result (complete or absent: written as a temporary directory, then renamed)
        result.json        the request, the metrics, class probabilities, f_t before and after
        original.png       the original sample;  original_x0.png  its x0_hat at the step
        sample.png         the regenerated sample;  sample_x0.png  its x0_hat at the step
    work/<train key>/      while it runs: request.json and the retraining's per-epoch state
                           (``model.partial/``); removed once the result is written

A killed run (server restart, ``JobCancelled`` at shutdown) keeps ``work/<train key>`` and resumes at
its last finished epoch when started again, ending with the same result as an uninterrupted
run; a cancelled one (``discard_work``) removes it. The retrained weights are deleted as soon
as the result is written: a result is the images and a small JSON.

The metrics are those of the offline benchmark (:func:`attribution.evaluation.counterfactual.sample_change`
and :func:`~attribution.evaluation.counterfactual.fixed_step_output`): pixel l2 of the final
samples and of x0_hat at the step, classifier-embedding distance, class change, and the
measured change of f_t at the original trajectory's fixed x0_hat and noises, beside the
predicted one (the sum of the removed scores).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..config import SamplingConfig
from ..data.datasets import model_to_uint8
from ..evaluation.counterfactual import fixed_step_output, sample_change
from ..models.base import DiffusionModel
from ..models.load import load_model
from ..models.training import train_ddpm
from ..sampling.trajectory import Trajectory, sample_trajectory
from ..tools.files import atomic_write_bytes
from .request import CounterfactualRequest

__all__ = ["IMAGES", "CounterfactualResult", "discard_work", "find_result", "interrupted", "load_result", "retrain",
           "run_counterfactual", "write_result"]

Progress = Callable[[int, int], None]
IMAGES = ("original", "original_x0", "sample", "sample_x0")


@dataclass(frozen=True)
class CounterfactualResult:
    """A finished counterfactual read from disk.

    Attributes:
        path: its directory.
        meta: ``result.json`` (request, metrics, probabilities).
        images: name (:data:`IMAGES`) -> uint8 (H, W, C).
    """

    path: Path
    meta: dict
    images: dict[str, np.ndarray]

    @property
    def request(self) -> CounterfactualRequest:
        return CounterfactualRequest.from_dict(self.meta["request"])


def result_dir(cache: Path, request: CounterfactualRequest) -> Path:
    return Path(cache) / request.key()


def work_dir(cache: Path, request: CounterfactualRequest) -> Path:
    """The retraining's directory: named by :meth:`CounterfactualRequest.train_key` (shared by the samples of one
    removed set)."""
    return Path(cache) / "work" / request.train_key()


_TRAINING: dict[str, threading.Lock] = {}  # one retraining per work directory at a time in this process
_TRAINING_LOCK = threading.Lock()


def _training_lock(work: Path) -> threading.Lock:
    with _TRAINING_LOCK:
        return _TRAINING.setdefault(str(work), threading.Lock())


def find_result(cache: str | Path, request: CounterfactualRequest) -> CounterfactualResult | None:
    """The result of ``request`` if it is on disk (a directory without ``result.json`` is never one)."""
    return load_result(result_dir(Path(cache), request))


def load_result(path: str | Path) -> CounterfactualResult | None:
    path = Path(path)
    if not (path / "result.json").exists():
        return None
    images = {name: np.asarray(Image.open(path / f"{name}.png")) for name in IMAGES if (path / f"{name}.png").exists()}
    images = {k: v[..., None] if v.ndim == 2 else v for k, v in images.items()}
    return CounterfactualResult(path, json.loads((path / "result.json").read_text()), images)


def interrupted(cache: str | Path, request: CounterfactualRequest) -> int | None:
    """Finished epochs of an interrupted run of ``request`` (0: started, none finished), None if there is none."""
    work = work_dir(Path(cache), request)
    if not (work / "request.json").exists():
        return None
    state = work / "model.partial" / "state.safetensors"
    if not state.exists():
        return 0
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:
        return int(f.metadata()["epoch"])


def discard_work(cache: str | Path, request: CounterfactualRequest) -> None:
    """Remove an interrupted or cancelled run's files (never a finished result)."""
    shutil.rmtree(work_dir(Path(cache), request), ignore_errors=True)


def retrain(request: CounterfactualRequest, images: torch.Tensor, cache: str | Path,
            progress: Progress | None = None, log: Callable[[str], None] = lambda s: None) -> Path:
    """Replay the checkpoint's training run without ``request.removed`` (resumes per epoch); the model's directory.

    Args:
        images: (N, C, H, W) the full training set in [-1, 1], in the checkpoint's order.
    """
    work = work_dir(Path(cache), request)
    keep = np.ones(len(images), dtype=bool)
    keep[list(request.removed)] = False
    with _training_lock(work):
        work.mkdir(parents=True, exist_ok=True)
        with open(work / ".lock", "w") as lock:  # and one across processes (app and CLI)
            fcntl.flock(lock, fcntl.LOCK_EX)
            work.mkdir(parents=True, exist_ok=True)  # removed by a cancel while this one waited
            atomic_write_bytes(work / "request.json", json.dumps(request.to_dict(), indent=1).encode())
            return train_ddpm(images, work / "model", request.train, subset=keep, coupled=True, progress=progress,
                              log=log, device=request.device)


def _regenerate(model: DiffusionModel, original: Trajectory) -> Trajectory:
    """The trajectory ``model`` makes from ``original``'s noise: its seed (generated) or its inverted x_T (upload)."""
    if original.source == "generated" and original.config is not None and original.config.seed is not None:
        return sample_trajectory(model, original.config)
    cfg = SamplingConfig(num_inference_steps=len(original.timesteps), scheduler="ddim", eta=0.0)
    return sample_trajectory(model, cfg, initial=original.x_t[0])


def _png(image: torch.Tensor) -> bytes:
    """PNG bytes of one (C, H, W) image in [-1, 1]."""
    arr = model_to_uint8(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def write_result(cache: str | Path, request: CounterfactualRequest, meta: dict, images: dict[str, torch.Tensor]) -> Path:
    """Write ``result.json`` and the PNGs into a temporary directory, then rename it to the result's (atomic)."""
    final = result_dir(Path(cache), request)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, image in images.items():
            (tmp / f"{name}.png").write_bytes(_png(image))
        (tmp / "result.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # an identical result written meanwhile (same key): keep it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@torch.no_grad()
def measure(request: CounterfactualRequest, original_model: DiffusionModel, retrained: DiffusionModel,
            original: Trajectory, classifier=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metrics, images) of ``retrained`` against ``original_model``'s trajectory ``original``."""
    new = _regenerate(retrained, original)
    s = request.step
    f_old = fixed_step_output(original_model, original, s, request.num_resamples, request.noise_seed)
    f_new = fixed_step_output(retrained, original, s, request.num_resamples, request.noise_seed)
    metrics = {"pixel_l2": float((new.sample - original.sample).norm()),
               "pixel_l2_x0": float((new.x0_hat[s] - original.x0_hat[s]).norm()),
               "f_original": f_old, "f_new": f_new, "measured_delta_f": f_new - f_old,
               "predicted_delta_f": request.predicted_delta_f}
    if classifier is not None:
        dev = next(classifier.parameters()).device
        pair = torch.stack([original.sample, new.sample]).clamp(-1, 1).to(dev)
        probs = classifier.predict_proba(pair).cpu()
        metrics.update(sample_change(pair[0].cpu(), pair[1].cpu(), lambda x: classifier.embed(x.to(dev)).cpu(),
                                     lambda x: classifier.predict_proba(x.to(dev)).argmax(-1).cpu()))
        metrics.update(probs_original=probs[0].tolist(), probs_new=probs[1].tolist(),
                       class_original=int(probs[0].argmax()), class_new=int(probs[1].argmax()))
    images = {"original": original.sample, "original_x0": original.x0_hat[s], "sample": new.sample,
              "sample_x0": new.x0_hat[s]}
    return metrics, images


def run_counterfactual(
    request: CounterfactualRequest,
    checkpoint_dir: str | Path,
    images: torch.Tensor,
    original: Trajectory,
    cache: str | Path,
    classifier=None,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda s: None,
    keep_model: bool = False,
) -> CounterfactualResult:
    """The result of ``request``: from the cache, else retrain (resuming), regenerate, measure and write it.

    Args:
        checkpoint_dir: the generating checkpoint (loaded afresh: the caller's modules are never used).
        images: (N, C, H, W) its training set in [-1, 1].
        original: the sample's trajectory under the checkpoint (generated from a seed or inverted).
        classifier: optional :class:`~attribution.models.classifier.DigitClassifier` (class probabilities,
            embedding distance, class change).
        progress: (done, total) over the training steps and one last unit for the regeneration.
        keep_model: keep the retrained model after writing the result (more samples of the same removed set
            follow, as the showcase's shared random control); by default it is deleted.
    """
    cache = Path(cache)
    found = find_result(cache, request)
    if found is not None:
        return found
    t0 = time.perf_counter()
    total = [1]

    def train_progress(done: int, n: int) -> None:
        total[0] = n + 1
        if progress:
            progress(done, n + 1)

    model_dir = retrain(request, images, cache, train_progress, log)
    train_s = time.perf_counter() - t0
    retrained = load_model(model_dir, request.device)
    original_model = load_model(checkpoint_dir, request.device)
    metrics, imgs = measure(request, original_model, retrained, original, classifier)
    seed = original.config.seed if original.source == "generated" and original.config is not None else None
    meta = {"request": request.to_dict(), "metrics": metrics, "train_seconds": round(train_s, 1),
            "sample": {"source": original.source, "seed": seed, "num_steps": len(original.timesteps)}}
    write_result(cache, request, meta, imgs)
    if not keep_model:
        discard_work(cache, request)  # the retrained weights are needed no more
    if progress:
        progress(total[0], total[0])
    return find_result(cache, request)
