"""A workspace: one model ensemble, its training set, stores and classifier, with cached answers.

This is the one object a front end (the Streamlit app, a notebook) talks to. It
loads everything once, answers "trajectory for seed s", "scores of step s for
method m (and mask M)", "likelihood curves", keeps per-sample results in a
bounded, thread-safe LRU shared by all callers, and can fill the scores of the
remaining steps in a background thread while the caller shows the first one.
It does no drawing and imports no UI library.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .baselines import BASELINES, SimilarityBaseline
from .config import FeaturizeConfig, QueryConfig, SamplingConfig
from .data import ArrayDataset, decode_image, load_dataset, model_to_uint8
from .featurize import featurize
from .likelihood import LikelihoodCurves, label_curves, likelihood_curves
from .models import DiffusionModel, load_models, resolve_device
from .outputs import METHODS, get_method
from .paths import resolve_within
from .scoring import Scorer, prepare_mask
from .store import Store, StoreError
from .trajectory import Trajectory, invert_image, sample_trajectory

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = Path(os.environ.get("ATTRIBUTION_ASSETS", REPO_ROOT / "assets"))
CACHE_DIR = Path(os.environ.get("ATTRIBUTION_CACHE", Path.home() / ".cache" / "attribution"))

Progress = Callable[[int, int], None]


class LRU:
    """A thread-safe LRU mapping with a maximum number of entries."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_items:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


@dataclass(frozen=True)
class Bundle:
    """Where a workspace's pieces live.

    Attributes:
        model_dirs: the ensemble; the first model generates samples.
        data: dataset spec for :func:`attribution.data.load_dataset`.
        stores: train-output name -> store directory (``"loss"`` serves journey-TRAK,
            TracIn and ReTrac; ``"square"`` etc. the D-TRAK variants).
        classifier_dir: digit-style classifier for curves and the embedding baseline.
        featurize: settings used when a missing store is built.
        lora_dirs: trained LoRA weights loaded into the models (one, or one per model;
            see :func:`attribution.latent_models.load_lora`).
        clip_dir: a local CLIP model for text-label curves (and the embedding baseline
            when there is no classifier).
        roots: directories the workspace may write in (stores it builds, cached
            latents); empty: no restriction (library use). The app's bundles set them.
    """

    name: str
    model_dirs: tuple[Path, ...]
    data: str
    stores: dict[str, Path]
    classifier_dir: Path | None = None
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    lora_dirs: tuple[Path, ...] = ()
    clip_dir: Path | None = None
    roots: tuple[Path, ...] = ()


def default_bundle() -> Bundle:
    """The bundled digits ensemble (see ``assets/README`` and ``attribution build-assets``)."""
    cfg = FeaturizeConfig()
    return Bundle(
        name="Bundled MNIST digits (3 tiny DDPMs)",
        model_dirs=tuple(ASSETS_DIR / "ensemble" / f"ddpm-seed{s}" for s in range(3)),
        data="digits",
        stores={
            "loss": ASSETS_DIR / "store" / "journey",
            **{o: CACHE_DIR / "stores" / f"digits-{o}" for o in ("square", "l1", "l2", "mean")},
        },
        classifier_dir=ASSETS_DIR / "classifier",
        featurize=cfg,
        roots=(ASSETS_DIR, CACHE_DIR),
    )


DTRAK_STORE_OUTPUTS = ("square", "l1", "l2", "mean")


def custom_bundle(
    model_dirs: Sequence[str | Path],
    data: str | Path,
    store: str | Path,
    lora_dirs: Sequence[str | Path] = (),
    clip_dir: str | Path | None = None,
    name: str | None = None,
) -> Bundle:
    """A bundle of a user's own models, training data and store directory.

    The journey store is ``store``; the D-TRAK stores go beside it (``<store>-square``, ...).
    Settings for stores built later are read from ``store``'s manifest when it exists, else
    the defaults, differentiating only the adapter (``re:lora_``) when LoRA weights are given.
    """
    import json

    store = Path(store)
    manifest = store / "manifest.json"
    if manifest.exists():
        cfg = FeaturizeConfig.from_dict(json.loads(manifest.read_text())["settings"])
    else:
        cfg = FeaturizeConfig(param_filter=("re:lora_",) if lora_dirs else None)
    return Bundle(
        name=name or f"Your model {Path(model_dirs[0]).name}/ on {Path(data).name}/",
        model_dirs=tuple(Path(d) for d in model_dirs),
        data=str(data),
        stores={"loss": store, **{o: store.with_name(f"{store.name}-{o}") for o in DTRAK_STORE_OUTPUTS}},
        classifier_dir=None,
        featurize=cfg,
        lora_dirs=tuple(Path(d) for d in lora_dirs),
        clip_dir=Path(clip_dir) if clip_dir is not None else None,
        roots=(store.parent, CACHE_DIR),
    )


def mask_key(mask: np.ndarray | None) -> str:
    if mask is None:
        return "full"
    return hashlib.sha256(np.ascontiguousarray(np.asarray(mask, dtype=np.float32)).tobytes()).hexdigest()[:16]


class Workspace:
    """Models, data, stores and classifier of one bundle, with cached per-sample answers."""

    def __init__(self, bundle: Bundle, device: str | None = None, query: QueryConfig = QueryConfig()):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.models: list[DiffusionModel] = load_models(list(bundle.model_dirs), self.device)
        if bundle.lora_dirs:
            from .latent_models import apply_lora

            apply_lora(self.models, bundle.lora_dirs)
        # images at the size users see (the VAE input for latent models; latents are made by featurize)
        self.dataset: ArrayDataset = load_dataset(bundle.data, self.models[0].pixel_shape)
        self.query = query
        self.classifier = None
        if bundle.classifier_dir is not None and Path(bundle.classifier_dir).exists():
            from .classifier import load_classifier

            self.classifier = load_classifier(Path(bundle.classifier_dir), device=self.device)
        self._clip = None
        self._scorers: dict[str, Scorer] = {}
        self._baselines: dict[str, SimilarityBaseline] = {}
        self._trajectories = LRU(64)
        self._scores = LRU(4096)
        self._curves = LRU(64)
        self._lock = threading.RLock()
        # torch.func.functional_call swaps the shared UNet's parameters while it runs, so two
        # threads computing gradients at once corrupt each other's scores: one at a time.
        self._compute_lock = threading.Lock()
        self._jobs: dict[tuple, dict[str, Any]] = {}

    # ------------------------------------------------------------------ data
    @property
    def num_train(self) -> int:
        return len(self.dataset)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the UNet works on (latent shape for latent models)."""
        return self.models[0].image_shape

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of displayed images, uploads and masks (equals ``image_shape`` for pixel models)."""
        return self.models[0].pixel_shape

    def train_images(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (B, H, W, C) training images for display."""
        return model_to_uint8(self.dataset.images(np.asarray(indices, dtype=np.int64)))

    def label(self, i: int) -> str:
        """Display label of train example i: its class name, else its caption, else ''."""
        ds = self.dataset
        if ds.labels is not None:
            names = ds.class_names
            lab = int(ds.labels[i])
            return names[lab] if names else str(lab)
        if ds.captions is not None:
            return ds.captions[i]
        return ""

    # ------------------------------------------------------------------ trajectories
    def generate(
        self,
        seed: int,
        num_steps: int = 50,
        scheduler: str = "ddim",
        prompt: str = "",
        guidance_scale: float = SamplingConfig.guidance_scale,
    ) -> tuple[str, Trajectory]:
        """A generated trajectory and its cache key (same seed, same trajectory).

        ``prompt`` and ``guidance_scale`` apply to text-conditional models only.
        """
        key = f"seed{seed}-{scheduler}{num_steps}"
        if self.models[0].is_conditional:
            key += "-" + hashlib.sha256(f"{guidance_scale}|{prompt}".encode()).hexdigest()[:12]
        traj = self._trajectories.get(key)
        if traj is None:
            cfg = SamplingConfig(num_inference_steps=num_steps, seed=seed, scheduler=scheduler, prompt=prompt,
                                 guidance_scale=guidance_scale)
            traj = sample_trajectory(self.models[0], cfg)
            self._trajectories.put(key, traj)
        return key, traj

    def upload(self, data: bytes, num_steps: int = 50, prompt: str = "") -> tuple[str, Trajectory]:
        """Decode an uploaded image (raises ``ImageDecodeError`` with a message) and invert it
        (conditioned on ``prompt`` for text-conditional models)."""
        key = "upload-" + hashlib.sha256(data).hexdigest()[:16] + f"-{num_steps}"
        if prompt:
            key += "-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
        traj = self._trajectories.get(key)
        if traj is None:
            image = decode_image(data, self.pixel_shape)
            traj = invert_image(self.models[0], image.to(self.device), num_steps, prompt=prompt)
            self._trajectories.put(key, traj)
        return key, traj

    def trajectory(self, key: str) -> Trajectory | None:
        return self._trajectories.get(key)

    # ------------------------------------------------------------------ methods
    def available_methods(self) -> dict[str, str]:
        """name -> label of every method answerable now (stores present, or a baseline)."""
        out = {}
        for name, m in METHODS.items():
            if self.store_exists(m.train_output):
                if m.combine in ("ekfac", "kfac"):  # also needs fitted factors (`attribution fit-factors`)
                    from .ekfac import factors_complete

                    if not factors_complete(self.bundle.stores[m.train_output], len(self.models)):
                        continue
                out[name] = m.label
        embed = self.classifier is not None or self.bundle.clip_dir is not None
        out.update({f"baseline-{k}": v for k, v in BASELINES.items() if k != "embedding" or embed})
        return out

    def store_exists(self, output: str) -> bool:
        path = self.bundle.stores.get(output)
        if path is None or not (Path(path) / "manifest.json").exists():
            return False
        try:  # a store still being built, or left half-built, is not ready
            return Store.open(path).is_complete()
        except StoreError:
            return False

    def writable_path(self, path: str | Path) -> Path:
        """``path`` if it resolves inside the bundle's roots (any path when it has none).

        Raises:
            PathEscapeError: a link or ``..`` takes it outside the configured directories.
        """
        return resolve_within(path, self.bundle.roots) if self.bundle.roots else Path(path)

    def store_path(self, output: str) -> Path:
        """Where the store of train output ``output`` is built (checked by :meth:`writable_path`)."""
        path = self.bundle.stores.get(output)
        if path is None:
            raise StoreError(f"no store location configured for output {output!r}")
        return self.writable_path(path)

    def build_store(self, output: str, progress: Progress | None = None) -> Path:
        """Featurize the store of train output ``output`` (resumes if interrupted)."""
        path = self.store_path(output)
        from dataclasses import replace

        cfg = replace(self.bundle.featurize, output=output)
        featurize(self.models, self.dataset, path, cfg, progress=progress,
                  latent_cache_dir=self.writable_path(CACHE_DIR / "latents"))
        return path

    def scorer(self, method: str) -> Scorer:
        with self._lock:
            if method not in self._scorers:
                m = get_method(method)
                path = self.bundle.stores.get(m.train_output)
                if path is None or not (Path(path) / "manifest.json").exists():
                    raise StoreError(
                        f"method {method!r} needs a store of output {m.train_output!r}, which is not built yet"
                    )
                from .featurize import store_spec

                spec = store_spec(self.models, self.dataset, Store.open(path).config)
                store = Store.open(path, spec)
                self._scorers[method] = Scorer(store, self.models, m, self.query, dataset=self.dataset)
            return self._scorers[method]

    def baseline(self, name: str) -> SimilarityBaseline:
        with self._lock:
            if name not in self._baselines:
                if name == "pixel":
                    self._baselines[name] = SimilarityBaseline(self.dataset, None, "pixel")
                elif name == "embedding":
                    if self.classifier is not None:
                        embed = self.classifier.embed
                    elif self.bundle.clip_dir is not None:
                        embed = self.clip.embed_images
                    else:
                        raise StoreError("the embedding baseline needs a classifier or a CLIP model")
                    self._baselines[name] = SimilarityBaseline(self.dataset, embed, "embedding")
                else:
                    raise ValueError(f"unknown baseline {name!r}")
            return self._baselines[name]

    # ------------------------------------------------------------------ scores
    def cached_scores(self, key: str, method: str, step: int, mask: np.ndarray | None = None) -> np.ndarray | None:
        return self._scores.get((key, method, int(step), mask_key(mask)))

    def scores(
        self,
        key: str,
        method: str,
        steps: Sequence[int],
        mask: np.ndarray | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(len(steps), N) scores of trajectory ``key``; computes only the steps not cached."""
        traj = self._trajectories.get(key)
        if traj is None:
            raise KeyError(f"unknown trajectory {key!r}; generate or upload it first")
        steps = [int(s) for s in steps]
        mk = mask_key(mask)
        # rows are kept locally: other callers may evict them from the bounded cache at any time
        rows = {s: self._scores.get((key, method, s, mk)) for s in steps}
        if any(r is None for r in rows.values()):
            with self._compute_lock:
                rows.update(self._compute_missing(traj, key, method, [s for s, r in rows.items() if r is None], mask, mk, progress))
        return np.stack([rows[s] for s in steps])

    def _compute_missing(self, traj, key, method, steps, mask, mk, progress) -> dict[int, np.ndarray]:
        """Rows of ``steps``: from the cache, or scored and cached (caller holds the compute lock)."""
        found = {s: self._scores.get((key, method, s, mk)) for s in steps}
        missing = [s for s, r in found.items() if r is None]
        if missing:
            if method.startswith("baseline-"):
                base = self.baseline(method.split("-", 1)[1])
                mask_t = prepare_mask(mask, self.pixel_shape) if mask is not None else None
                x0 = traj.display_x0_hat[missing].clamp(-1, 1)
                if mask_t is not None:
                    x0 = x0 * mask_t
                rows = base.scores(x0.to(self.device))
            else:
                rows = self.scorer(method).score(traj, missing, mask, progress).scores
            for s, row in zip(missing, rows):
                self._scores.put((key, method, s, mk), row)
                found[s] = row
        return found

    def prefetch(self, key: str, method: str, steps: Sequence[int], chunk: int = 5) -> None:
        """Compute the scores of ``steps`` in a background thread (no-op if already running)."""
        job_key = (key, method)
        with self._lock:
            job = self._jobs.get(job_key)
            if job is not None and job["thread"].is_alive():
                return
            todo = [int(s) for s in steps]
            job = {"done": 0, "total": len(todo), "error": None}

            def run() -> None:
                try:
                    for i in range(0, len(todo), chunk):
                        self.scores(key, method, todo[i : i + chunk])
                        job["done"] = min(i + chunk, len(todo))
                except Exception as e:  # reported to the caller through job_status
                    job["error"] = f"{type(e).__name__}: {e}"

            job["thread"] = threading.Thread(target=run, daemon=True, name=f"prefetch-{key}-{method}")
            self._jobs[job_key] = job
            job["thread"].start()

    def job_status(self, key: str, method: str) -> tuple[int, int, str | None]:
        """(steps done, steps total, error or None) of the background job for (key, method)."""
        job = self._jobs.get((key, method))
        if job is None:
            return (0, 0, None)
        return (job["done"], job["total"], job["error"])

    # ------------------------------------------------------------------ curves
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise StoreError("no classifier configured for likelihood curves")
        with torch.no_grad():
            return self.classifier.predict_proba(images.to(self.device)).cpu()

    def curves(
        self, key: str, steps: Sequence[int], num_samples: int = 16, progress: Progress | None = None
    ) -> LikelihoodCurves:
        """Class-likelihood curves of trajectory ``key`` at ``steps``."""
        ck = (key, tuple(int(s) for s in steps), num_samples)
        cached = self._curves.get(ck)
        if cached is None:
            traj = self._trajectories.get(key)
            if traj is None:
                raise KeyError(f"unknown trajectory {key!r}")
            cached = likelihood_curves(self.models[0], traj, self.classify, steps, num_samples, progress=progress)
            self._curves.put(ck, cached)
        return cached

    def class_names(self) -> list[str]:
        return self.dataset.class_names or [str(i) for i in range(10)]

    # ------------------------------------------------------------------ text-label curves (CLIP)
    @property
    def clip(self):
        """The bundle's :class:`~attribution.clip.ClipLabeler` (loaded on first use), or None."""
        if self.bundle.clip_dir is None:
            return None
        with self._lock:
            if self._clip is None:
                from .clip import load_clip

                self._clip = load_clip(self.bundle.clip_dir, self.device)
            return self._clip

    def label_curves(
        self,
        key: str,
        steps: Sequence[int],
        labels: Sequence[str],
        num_samples: int = 16,
        progress: Progress | None = None,
    ) -> LikelihoodCurves:
        """Likelihood curves (S, L) of free-text ``labels`` under the bundle's CLIP model."""
        from .clip import check_labels

        if self.bundle.clip_dir is None:
            raise StoreError("no CLIP model configured for text-label curves")
        labels = check_labels(labels)
        ck = ("labels", key, tuple(int(s) for s in steps), num_samples, tuple(labels))
        cached = self._curves.get(ck)
        if cached is None:
            traj = self._trajectories.get(key)
            if traj is None:
                raise KeyError(f"unknown trajectory {key!r}")
            cached = label_curves(self.models[0], traj, self.clip, labels, steps, num_samples, progress=progress)
            self._curves.put(ck, cached)
        return cached
