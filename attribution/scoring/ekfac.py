"""K-FAC / EK-FAC influence functions (Mlodozeniec et al., ICLR 2025) with factors fitted by kronfluence.

Method, for checkpoint m with parameters theta_m and N training examples:

    H_m        ~ (1/(N D)) sum_{i,d} GGN of L(theta_m; x_i, t_id, eps_id)      (the DDPM loss, same draws as the store)
    v_{s,m}    = (H_m + lambda_m I)^-1 grad_theta f_s(theta_m)                 (f_s: Eq. 3 at step s, with the mask)
    tau_s[i]   = (1/M) sum_m (1/N) <grad_theta l_i(theta_m), v_{s,m}>          (l_i = (1/D) sum_d L(theta_m; x_i, t_id, eps_id))

H_m is block-diagonal over the modules kronfluence tracks (every ``nn.Linear`` and
``nn.Conv2d`` whose parameters the store differentiates), each block Kronecker-factored
(K-FAC, ``kfac``) or Kronecker-factored with eigenvalues refitted in the Kronecker
eigenbasis (EK-FAC, ``ekfac``). kronfluence fits the factors once per checkpoint
(:func:`fit_factors`); the Fisher is the "true" one (targets sampled from the model,
``y = eps_theta + sqrt(P/2) z`` for a loss that is a mean over P pixels), whose
expectation is the Gauss-Newton matrix of the loss.

Sign convention (the project's, as for TRAK in :mod:`attribution.scoring`):
``tau_s[i] > 0`` means example i *lowers* f_s, i.e. makes what was generated more likely
at step s; (1/N) <grad l_i, H^-1 grad f_s> is the first-order change of f_s when
example i is removed (removing a positive influencer raises f_s).

Train gradients: the store's projected features phi_i = P_m grad l_i (the draws are the
same ones, :func:`attribution.featurize.draw_timesteps_and_noise`). The query vector
v_{s,m} is preconditioned in the full parameter space and then projected by the same
P_m, so <phi_i, P_m v> estimates <grad l_i, v> (E[P^T P] = I for the sjlt and Gaussian
sketches; exact for the identity projection). No train gradient is recomputed per
query (kronfluence's pairwise scores would recompute all N of them for every query);
no extra disk beyond the factors. Parameters in no tracked module (GroupNorm scales
and shifts, embeddings, anything that is not Linear/Conv2d) get a zero entry in v:
they do not contribute to the influence (their cost is measured by
``benchmarks/bench_ekfac.py`` against an exact oracle).

Damping: ``lambda_m = ridge * mean(Lambda_m)``, the mean of the fitted eigenvalues over
all tracked modules (one value per checkpoint, so the relative weight of the modules is
the Hessian's), ``ridge`` is :attr:`attribution.config.QueryConfig.ridge`.

K-FAC scale: kronfluence normalizes both Kronecker factors of a convolution (or of a
Linear applied to a sequence) per spatial position, so its K-FAC eigenvalues are
1/|T| of the Gauss-Newton's (Grosse & Martens 2016, KFC: F ~ |T| A (x) S). We multiply
them by |T| (positions per data point, from kronfluence's own counts); EK-FAC's
eigenvalues are refitted from per-example gradients and need no correction.

Storage, beside the store: ``<store>/ekfac/manifest.json`` (settings, kronfluence
version, checkpoint hashes, dataset fingerprint, the tracked modules, sha256 of every
factor file) and kronfluence's safetensors files under ``<store>/ekfac/ckpt{m}/``.
Checkpoints finish one by one (resumable; a checkpoint's finished kronfluence stages
are kept); factors built for other settings, checkpoints or data are refused; files are
read with ``safetensors`` only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import FeaturizeConfig
from ..data import ImageDataset
from ..features.featurize import caption_embeddings, draw_timesteps_and_noise
from ..features.gradients import DrawBatch, GradientTarget, per_step_grads
from ..features.latents import dataset_fingerprint, model_space_dataset
from ..features.outputs import loss_output
from ..features.projection import Projector
from ..features.store import Store, StoreError
from ..models import DiffusionModel
from ..tools.files import atomic_write_bytes, sha256_file

Progress = Callable[[int, int], None]
Log = Callable[[str], None]

FORMAT_VERSION = 1
#: Methods answered by this module (``Method.combine`` in :mod:`attribution.outputs`).
STRATEGIES = ("ekfac", "kfac")
#: What kronfluence leaves out, in words (shown by the app and the docs).
UNTRACKED_NOTE = (
    "K-FAC/EK-FAC precondition only nn.Linear and nn.Conv2d layers (weights and biases); "
    "GroupNorm/LayerNorm scales and shifts and embeddings are not tracked and do not contribute."
)


class FactorError(StoreError):
    """Influence factors are missing, unfinished, corrupt or built for something else."""


@dataclass(frozen=True)
class EkfacConfig:
    """How the Hessian approximation is fitted (every field changes the factors).

    Attributes:
        fisher: ``"sampled"`` -- true Fisher, targets sampled from the model (its
            expectation is the Gauss-Newton matrix); ``"empirical"`` -- the gradients of
            the training loss itself (empirical Fisher).
        max_examples: fit on this many training examples (a seeded random subset, all D
            draws of each), None: all.
        subset_seed: seed of that subset.
        sample_seed: seed of the sampled targets; item (i, d) always gets the same.
        fisher_samples: sampled targets per (example, draw) (``"sampled"`` only): the fit runs
            over the items this many times with fresh targets, a lower-variance Monte Carlo
            estimate of the same Gauss-Newton (for small training sets).
        batch_size: (example, draw) items per kronfluence batch (memory only).
        dtype: ``"float32"`` or ``"float64"``: covariance, per-sample-gradient and
            Lambda accumulation (eigendecompositions are always float64).
    """

    fisher: str = "sampled"
    max_examples: int | None = None
    subset_seed: int = 0
    sample_seed: int = 0
    fisher_samples: int = 1
    batch_size: int = 64
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.fisher not in ("sampled", "empirical"):
            raise ValueError(f"fisher must be 'sampled' or 'empirical', not {self.fisher!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype!r}")
        if self.fisher_samples < 1 or (self.fisher_samples > 1 and self.fisher == "empirical"):
            raise ValueError("fisher_samples must be 1 with the empirical Fisher and positive otherwise")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("max_examples must be positive or None")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- module layout
@dataclass(frozen=True)
class TrackedModule:
    """One tracked layer and where its parameters sit in the flat gradient (select_params order).

    The layer's gradient matrix is (out, in_flat [+ 1]): ``weight.reshape(out, -1)``
    (Conv2d: in_channels * kh * kw, the order of ``F.unfold``) with the bias as the last
    column, kronfluence's layout.
    """

    name: str
    weight: tuple[int, int]  # [start, stop) in the flat vector
    weight_shape: tuple[int, ...]
    bias: tuple[int, int] | None

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]


def tracked_layout(model: DiffusionModel, params: dict[str, torch.Tensor]) -> tuple[list[TrackedModule], list[str]]:
    """The Linear/Conv2d leaf modules all of whose parameters are in ``params`` (in order), and
    the names of the selected parameters that no tracked module covers.

    Grouped convolutions are left out (kronfluence averages their channel groups).
    """
    offsets, start = {}, 0
    for k, v in params.items():
        offsets[k] = (start, start + v.numel())
        start += v.numel()
    tracked, covered = [], set()
    for name, module in model.unet.named_modules():
        if len(list(module.children())) > 0 or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        w = f"{name}.weight"
        b = f"{name}.bias" if module.bias is not None else None
        if w not in offsets or (b is not None and b not in offsets):
            continue
        tracked.append(TrackedModule(name, offsets[w], tuple(module.weight.shape), offsets[b] if b else None))
        covered.update({w} | ({b} if b else set()))
    untracked = [k for k in params if k not in covered]
    return tracked, untracked


def module_matrices(g: torch.Tensor, mod: TrackedModule) -> torch.Tensor:
    """Flat gradients (S, p) -> the layer's gradient matrices (S, out, in_flat [+ 1])."""
    w = g[:, mod.weight[0] : mod.weight[1]].reshape(g.shape[0], mod.out_features, -1)
    if mod.bias is None:
        return w
    return torch.cat([w, g[:, mod.bias[0] : mod.bias[1]][:, :, None]], dim=2)


def scatter_matrices(out: torch.Tensor, mats: torch.Tensor, mod: TrackedModule) -> None:
    """Write the layer's matrices (S, out, in_flat [+ 1]) back into the flat (S, p) ``out``."""
    s = out.shape[0]
    if mod.bias is None:
        out[:, mod.weight[0] : mod.weight[1]] = mats.reshape(s, -1)
        return
    out[:, mod.weight[0] : mod.weight[1]] = mats[:, :, :-1].reshape(s, -1)
    out[:, mod.bias[0] : mod.bias[1]] = mats[:, :, -1]


def tracked_indices(layout: Sequence[TrackedModule]) -> torch.Tensor:
    """(q,) int64 flat positions of every tracked parameter."""
    idx = []
    for mod in layout:
        idx.append(torch.arange(*mod.weight))
        if mod.bias is not None:
            idx.append(torch.arange(*mod.bias))
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------- preconditioners
class KroneckerPreconditioner:
    """v = (H + lambda I)^-1 g with H block-diagonal over modules, each block Q_S diag(Lambda) Q_S^T (x) Q_A ...

    Per module with gradient matrix G (out, in): ``Q_S ((Q_S^T G Q_A) / (Lambda + lambda)) Q_A^T``.
    Untracked entries of g are set to zero.
    """

    def __init__(self, layout: Sequence[TrackedModule], factors: dict[str, dict[str, torch.Tensor]], ridge: float):
        """``factors[name]``: ``q_a`` (in, in), ``q_s`` (out, out), ``eigenvalues`` (out, in), float64."""
        self.layout = list(layout)
        self.factors = factors
        total = sum(float(f["eigenvalues"].sum()) for f in factors.values())
        count = sum(f["eigenvalues"].numel() for f in factors.values())
        #: lambda = ridge * mean(Lambda) over all tracked modules.
        self.damping = ridge * total / max(count, 1)
        self.inverse = {k: 1.0 / (f["eigenvalues"] + self.damping) for k, f in factors.items()}

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """g (S, p) float -> v (S, p) float32."""
        g = g.double()
        out = torch.zeros_like(g)
        for mod in self.layout:
            f = self.factors[mod.name]
            mats = module_matrices(g, mod)  # (S, out, in)
            rot = f["q_s"].T @ mats @ f["q_a"]
            scatter_matrices(out, f["q_s"] @ (rot * self.inverse[mod.name]) @ f["q_a"].T, mod)
        return out.float()


class DensePreconditioner:
    """v = (H + lambda I)^-1 g with an explicit (q, q) H over the flat positions ``index`` (tests, the oracle).

    lambda = ridge * trace(H) / q (the mean eigenvalue, as for :class:`KroneckerPreconditioner`);
    entries of g outside ``index`` are set to zero.
    """

    def __init__(self, hessian: torch.Tensor, index: torch.Tensor, ridge: float):
        q = hessian.shape[0]
        self.index = index
        self.damping = ridge * float(torch.trace(hessian)) / q
        self.chol = torch.linalg.cholesky(hessian.double() + self.damping * torch.eye(q, dtype=torch.float64))

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        out[:, self.index] = torch.cholesky_solve(g[:, self.index].double().T, self.chol).T.float()
        return out


# ---------------------------------------------------------------------- kronfluence task
def _item_generator(seed: int, index: int, draw: int, repeat: int = 0) -> torch.Generator:
    key = [int(seed), 7717, int(index), int(draw)] + ([int(repeat)] if repeat else [])
    state = np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


class DrawItems(torch.utils.data.Dataset):
    """The (example, draw) items of a fit: item j = draw j % D of example ``indices[(j // D) % n]``, repeat
    r = j // (n D) of ``repeats`` (each repeat gets fresh sampled targets).

    Each item is ``(x0 (C, H, W), t () int64, eps (C, H, W), key (3,) int64 [i, d, r][, cond (L, D)])``;
    the draws are those of the store (:func:`draw_timesteps_and_noise`), computed lazily.
    """

    def __init__(self, model: DiffusionModel, data: ImageDataset, captions_from: ImageDataset,
                 indices: np.ndarray, config: FeaturizeConfig, repeats: int = 1):
        self.model, self.data, self.captions_from = model, data, captions_from
        self.indices, self.config, self.repeats = np.asarray(indices), config, repeats
        self._cached: tuple[int, tuple] | None = None

    def __len__(self) -> int:
        return len(self.indices) * self.config.num_draws * self.repeats

    def _example(self, i: int) -> tuple:
        if self._cached is None or self._cached[0] != i:
            idx = np.array([i])
            ts, noises = draw_timesteps_and_noise(idx, self.config, self.model.num_train_timesteps, self.model.image_shape)
            cond = caption_embeddings(self.model, self.captions_from, idx)
            self._cached = (i, (self.data.images(idx)[0], ts[0], noises[0], None if cond is None else cond[0].cpu()))
        return self._cached[1]

    def __getitem__(self, j: int) -> tuple:
        d = j % self.config.num_draws
        r, e = divmod(j // self.config.num_draws, len(self.indices))
        i = int(self.indices[e])
        x0, ts, noises, cond = self._example(i)
        item = (x0, ts[d], noises[d], torch.tensor([i, d, r]))
        return item + ((cond,) if cond is not None else ())


def make_task(model: DiffusionModel, tracked: Sequence[str], sample_seed: int = 0):
    """A kronfluence ``Task`` for ``model`` tracking the modules ``tracked``.

    ``compute_train_loss(batch)``: sum over items of L = mean_pixels (y - p_theta(x_t, t))^2 with
    y the objective's target (``sample=False``; eps for an epsilon model) or y = p_theta + sqrt(P/2) z (``sample=True``, z seeded by
    the item's key), whose gradient covariance has expectation the Gauss-Newton matrix of L.
    ``compute_measurement(batch)`` (cross-checks only): batch ``(x0_hat (B, C, H, W), t (B, K),
    eps (B, K, C, H, W), mask (B, 1|C, H, W)[, cond])``, sum over B of Eq. (3)'s f_s.
    """
    from kronfluence.task import Task

    dm = model  # kronfluence passes the wrapped UNet as ``model``
    objective = dm.objective

    class _Task(Task):
        def _predict(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
            return dm.run_network(unet, x_t, objective.model_timesteps(t), cond)

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x0, t, eps, key = batch[:4]
            cond = batch[4] if len(batch) > 4 else None
            a, b = objective.coefficients(t)
            pred = self._predict(model, objective.noised(x0, eps, a, b), t, cond)
            target = objective.target(x0, eps, a, b)
            if sample:
                scale = math.sqrt(pred[0].numel() / 2)
                z = torch.stack([torch.randn(pred.shape[1:], generator=_item_generator(sample_seed, *(int(v) for v in k)))
                                 for k in key.cpu()]).to(pred.device)
                target = pred.detach() + scale * z
            return loss_output(pred, target).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x0, t, eps, mask = batch[:4]
            cond = batch[4] if len(batch) > 4 else None
            b, k = t.shape
            t = t.reshape(-1)
            ca, cb = objective.coefficients(t)
            x0, eps = x0.repeat_interleave(k, 0), eps.flatten(0, 1)
            c = None if cond is None else cond.repeat_interleave(k, 0)
            pred = self._predict(model, objective.noised(x0, eps, ca, cb), t, c)
            per = loss_output(pred, objective.target(x0, eps, ca, cb), mask.repeat_interleave(k, 0))
            return per.reshape(b, k).mean(1).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(tracked)

    return _Task()


# ---------------------------------------------------------------------- fitting and storage
def factors_dir(store: Store) -> Path:
    """Where the factors of ``store`` live: ``<store>/ekfac``."""
    return Path(store.root) / "ekfac"


def _kronfluence_version() -> str:
    import kronfluence

    return str(kronfluence.__version__)


def factor_spec(store: Store, models: Sequence[DiffusionModel], dataset: ImageDataset | None,
                config: EkfacConfig) -> dict[str, Any]:
    """What factors must have been built for: settings, store settings, checkpoints, data."""
    return {
        "settings": config.to_dict(),
        "store_settings": store.manifest["settings"],
        "checkpoints": [m.checkpoint_hash for m in models],
        "dataset": dataset_fingerprint(dataset, models[0]) if dataset is not None else store.manifest["dataset"]["fingerprint"],
        "num_params": store.manifest["num_params"],
    }


def _mismatch(manifest: dict[str, Any], spec: dict[str, Any]) -> str | None:
    for key in ("settings", "store_settings", "num_params", "dataset"):
        if manifest.get(key) != spec[key]:
            return f"{key} differ: the factors were built with {manifest.get(key)!r}, now {spec[key]!r}"
    if manifest.get("checkpoints") != spec["checkpoints"]:
        return "the checkpoints differ (weights hash)"
    return None


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(root / "manifest.json", json.dumps(manifest, indent=2).encode())


def open_manifest(store: Store, models: Sequence[DiffusionModel], config: EkfacConfig | None = None,
                  dataset: ImageDataset | None = None) -> dict[str, Any]:
    """The factor manifest of ``store``, checked against these checkpoints (and ``config`` when given).

    Raises:
        FactorError: no factors, another format or kronfluence version, or a mismatch.
    """
    root = factors_dir(store)
    path = root / "manifest.json"
    if not path.exists():
        raise FactorError(
            f"no EK-FAC/K-FAC factors for store {store.root}; fit them with "
            f"`attribution fit-factors --store {store.root}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FactorError(f"{path} is not valid JSON ({e}); delete {root} and fit the factors again") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FactorError(f"{path} has format version {manifest.get('format_version')}, this program reads {FORMAT_VERSION}")
    if manifest.get("kronfluence_version") != _kronfluence_version():
        raise FactorError(f"factors in {root} were fitted by kronfluence {manifest.get('kronfluence_version')}, "
                          f"{_kronfluence_version()} is installed; fit them again into a fresh directory")
    cfg = config if config is not None else EkfacConfig(**manifest["settings"])
    why = _mismatch(manifest, factor_spec(store, models, dataset, cfg))
    if why is not None:
        raise FactorError(f"factors in {root} do not match: {why}. Delete {root} or fit with the same settings.")
    return manifest


def _clean_partial(ckpt_dir: Path, log: Log) -> None:
    """Delete unreadable kronfluence files of an unfinished checkpoint (kronfluence skips any stage whose file exists)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for f in sorted(ckpt_dir.rglob("*.safetensors")):
        try:
            load_file(f)
        except (SafetensorError, OSError, RuntimeError) as e:
            log(f"{f} is unreadable ({e}); recomputing it")
            f.unlink()


def fit_factors(
    store: Store,
    models: Sequence[DiffusionModel],
    dataset: ImageDataset,
    config: EkfacConfig = EkfacConfig(),
    progress: Progress | None = None,
    log: Log = lambda s: None,
    latent_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit the EK-FAC factors (which contain K-FAC's) of every checkpoint with kronfluence; resume if present.

    One kronfluence ``fit_all_factors`` per checkpoint over the N * D (example, draw) items
    of the store's draws (covariances, eigendecomposition, EK-FAC eigenvalues); the model
    is a deep copy (kronfluence wraps its layers in place).

    Returns:
        The factor manifest.

    Raises:
        FactorError: existing factors were built for something else.
        StoreError: the store is not a loss store (EK-FAC's train gradients are the loss's).
    """
    import kronfluence
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    scfg = store.config
    if scfg.output != "loss":
        raise StoreError(f"EK-FAC needs a store of the DDPM loss (--output loss), store {store.root} holds {scfg.output!r}")
    if scfg.proj_kind == "factorized":
        raise StoreError("EK-FAC needs a store whose projection applies to a whole gradient (sjlt, gaussian, identity)")
    from ..features.gradients import select_params

    root = factors_dir(store)
    spec = factor_spec(store, models, dataset, config)
    if (root / "manifest.json").exists():
        manifest = open_manifest(store, models, config, dataset)
    else:
        params = select_params(models[0], scfg.param_filter)
        layout, untracked = tracked_layout(models[0], params)
        if not layout:
            raise StoreError("the store's parameters include no whole nn.Linear / nn.Conv2d layer to track")
        manifest = {"format_version": FORMAT_VERSION, "kronfluence_version": kronfluence.__version__, **spec,
                    "tracked_modules": [m.name for m in layout], "untracked_params": untracked,
                    "num_tracked": int(tracked_indices(layout).numel()), "checkpoint_factors": {}}
        root.mkdir(parents=True, exist_ok=True)
        _write_manifest(root, manifest)
    n = len(dataset)
    if config.max_examples is not None and config.max_examples < n:
        indices = np.sort(np.random.default_rng(config.subset_seed).choice(n, config.max_examples, replace=False))
    else:
        indices = np.arange(n)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=config.fisher == "empirical",
        covariance_max_examples=None, lambda_max_examples=None,
        activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
        per_sample_gradient_dtype=dtype, lambda_dtype=dtype, eigendecomposition_dtype=torch.float64,
    )
    for m, model in enumerate(models):
        key = str(m)
        if key in manifest["checkpoint_factors"]:
            log(f"checkpoint {m}: found existing factors, skipping")
            if progress:
                progress(m + 1, len(models))
            continue
        ckpt_dir = root / f"ckpt{m}"
        if ckpt_dir.exists():
            _clean_partial(ckpt_dir, log)
        t0 = time.perf_counter()
        data = model_space_dataset(dataset, model, latent_cache_dir)
        items = DrawItems(model, data, dataset, indices, scfg, config.fisher_samples)
        unet = prepare_model(copy.deepcopy(model.unet), make_task(model, manifest["tracked_modules"], config.sample_seed))
        task = make_task(model, manifest["tracked_modules"], config.sample_seed)
        analyzer = Analyzer("ckpt" + key, unet, task, cpu=model.device.type == "cpu", output_dir=str(root),
                            disable_tqdm=True, log_level=logging.WARNING, disable_model_save=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        analyzer.fit_all_factors("ekfac", items, per_device_batch_size=config.batch_size, factor_args=args)
        fdir = analyzer.factors_output_dir("ekfac")
        files = {str(p.resolve().relative_to(root.resolve())): sha256_file(p) for p in sorted(fdir.rglob("*.safetensors"))}
        manifest["checkpoint_factors"][key] = {
            "files": files, "fit_seconds": round(time.perf_counter() - t0, 2),
            "num_items": len(items), "num_examples": int(len(indices)),
            "bytes": int(sum((root / f).stat().st_size for f in files)),
        }
        _write_manifest(root, manifest)
        log(f"checkpoint {m}: factors fitted in {time.perf_counter() - t0:.1f} s")
        if progress:
            progress(m + 1, len(models))
    return manifest


def load_factors(store: Store, manifest: dict[str, Any], m: int, strategy: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per tracked module ``{"q_a", "q_s", "eigenvalues"}`` (float64) of checkpoint m for ``strategy``.

    Every file is checked against its recorded sha256 and read with safetensors.
    ``kfac``: eigenvalues = |T| * outer(eig_S, eig_A), |T| = positions per item (module doc);
    ``ekfac``: kronfluence's Lambda / items.
    """
    from safetensors.torch import load_file

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    entry = manifest["checkpoint_factors"].get(str(m))
    if entry is None:
        raise FactorError(f"factors of checkpoint {m} in {factors_dir(store)} are unfinished; "
                          f"run `attribution fit-factors --store {store.root}` again to finish them")
    root = factors_dir(store)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for rel, digest in entry["files"].items():
        path = root / rel
        if not path.exists() or sha256_file(path) != digest:
            raise FactorError(f"{path} is missing or does not match its checksum; delete {root} and fit again")
        tensors[path.stem] = load_file(path)
    items = float(entry["num_items"])
    out = {}
    for name in manifest["tracked_modules"]:
        f = {"q_a": tensors["activation_eigenvectors"][name].double(), "q_s": tensors["gradient_eigenvectors"][name].double()}
        if strategy == "ekfac":
            f["eigenvalues"] = tensors["lambda_matrix"][name].double() / float(tensors["num_lambda_processed"][name])
        else:
            positions = float(tensors["num_activation_covariance_processed"][name]) / items
            f["eigenvalues"] = positions * torch.outer(tensors["gradient_eigenvalues"][name].double(),
                                                       tensors["activation_eigenvalues"][name].double())
        out[name] = f
    return out


def factors_complete(store_dir: str | Path, num_checkpoints: int) -> bool:
    """True when ``<store_dir>/ekfac`` holds finished factors of every checkpoint (no hashing: a cheap check for UIs)."""
    path = Path(store_dir) / "ekfac" / "manifest.json"
    try:
        done = json.loads(path.read_text()).get("checkpoint_factors", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return all(str(m) in done for m in range(num_checkpoints))


def factor_bytes(store: Store) -> int:
    """Disk used by the factors of ``store`` (all files under ``<store>/ekfac``)."""
    root = factors_dir(store)
    return int(sum(p.stat().st_size for p in root.rglob("*") if p.is_file())) if root.exists() else 0


def delete_factors(store: Store) -> None:
    shutil.rmtree(factors_dir(store), ignore_errors=True)


# ---------------------------------------------------------------------- query side
class InfluenceQuery:
    """Query features of ``ekfac`` / ``kfac`` for :class:`attribution.scoring.Scorer`.

    For checkpoint m: ``(1/N) P_m (H_m + lambda_m I)^-1 grad_theta f_s`` (S, d), so that
    ``Phi_m @ feature`` is the influence of the module doc and the scorer only averages
    over checkpoints.
    """

    def __init__(self, preconditioners: list[Callable[[torch.Tensor], torch.Tensor]], num_train: int):
        self.preconditioners = preconditioners
        self.num_train = num_train

    @classmethod
    def from_store(cls, store: Store, models: Sequence[DiffusionModel], strategy: str, ridge: float,
                   params: Sequence[dict[str, torch.Tensor]]) -> "InfluenceQuery":
        """Load the factors of every checkpoint of ``store`` (raises :class:`FactorError` when absent)."""
        if store.config.proj_kind == "factorized":
            raise StoreError("EK-FAC needs a store whose projection applies to a whole gradient (sjlt, gaussian, identity)")
        manifest = open_manifest(store, models)
        pre = []
        for m, model in enumerate(models):
            layout, _ = tracked_layout(model, params[m])
            if [t.name for t in layout] != manifest["tracked_modules"]:
                raise FactorError(f"the tracked modules of {model.path} differ from those the factors were fitted on")
            pre.append(KroneckerPreconditioner(layout, load_factors(store, manifest, m, strategy), ridge))
        return cls(pre, store.num_train)

    def features(self, m: int, projector: Projector, target: GradientTarget, batch: DrawBatch) -> torch.Tensor:
        """(S, d) float32 preconditioned query features of checkpoint m; ``batch`` as for
        :meth:`~attribution.features.projection.Projector.step_features`."""
        g = per_step_grads(target.model, target.params, target.output, batch.x0, batch.timesteps, batch.noises,
                           batch.mask, batch.cond)  # (S, p), Eq. (3)
        v = self.preconditioners[m](g) / self.num_train
        return projector.project(v.to(g.device))


# ---------------------------------------------------------------------- exact oracle (tiny models)
def exact_gauss_newton(
    model: DiffusionModel,
    params: dict[str, torch.Tensor],
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    index: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The exact Gauss-Newton matrix (1/(B D)) sum_{b,d} (2/P) J_bd^T J_bd of the training loss (q, q) float64.

    x0 (B, C, H, W), timesteps (B, D), noises (B, D, C, H, W); J_bd = d p_theta(x_t,bd, tau(t_bd)) / d theta of the
    model's prediction, whatever its objective's target (P = C H W outputs); ``index``: flat positions (q,) of the parameters kept (None: all).
    Small models only: J is held whole (B D P x p).
    """
    from torch.func import jacrev

    others = {k: v.detach() for k, v in model.unet.named_parameters() if k not in params}
    buffers = {k: v.detach() for k, v in model.unet.named_buffers()}
    objective = model.objective
    b, d = timesteps.shape
    t = timesteps.reshape(-1).to(model.device)
    ca, cb = objective.coefficients(t)
    x_t = objective.noised(x0.to(model.device).repeat_interleave(d, 0), noises.flatten(0, 1).to(model.device), ca, cb)
    tau = objective.model_timesteps(t)
    c = None if cond is None else cond.repeat_interleave(d, 0)
    names = list(params)

    def prediction(*flat: torch.Tensor) -> torch.Tensor:
        sel = dict(zip(names, flat))
        return model.predict((sel, others, buffers), x_t, tau, c).reshape(-1)

    jac = jacrev(prediction, argnums=tuple(range(len(names))))(*[params[k] for k in names])
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1).double()  # (B D P, p)
    if index is not None:
        J = J[:, index]
    pixels = x0[0].numel()
    return (2.0 / pixels) * (J.T @ J) / (b * d)
