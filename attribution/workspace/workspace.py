"""A workspace: one model ensemble, its training set, stores and classifier, with cached answers.

This is the one object a front end (the Streamlit app, a notebook) talks to. It
loads everything once, answers "trajectory for seed s", "scores of step s for
method m (and mask M)", "likelihood curves", keeps per-sample results in a
bounded, thread-safe LRU shared by all callers, and can fill the scores of the
remaining steps in the background (:class:`~attribution.workspace.jobs.JobRunner`) while
the caller shows the first one: what a caller asks for goes before that background work
(:class:`~attribution.workspace.jobs.PriorityLock`). Trajectories are named by their
:class:`~attribution.workspace.recipes.SampleRecipe`. It does no drawing and imports no UI library.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from ..config import QueryConfig, SamplingConfig
from ..data.datasets import ArrayDataset, decode_image, load_dataset, model_to_uint8
from ..features.featurize import featurize, store_spec
from ..features.outputs import METHODS, get_method
from ..features.store import Store, StoreError
from ..models.base import DiffusionModel, resolve_device
from ..models.classifier import load_classifier
from ..models.clip import check_labels, load_clip
from ..models.load import load_models
from ..models.lora import apply_lora
from ..sampling.inversion import invert_image
from ..sampling.likelihood import LikelihoodCurves, label_curves, likelihood_curves
from ..sampling.trajectory import Trajectory, sample_trajectory
from ..scoring.baselines import BASELINES, SimilarityBaseline, baseline_scores
from ..scoring.masks import PatchMask, mask_key, mask_values, prepare_mask
from ..scoring.scorer import Scorer
from ..scoring.groups import GroupInfluence, group_influence
from ..tools.paths import resolve_within
from . import bundles
from .bundles import Bundle
from .jobs import Job, JobCancelled, JobRunner, PriorityLock
from .recipes import SampleRecipe

Progress = Callable[[int, int], None]
#: Counterfactual retrainings that run at once; later ones wait in a queue.
MAX_COUNTERFACTUAL_JOBS = 2


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


class Workspace:
    """Models, data, stores and classifier of one bundle, with cached per-sample answers."""

    def __init__(self, bundle: Bundle, device: str | None = None, query: QueryConfig = QueryConfig()):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.models: list[DiffusionModel] = load_models(list(bundle.model_dirs), self.device)
        if bundle.lora_dirs:
            apply_lora(self.models, bundle.lora_dirs)
        # images at the size users see (the VAE input for latent models; latents are made by featurize)
        self.dataset: ArrayDataset = load_dataset(bundle.data, self.models[0].pixel_shape)
        self.query = query
        self.classifier = None
        if bundle.classifier_dir is not None and Path(bundle.classifier_dir).exists():
            self.classifier = load_classifier(Path(bundle.classifier_dir), device=self.device)
        self._clip = None
        self._scorers: dict[str, Scorer] = {}
        self._baselines: dict[str, SimilarityBaseline] = {}
        self._trajectories = LRU(64)
        self._scores = LRU(4096)
        self._curves = LRU(64)
        self._lock = threading.RLock()
        # torch.func.functional_call swaps the shared UNet's parameters while it runs, so two
        # threads computing gradients at once corrupt each other's scores: one at a time, the
        # caller's request before the background jobs'.
        self._compute_lock = PriorityLock()
        self.jobs = JobRunner()
        # counterfactuals: results and interrupted runs here; bundled showcase results are read too
        self.counterfactual_cache = bundles.CACHE_DIR / "counterfactuals"
        self.counterfactual_shipped = (bundles.ASSETS_DIR / "showcase",)
        self._cf_slots = threading.BoundedSemaphore(MAX_COUNTERFACTUAL_JOBS)
        self._cf_checkpoint: str | None = None
        self._cf_requests: dict[str, Any] = {}  # job key -> its request

    # ------------------------------------------------------------------ data
    @property
    def num_train(self) -> int:
        return len(self.dataset)

    @property
    def is_conditional(self) -> bool:
        """Whether the models take a text prompt."""
        return self.models[0].is_conditional

    @property
    def is_latent(self) -> bool:
        """Whether the models work on VAE latents."""
        return self.models[0].is_latent

    @property
    def conditioning(self) -> str:
        """What a sample is conditioned on: ``"text"`` (a prompt), ``"class"`` (DiT: a class name) or ``"none"``."""
        m = self.models[0]
        return "class" if m.is_class_conditional else "text" if m.is_conditional else "none"

    @property
    def family(self) -> str:
        """The model family in words (``"Stable Diffusion XL"``, ``"DiT"``, ...)."""
        return self.models[0].family

    @property
    def uses_guidance(self) -> bool:
        """Whether sampling takes a guidance scale: classifier-free (every conditional family but FLUX) or a
        guidance embedding (FLUX-dev); FLUX-schnell takes none."""
        return self.models[0].guidance_kind != "none"

    @property
    def guidance_embedded(self) -> bool:
        """Whether the guidance scale is an input of the network (guidance-distilled FLUX-dev), not CFG."""
        return self.models[0].guidance_kind == "embedded"

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale the family's diffusers pipeline defaults to (SD 7.5, SDXL 5, DiT 4, SD3 7, FLUX 3.5)."""
        return float(self.models[0].default_guidance_scale)

    @property
    def class_choices(self) -> list[str]:
        """Class-conditional models: the name of every class the model knows (its ``id2label``), in id order."""
        return list(self.models[0].class_names or [])

    def default_prompt(self) -> str:
        """The prompt a first sample uses: the first training caption (text models), the class of the first
        training image (class-conditional models, as named by the model), else ``""``."""
        m = self.models[0]
        if m.is_class_conditional:
            if self.dataset.labels is not None and self.dataset.class_names:
                return m.class_names[m.class_id(self.dataset.class_names[int(self.dataset.labels[0])])]
            return m.class_names[0]
        return (self.captions or [""])[0]

    @property
    def captions(self) -> list[str] | None:
        """The training set's captions, if it has them."""
        return self.dataset.captions

    @property
    def has_clip(self) -> bool:
        """Whether a CLIP model is configured (text-label curves)."""
        return self.bundle.clip_dir is not None

    def describe(self) -> str:
        """One markdown paragraph saying what the loaded bundle is."""
        c, h, w = self.image_shape
        kind = "grayscale" if c == 1 else "colour"
        n_models = len(self.models)
        digits = self.bundle.data.startswith("digits") or self.class_names() == [str(i) for i in range(10)]
        what = "MNIST digits" if digits else "images"
        stores = ", ".join(label for name, label in self.available_methods().items() if not name.startswith("baseline"))
        if self.is_latent:
            lc, lh, lw = self.image_shape
            _, ph, pw = self.pixel_shape
            kind = {"class": "class-conditional latent", "text": "text-conditional latent"}.get(self.conditioning, "latent")
            kind = f"{kind} ({self.family})"
            lora = " with a LoRA adapter" if self.bundle.lora_dirs else ""
            return (
                f"**{self.bundle.name}**  \n"
                f"{n_models} {kind} diffusion model{'s' if n_models > 1 else ''}{lora} "
                f"({ph}×{pw} images, {lc}×{lh}×{lw} latents), trained on **{self.num_train:,} "
                f"{'captioned ' if self.captions is not None else ''}images**.  \n"
                f"Attribution methods ready: {stores or 'similarity baselines only'}."
            )
        return (
            f"**{self.bundle.name}**  \n"
            f"{n_models} diffusion models (DDPMs) trained on **{self.num_train:,} {what}** ({h}×{w} {kind}); "
            f"the first generates, all {n_models} are averaged for the scores.  \n"
            f"Attribution methods ready: {stores or 'similarity baselines only'}."
        )

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
        key = SampleRecipe("seed", seed=int(seed), prompt=prompt, guidance_scale=guidance_scale, num_steps=num_steps,
                           scheduler=scheduler).key(self.is_conditional)
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
        key = SampleRecipe("upload", data=data, prompt=prompt, num_steps=num_steps).key(self.is_conditional)
        traj = self._trajectories.get(key)
        if traj is None:
            image = decode_image(data, self.pixel_shape)
            traj = invert_image(self.models[0], image.to(self.device), num_steps, prompt=prompt)
            self._trajectories.put(key, traj)
        return key, traj

    def trajectory(self, key: str) -> Trajectory | None:
        return self._trajectories.get(key)

    def sample(self, recipe: SampleRecipe) -> tuple[str, Trajectory]:
        """The trajectory of ``recipe`` (made, or from the cache) and its key."""
        prompt = recipe.prompt or ""
        if recipe.kind == "seed":
            scale = recipe.guidance_scale if recipe.guidance_scale is not None else SamplingConfig.guidance_scale
            return self.generate(recipe.seed, recipe.num_steps, recipe.scheduler, prompt=prompt, guidance_scale=scale)
        return self.upload(recipe.data, recipe.num_steps, prompt=prompt)

    # ------------------------------------------------------------------ methods
    def available_methods(self) -> dict[str, str]:
        """name -> label of every method answerable now (stores present, or a baseline)."""
        out = {}
        for name, m in METHODS.items():
            if self.store_exists(m.train_output):
                if m.combine in ("ekfac", "kfac"):  # also needs fitted factors (`attribution fit-factors`)
                    from ..scoring.ekfac import factors_complete

                    if not factors_complete(self.bundle.stores[m.train_output], len(self.models)):
                        continue
                if m.combine == "group-trak":  # also needs a block-sjlt store and its fitted group weights
                    from ..scoring.group_weights import group_weights_status

                    if group_weights_status(Store.open(self.bundle.stores[m.train_output]), self.query.ridge) is not None:
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

    def build_store(self, output: str, progress: Progress | None = None,
                    models: Sequence[DiffusionModel] | None = None) -> Path:
        """Featurize the store of train output ``output`` (resumes if interrupted).

        ``models``: the checkpoints to differentiate (default: the workspace's own); a background
        build passes copies, so that it never differentiates the modules a caller is scoring with.
        """
        path = self.store_path(output)
        cfg = replace(self.bundle.featurize, output=output)
        featurize(list(models or self.models), self.dataset, path, cfg, progress=progress,
                  latent_cache_dir=self.writable_path(bundles.CACHE_DIR / "latents"))
        return path

    def start_build(self, output: str) -> Job:
        """Build the store of ``output`` in the background, on copies of the models (no-op while one runs)."""
        self.store_path(output)  # refuses a location outside the bundle's directories before starting

        def work(job: Job) -> None:
            self.build_store(output, job.progress, models=[copy.deepcopy(m) for m in self.models])

        return self.jobs.start(("build", output), f"build-store-{output}", work)

    def build_job(self, output: str) -> Job | None:
        """The background build of ``output`` started by :meth:`start_build`, if any."""
        return self.jobs.get(("build", output))

    def scorer(self, method: str) -> Scorer:
        with self._lock:
            if method not in self._scorers:
                m = get_method(method)
                path = self.bundle.stores.get(m.train_output)
                if path is None or not (Path(path) / "manifest.json").exists():
                    raise StoreError(
                        f"method {method!r} needs a store of output {m.train_output!r}, which is not built yet"
                    )
                spec = store_spec(self.models, self.dataset, Store.open(path).config)
                store = Store.open(path, spec)
                store.kernel_cache = self.writable_path(bundles.CACHE_DIR / "kernels")
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
    def cached_scores(self, key: str, method: str, step: int, mask: np.ndarray | PatchMask | None = None) -> np.ndarray | None:
        return self._scores.get((key, method, int(step), mask_key(mask)))

    def scores(
        self,
        key: str,
        method: str,
        steps: Sequence[int],
        mask: np.ndarray | PatchMask | None = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(len(steps), N) scores of trajectory ``key``; computes only the steps not cached.

        ``mask``: (H, W) patch weights at the pixel size, or a :class:`~attribution.scoring.masks.PatchMask`
        (hashed once for all the calls that name it).
        """
        traj = self._trajectories.get(key)
        if traj is None:
            raise KeyError(f"unknown trajectory {key!r}; generate or upload it first")
        steps = [int(s) for s in steps]
        mk = mask_key(mask)
        mask = mask_values(mask)
        # rows are kept locally: other callers may evict them from the bounded cache at any time
        rows = {s: self._scores.get((key, method, s, mk)) for s in steps}
        if any(r is None for r in rows.values()):
            with self._compute_lock.hold(background=self.jobs.in_job()):
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
                rows = baseline_scores(base, traj.display_x0_hat[missing].to(self.device), mask_t)
            else:
                rows = self.scorer(method).score(traj, missing, mask, progress, pause=self._compute_lock.pause_point).scores
            for s, row in zip(missing, rows):
                self._scores.put((key, method, s, mk), row)
                found[s] = row
        return found

    def prefetch(self, key: str, method: str, steps: Sequence[int], chunk: int = 5) -> None:
        """Compute the scores of ``steps`` in the background, ``chunk`` at a time (no-op if already running)."""
        todo = [int(s) for s in steps]

        def work(job: Job) -> None:
            for i in range(0, len(todo), chunk):
                job.check()
                self.scores(key, method, todo[i : i + chunk])
                job.done = min(i + chunk, len(todo))

        self.jobs.start(("scores", key, method), f"prefetch-{key}-{method}", work, total=len(todo))

    def job_status(self, key: str, method: str) -> tuple[int, int, str | None]:
        """(steps done, steps total, error or None) of the background job for (key, method)."""
        job = self.jobs.get(("scores", key, method))
        if job is None:
            return (0, 0, None)
        return (job.done, job.total, job.error)

    def foreground(self) -> ContextManager[None]:
        """Context of work a user is waiting for (a page being rendered): background scoring pauses
        at its next pause point until it is over (:meth:`PriorityLock.foreground`)."""
        return self._compute_lock.foreground()

    def shutdown(self) -> None:
        """Stop the background jobs and wait for them (also done at interpreter exit)."""
        self.jobs.shutdown()

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

    def group_influence(self, scores: np.ndarray, top_k: int = 8) -> GroupInfluence | None:
        """Summed score of every class of one step's scores (N,) (:mod:`attribution.scoring.groups`);
        None when the training set has no class labels."""
        if self.dataset.labels is None:
            return None
        labels = np.asarray(self.dataset.labels)
        names = self.dataset.class_names or [str(c) for c in range(int(labels.max()) + 1)]
        return group_influence(scores, labels, names, top_k)

    # ------------------------------------------------------------------ text-label curves (CLIP)
    @property
    def clip(self):
        """The bundle's :class:`~attribution.models.clip.ClipLabeler` (loaded on first use), or None."""
        if self.bundle.clip_dir is None:
            return None
        with self._lock:
            if self._clip is None:
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

    # ------------------------------------------------------------------ counterfactuals
    def counterfactual_request(self, key: str, step: int, remove: str, k: int, method: str = "journey",
                               random_seed: int = 0):
        """The :class:`~attribution.counterfactual.CounterfactualRequest` of removing ``remove`` (top, bottom,
        random, class:C) of size ``k`` for trajectory ``key`` at ``step``, ranked by ``method``'s scores."""
        from ..counterfactual import CounterfactualRequest, removed_set, train_config_of

        if self.is_latent or self.is_conditional:
            raise ValueError("counterfactuals retrain pixel-space DDPMs only (the bundled kind)")
        if method.startswith("baseline-"):
            raise ValueError("counterfactuals need an attribution method's scores, not a similarity baseline")
        row = self.scores(key, method, [step])[0]
        removed = removed_set(remove, int(k), row, self.dataset.labels, random_seed)
        return CounterfactualRequest(
            checkpoint=self.counterfactual_checkpoint(), sample=key, step=int(step), remove=remove, k=len(removed),
            removed=tuple(int(i) for i in removed), method=method, train=train_config_of(self.bundle.model_dirs[0]),
            device=torch.device(self.device).type, num_resamples=self.query.num_resamples,
            noise_seed=self.query.noise_seed, random_seed=random_seed,
            predicted_delta_f=float(row[removed].sum()))

    def counterfactual_checkpoint(self) -> str:
        """The generating checkpoint's hash (:func:`~attribution.counterfactual.checkpoint_hash`), computed once."""
        from ..counterfactual import checkpoint_hash

        with self._lock:
            if self._cf_checkpoint is None:
                self._cf_checkpoint = checkpoint_hash(self.bundle.model_dirs[0])
            return self._cf_checkpoint

    def counterfactual_result(self, request):
        """The finished result of ``request`` (cache or shipped showcase), or None."""
        from ..counterfactual import find_result

        for root in (self.counterfactual_cache, *self.counterfactual_shipped):
            found = find_result(root, request)
            if found is not None:
                return found
        return None

    def run_counterfactual(self, request, progress: Progress | None = None, log: Callable[[str], None] = lambda s: None,
                           keep_model: bool = False):
        """Compute ``request`` here and now (or read it from the cache): what the background job and the CLI run.
        ``keep_model``: keep the retrained model for more samples of the same removed set."""
        from ..counterfactual import run_counterfactual

        found = self.counterfactual_result(request)
        if found is not None:
            return found
        traj = self._trajectories.get(request.sample)
        if traj is None:
            raise KeyError(f"unknown trajectory {request.sample!r}; generate or upload it first")
        images = self.dataset.images(np.arange(self.num_train))
        return run_counterfactual(request, self.bundle.model_dirs[0], images, traj, self.counterfactual_cache,
                                  classifier=self.classifier, progress=progress, log=log, keep_model=keep_model)

    def start_counterfactual(self, request) -> Job:
        """Run ``request`` in the background (no-op while it runs). At most :data:`MAX_COUNTERFACTUAL_JOBS` train
        at once; the others wait with ``job.stage == "queued"``. Cancelling (:meth:`cancel_counterfactual`) removes
        the run's files; a shutdown keeps them, and starting it again resumes at the last finished epoch."""
        from ..counterfactual import discard_work

        def work(job: Job) -> None:
            job.stage = "queued"
            while not self._cf_slots.acquire(timeout=0.2):
                job.check()
            try:
                job.stage = "training"

                def progress(done: int, total: int) -> None:
                    if done >= total - 1:
                        job.stage = "regenerating"
                    job.progress(done, total)

                self.run_counterfactual(request, progress)
            except JobCancelled:
                if job.cancelled:
                    discard_work(self.counterfactual_cache, request)
                raise
            finally:
                self._cf_slots.release()

        self._cf_requests[request.key()] = request
        return self.jobs.start(("counterfactual", request.key()), f"counterfactual-{request.key()}", work)

    def counterfactual_job(self, request) -> Job | None:
        """The background job of ``request`` started in this process, if any."""
        return self.jobs.get(("counterfactual", request.key()))

    def counterfactual_jobs(self) -> list[tuple[Any, Job]]:
        """(request, job) of every counterfactual job running or queued now, in the order they were started."""
        out = []
        for key, request in list(self._cf_requests.items()):
            job = self.jobs.get(("counterfactual", key))
            if job is not None and job.running:
                out.append((request, job))
        return out

    def counterfactual_results_of(self, sample: str) -> list:
        """Every finished result of trajectory ``sample`` under this checkpoint (cache and showcase), by step and k."""
        from ..counterfactual.showcase import entries

        ck = self.counterfactual_checkpoint()
        found = [r for root in (self.counterfactual_cache, *self.counterfactual_shipped) for r in entries(root)]
        found = [r for r in found if r.meta["request"]["sample"] == sample and r.meta["request"]["checkpoint"] == ck]
        return sorted(found, key=lambda r: (r.meta["request"]["step"], r.meta["request"]["k"]))

    def cancel_counterfactual(self, request) -> None:
        """Stop ``request``'s job at its next check and remove its files (also an interrupted run's)."""
        from ..counterfactual import discard_work

        job = self.counterfactual_job(request)
        if job is not None and job.running:
            job.cancel()
            job.thread.join(30)
        discard_work(self.counterfactual_cache, request)

    def counterfactual_interrupted(self, request) -> int | None:
        """Finished epochs of an interrupted run of ``request`` left on disk (None: there is none)."""
        from ..counterfactual import interrupted

        return interrupted(self.counterfactual_cache, request)
