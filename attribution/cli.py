"""``attribution`` command line: train, featurize, attribute, build-assets, doctor.

Every long command shows a tqdm progress bar; bad input ends with a one-line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from tqdm import tqdm

from .config import (
    DRAW_SHARINGS,
    INVERSION_REFINE_ITERS,
    PROJECTION_KINDS,
    TIMESTEP_SAMPLINGS,
    TRAIN_OUTPUTS,
    FeaturizeConfig,
    QueryConfig,
    SamplingConfig,
    TrainConfig,
    setting_help,
)
from .features.outputs import METHODS
from .scoring.baselines import BASELINE_METHODS
from .tools.allocator import tune_malloc

if TYPE_CHECKING:  # annotations only: these import torch models (seconds) that errors must not wait for
    from .models.base import DiffusionModel
    from .sampling.trajectory import Trajectory
    from .scoring.anchored import AnchoredScorer
    from .scoring.scorer import Scorer


class _LazyBar:
    """A tqdm bar created at the first progress report, so errors before any work print no bar."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar: tqdm | None = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit="it", dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bar(desc: str) -> tuple[_LazyBar, Callable[[int, int], None]]:
    bar = _LazyBar(desc)
    return bar, bar.update


def _steps(spec: str, num_steps: int) -> list[int]:
    if spec == "all":
        return list(range(num_steps))
    try:
        steps = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps must be 'all' or a comma-separated list of step indices, not {spec!r}") from None
    if not steps:
        raise ValueError(f"--steps {spec!r} selects no step; give 'all' or step indices such as "
                         f"0,{num_steps // 2},{num_steps - 1}")
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"steps {bad} are outside [0, {num_steps})")
    return steps


def cmd_train(args: argparse.Namespace) -> None:
    from .data.datasets import load_dataset
    from .models.training import train_ddpm

    ds = load_dataset(args.data, image_shape=None if args.data.startswith("digits") else (args.channels, args.size, args.size))
    subset = None
    if args.subset_mask:
        subset = np.load(args.subset_mask, allow_pickle=False)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, ema_decay=args.ema_decay,
        block_out_channels=tuple(args.block_out_channels), layers_per_block=args.layers_per_block,
    )
    bar, update = _bar("train")
    images = ds.images(np.arange(len(ds)))
    if args.coupled and subset is None:
        raise ValueError("--coupled needs --subset-mask")
    train_ddpm(images, args.out, cfg, subset=subset, progress=update, log=tqdm.write, coupled=args.coupled,
               prediction=args.prediction, shift=args.shift)
    bar.close()
    print(f"saved {args.out}")


def _load_with_lora(paths, lora_dirs, device):
    """The models of ``paths`` with trained LoRA weights loaded (one directory, or one per model)."""
    from .models.load import load_models

    models = load_models(paths, device)
    if lora_dirs:
        from .models.lora import apply_lora

        apply_lora(models, lora_dirs)
    return models


def cmd_featurize(args: argparse.Namespace) -> None:
    from .features.store import Store, StoreError, settings_mismatch, store_lock

    if args.anchors and args.distributed:
        raise ValueError("--anchors cannot be combined with --distributed yet: featurize each anchor's store alone")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
    cfg = FeaturizeConfig(
        output=args.output,
        proj_dim=args.proj_dim,
        proj_kind=args.projection,
        proj_seed=args.proj_seed,
        num_draws=args.num_draws,
        timestep_sampling=args.timestep_sampling,
        timestep_range=tuple(args.timestep_range) if args.timestep_range else None,
        store_dtype="float16" if args.half else "float32",
        param_filter=tuple(args.params) if args.params else (("re:lora_",) if args.lora else None),
        draw_sharing=args.draw_sharing,
        draw_seed=args.draw_seed,
    )
    _model_dirs(args.model)
    if not (args.data == "digits" or args.data.startswith("digits:") or Path(args.data).exists()):
        raise ValueError(f"--data {args.data!r} is neither 'digits', an .npz file nor an image folder")
    if not args.anchors and (args.store / "manifest.json").exists():  # resuming: the settings must match
        why = settings_mismatch(Store.open(args.store).manifest["settings"], cfg)
        if why is not None:
            raise StoreError(f"store {args.store} does not match: {why}. Use another --store directory or rebuild it.")
    if args.distributed and _distributed_rank() != 0:
        return _featurize(args, cfg)
    with store_lock(args.store):  # refuses at once, before loading anything, when another featurize holds it
        return _featurize(args, cfg)


def _distributed_rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    import os

    return int(os.environ.get("RANK", "0"))


def _featurize(args: argparse.Namespace, cfg: FeaturizeConfig) -> None:
    """The body of ``featurize`` once its arguments are checked (and the store locked, on rank 0)."""
    from .data.datasets import load_dataset
    from .features.featurize import featurize
    from .models.base import resolve_device

    tune_malloc()  # this process only featurizes: keep freed memory for the next chunk
    device = resolve_device(args.device)
    rank, world_size = 0, 1
    if args.distributed:
        from .features.distributed import init_from_env, local_device

        device = local_device(device)
        rank, world_size = init_from_env(device)
    models = _load_with_lora(args.model, args.lora, device)
    ds = load_dataset(args.data, models[0].pixel_shape)
    if args.distributed:
        from .features.distributed import featurize_distributed, shutdown

        bar, update = _bar(f"featurize (rank 0 of {world_size})") if rank == 0 else (None, None)
        try:
            featurize_distributed(models, ds, args.store, cfg, rank=rank, world_size=world_size,
                                  batch_size=args.batch_size, progress=update, log=tqdm.write)
        finally:
            if bar is not None:
                bar.close()
            shutdown()
        if rank == 0:
            print(f"store ready: {args.store} ({world_size} processes)")
        return
    bar, update = _bar("featurize")
    if args.anchors:
        from .scoring.anchored import featurize_anchored

        featurize_anchored(models, ds, args.store, args.anchors, cfg, progress=update, log=tqdm.write,
                           batch_size=args.batch_size)
    else:
        featurize(models, ds, args.store, cfg, batch_size=args.batch_size, progress=update, log=tqdm.write)
    bar.close()
    print(f"store ready: {args.store}")


def _npz_path(out: Path) -> Path:
    """The file ``--out`` really names: ``.npz`` appended as numpy does; refused if it is a directory."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the .npz file to write, e.g. --out {out / 'scores.npz'}")
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the directory {out.parent} does not exist")
    return out


def _model_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """The --model directories (or the store's recorded ones), each checked to exist."""
    missing = [str(p) for p in paths if not Path(p).is_dir()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"model directory {missing[0]} does not exist{more}")
    return [Path(p) for p in paths]


def _check_attribute_args(args: argparse.Namespace) -> tuple[Path, QueryConfig, list[Path], str | None]:
    """Everything ``attribute`` can check before loading models (flags, store, files): returns the out
    path, the query settings, the model directories and the baseline's name (None: a store method).

    Raises:
        ValueError, StoreError: a bad flag or file, a store that cannot be opened or does not fit the method.
    """
    from .data.datasets import decode_image
    from .scoring.anchored import checkpoint_dirs, reference_store
    from .scoring.masks import mask_from_file

    out = _npz_path(args.out)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, not {args.top_k}")
    query = QueryConfig(num_resamples=args.num_resamples, ridge=args.ridge)
    if args.num_steps < 1:
        raise ValueError(f"--num-steps must be at least 1, not {args.num_steps}")
    _steps(args.steps, args.num_steps)
    store = reference_store(args.store)
    baseline = BASELINE_METHODS.get(args.method)
    if baseline is None and store.config.output != METHODS[args.method].train_output:
        need = METHODS[args.method].train_output
        raise ValueError(f"method {args.method!r} needs a store of --output {need}, but {args.store} holds "
                         f"{store.config.output!r} features; featurize one with --output {need}")
    dirs = _model_dirs(args.model or checkpoint_dirs(args.store))
    if args.image:
        decode_image(Path(args.image), (1, 8, 8))  # decodes (any size: it is resized for the model later)
    if args.mask:  # the store's image shape has the model's aspect ratio (latent or not)
        mask_from_file(args.mask, tuple(store.manifest["dataset"]["image_shape"][1:]))
    return out, query, dirs, baseline


def _spot_check(scorer: Scorer | AnchoredScorer, models: list[DiffusionModel], data: str | None) -> None:
    """Recompute one stored row per checkpoint and refuse the store if it differs (an edited manifest)."""
    from .data.datasets import ImageDecodeError, load_dataset
    from .features.verify import spot_check

    store = scorer.store
    spec = data or store.manifest["dataset"]["name"]
    try:
        dataset = load_dataset(spec, models[0].pixel_shape)
    except (OSError, ValueError, ImageDecodeError) as e:
        if data is not None:
            raise
        print(f"note: stored rows not spot-checked: the store's dataset {spec!r} cannot be loaded ({_one_line(e)}); "
              "pass --data", file=sys.stderr)
        return
    spot_check(store, models, dataset, getattr(scorer, "projectors", None))  # an AnchoredScorer: built there


def _baseline_scores(name: str, traj: Trajectory, steps: list[int], mask: np.ndarray | None,
                     models: list[DiffusionModel], data: str | None, store_dir: Path) -> np.ndarray:
    """Pixel or embedding similarity scores (S, N) of the trajectory's x0_hat at ``steps``; ``mask``: (H, W)
    in [0, 1] at the model's pixel size or None; ``data``: the training set (default: the store's)."""
    import torch

    from .data.datasets import load_dataset
    from .scoring.anchored import reference_store
    from .scoring.baselines import SimilarityBaseline, baseline_scores
    from .scoring.masks import prepare_mask

    pixel_shape = tuple(models[0].pixel_shape)
    dataset = load_dataset(data or reference_store(store_dir).manifest["dataset"]["name"], pixel_shape)
    embed = None
    if name == "embedding":
        if pixel_shape[0] != 1:
            raise ValueError("the embedding baseline of the command line uses the bundled digit classifier "
                             "(1-channel images); for other models use the app")
        from .evaluation.scores import classifier_embed

        embed = classifier_embed()
    mask_t = prepare_mask(mask, pixel_shape) if mask is not None else None
    with torch.no_grad():
        return baseline_scores(SimilarityBaseline(dataset, embed, name), traj.display_x0_hat[steps], mask_t)


def cmd_attribute(args: argparse.Namespace) -> None:
    out, query, paths, baseline = _check_attribute_args(args)  # before the slow part: loading models

    from .data.datasets import decode_image
    from .models.base import resolve_device
    from .sampling.inversion import invert_image
    from .sampling.trajectory import sample_trajectory
    from .scoring.anchored import open_scorer
    from .scoring.masks import mask_from_file
    from .scoring.scorer import top_k

    device = resolve_device(args.device)
    models = _load_with_lora(paths, args.lora, device)
    scorer = None
    if baseline is None:
        scorer = open_scorer(args.store, models, args.method, query)
        _spot_check(scorer, models, args.data)
    if args.image:
        image = decode_image(Path(args.image), models[0].pixel_shape)
        traj = invert_image(models[0], image, args.num_steps, prompt=args.prompt, refine_iters=args.inversion_iters)
    else:
        traj = sample_trajectory(
            models[0],
            SamplingConfig(num_inference_steps=args.num_steps, seed=args.seed, scheduler=args.scheduler),
            prompt=args.prompt,
            guidance_scale=args.guidance_scale,
        )
    steps = _steps(args.steps, traj.num_steps)
    mask = None
    if args.mask:
        mask, note = mask_from_file(args.mask, tuple(models[0].pixel_shape[1:]))
        if note:
            print(f"note: {note}", file=sys.stderr)
    if baseline is not None:
        scores = _baseline_scores(baseline, traj, steps, mask, models, args.data, args.store)
        method = f"baseline-{baseline}"
    else:
        bar, update = _bar("attribute")
        result = scorer.score(traj, steps, mask, progress=update)
        bar.close()
        scores, method = result.scores, result.method
    pos, neg = top_k(scores, args.top_k)
    np.savez_compressed(
        out,
        scores=scores,
        steps=np.asarray(steps),
        timesteps=traj.timesteps[steps].numpy(),
        x_t=traj.x_t[steps].numpy(),
        x0_hat=traj.x0_hat[steps].numpy(),
        sample=traj.sample.numpy(),
        top_positive=pos,
        top_negative=neg,
        method=np.array(method),
    )
    print(f"wrote {out}: scores {scores.shape}; last step top positive {pos[-1][:5].tolist()}")


def _store_with_models(args: argparse.Namespace):
    """The store ``args.store`` checked against its models (``--model``, default those it records, with
    ``--lora``) and training set (``--data``): (store, models, dataset)."""
    from .data.datasets import load_dataset
    from .features.featurize import store_spec
    from .features.store import Store
    from .models.base import resolve_device

    store = Store.open(args.store)
    paths = args.model or [args.store / c["path"] for c in store.manifest["checkpoints"]]
    models = _load_with_lora(paths, args.lora, resolve_device(args.device))
    ds = load_dataset(args.data, models[0].pixel_shape)
    return Store.open(args.store, store_spec(models, ds, store.config, args.store)), models, ds


def cmd_fit_group_weights(args: argparse.Namespace) -> None:
    from .config import QueryConfig
    from .scoring.group_fit import fit_group_weights
    from .scoring.group_weights import save_group_weights

    store, models, ds = _store_with_models(args)
    query = QueryConfig(ridge=args.ridge, num_resamples=args.num_resamples)
    bar, update = _bar("self-queries (query x checkpoint)")
    fit = fit_group_weights(store, models, ds, query, num_self=args.num_self, self_seed=args.seed, fit_share=args.fit_share,
                            progress=update)
    bar.close()
    path = save_group_weights(store, fit)
    print("group weights: " + ", ".join(f"{n} {w:.3f}" for n, w in fit.weights.to_dict().items()))
    print(f"held-out self z-score: {fit.held_out_zscore:.2f} (uniform weights {fit.held_out_zscore_uniform:.2f}, "
          f"one joint kernel {fit.held_out_zscore_joint:.2f})")
    print(f"wrote {path}; score with `attribution attribute --method journey-groups --ridge {fit.ridge:g}`")


def cmd_fit_factors(args: argparse.Namespace) -> None:
    from .scoring.ekfac import EkfacConfig, factor_bytes, fit_factors

    store, models, ds = _store_with_models(args)
    cfg = EkfacConfig(fisher=args.fisher, max_examples=args.max_examples, batch_size=args.batch_size)
    bar, update = _bar("fit factors (checkpoints)")
    fit_factors(store, models, ds, cfg, progress=update, log=tqdm.write)
    bar.close()
    print(f"factors ready: {args.store / 'ekfac'} ({factor_bytes(store) / 2**20:.1f} MiB); "
          "score with `attribution attribute --method ekfac` or `--method kfac`")


def cmd_build_assets(args: argparse.Namespace) -> None:
    from .tools.assets import build_assets, verify_assets
    from .workspace.bundles import ASSETS_DIR

    assets = args.assets or ASSETS_DIR
    if args.verify:
        problems = verify_assets(assets)
        for p in problems:
            print(p)
        if problems:
            raise ValueError(f"{len(problems)} problem(s) in {assets}")
        print(f"{assets}: all files match MANIFEST.json")
        return
    bars: list[tqdm] = []

    def factory(name: str) -> Callable[[int, int], None]:
        bar, update = _bar(name)
        bars.append(bar)
        return update

    build_assets(assets, epochs=args.epochs, progress_factory=factory, log=tqdm.write)
    for bar in bars:
        bar.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from .tools.doctor import healthy, run_doctor

    if args.rows < 0:
        raise ValueError(f"--rows must be 0 or more, not {args.rows}")
    findings = run_doctor(args.store, args.model, args.data, record_checksums=args.record_checksums, rows=args.rows,
                          bind_settings=args.bind_settings)
    for f in findings:
        if f.level != "ok" or args.verbose:
            print(f.line())
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    print(f"{args.store}: " + ("healthy" if healthy(findings) else f"{errors} problem(s)") +
          (f", {warnings} warning(s)" if warnings else ""))
    return 0 if healthy(findings) else 1


def _store_workspace(store: Path, models: list[Path] | None, data: str, classifier: Path | None, device: str):
    """A :class:`Workspace` over ``store``: the bundled default when it is the bundled store, else the store's
    (or ``models``') checkpoints on ``data``, with ``classifier`` if given."""
    from dataclasses import replace

    from .scoring.anchored import checkpoint_dirs
    from .workspace import Workspace, custom_bundle, default_bundle

    default = default_bundle()
    if not models and store.resolve() == Path(default.stores["loss"]).resolve():
        bundle = default
    else:
        bundle = custom_bundle(models or checkpoint_dirs(store), data, store)
        bundle = replace(bundle, classifier_dir=classifier, roots=())
    return Workspace(bundle, device=device)


def cmd_counterfactual(args: argparse.Namespace) -> None:
    import shutil

    from .workspace import SampleRecipe

    if args.k < 1:
        raise ValueError("--k must be at least 1")
    ws = _store_workspace(args.store, args.model, args.data, args.classifier, args.device)
    if args.cache:
        ws.counterfactual_cache = args.cache
    if args.image:
        recipe = SampleRecipe.uploaded(args.image.read_bytes(), args.image.name)
    else:
        recipe = SampleRecipe.generated(args.seed)
    recipe = replace(recipe, num_steps=args.num_steps)
    key, traj = ws.sample(recipe)
    if not 0 <= args.step < traj.num_steps:
        raise ValueError(f"--step must be in [0, {traj.num_steps}), not {args.step}")
    request = ws.counterfactual_request(key, args.step, args.remove, args.k, args.method, args.random_seed)
    cached = ws.counterfactual_result(request) is not None
    bar, update = _bar(f"counterfactual {request.label()} (retrain)")
    result = ws.run_counterfactual(request, progress=update, log=tqdm.write)
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in result.path.iterdir():
        shutil.copy(f, args.out / f.name)
    m = result.meta["metrics"]
    changed = m.get("class_changed")
    print(f"{'from cache: ' if cached else ''}{request.label()} of {key} at step {args.step}: pixel l2 {m['pixel_l2']:.3f}, "
          f"delta f_t measured {m['measured_delta_f']:+.4g} vs predicted {m['predicted_delta_f']:+.4g}"
          + ("" if changed is None else f", class {m['class_original']} -> {m['class_new']}")
          + f"; wrote {args.out}")


def _setting(parser: argparse.ArgumentParser, flag: str, cls: type, name: str, **kw) -> None:
    """A flag for setting ``name`` of the config dataclass ``cls``: its default and its help text come from ``cls``."""
    default = next(f.default for f in fields(cls) if f.name == name)
    if isinstance(default, tuple):
        default = list(default)
    parser.add_argument(flag, default=default, help=kw.pop("help", setting_help(cls, name)), **kw)


def build_parser(bench: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``bench=False`` lists ``bench`` without building its subcommands."""
    p = argparse.ArgumentParser(prog="attribution", description="Step-by-step data attribution for diffusion models")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a diffusion model (DDPM or flow matching) on a dataset or a subset of it")
    t.add_argument("--data", default="digits", help="training set: 'digits', an image folder or an .npz")
    t.add_argument("--out", required=True, type=Path, help="directory to save the trained pipeline in")
    t.add_argument("--seed", type=int, default=0, help=setting_help(TrainConfig, "seed"))
    _setting(t, "--epochs", TrainConfig, "epochs", type=int)
    _setting(t, "--batch-size", TrainConfig, "batch_size", type=int)
    _setting(t, "--lr", TrainConfig, "lr", type=float)
    _setting(t, "--ema-decay", TrainConfig, "ema_decay", type=float)
    _setting(t, "--block-out-channels", TrainConfig, "block_out_channels", type=int, nargs="+")
    _setting(t, "--layers-per-block", TrainConfig, "layers_per_block", type=int)
    t.add_argument("--subset-mask", type=Path, help=".npy bool mask (N,) of training examples to keep")
    t.add_argument("--coupled", action="store_true",
                   help="with --subset-mask: replay the full-data run of --seed (shuffling, timesteps, noises) and "
                        "drop the other rows from each minibatch, instead of a fresh run over the subset")
    t.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction", "sample", "flow"],
                   help="training objective: epsilon, v or sample prediction on a DDPM schedule, or flow matching")
    t.add_argument("--shift", type=float, default=1.0, help="--prediction flow: the sigma shift of its scheduler")
    t.add_argument("--size", type=int, default=32, help="image size for image folders")
    t.add_argument("--channels", type=int, default=3, help="channels for image folders")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("featurize", help="compute train features of every checkpoint into a store")
    f.add_argument("--model", action="append", required=True, help="diffusers model directory (repeat for an ensemble)")
    f.add_argument("--data", default="digits", help="training set: 'digits', an image folder or an .npz")
    f.add_argument("--store", required=True, type=Path, help="store directory to create or resume")
    _setting(f, "--proj-dim", FeaturizeConfig, "proj_dim", type=int)
    _setting(f, "--projection", FeaturizeConfig, "proj_kind", choices=list(PROJECTION_KINDS),
             help="random projection: sjlt (sparse sign sketch), gaussian (dense), identity (no projection) or "
                  "factorized (per-layer Kronecker, without per-example gradients)")
    f.add_argument("--proj-seed", type=int, default=0, help=setting_help(FeaturizeConfig, "proj_seed"))
    _setting(f, "--num-draws", FeaturizeConfig, "num_draws", type=int, help="(timestep, noise) draws per example")
    _setting(f, "--timestep-sampling", FeaturizeConfig, "timestep_sampling", choices=list(TIMESTEP_SAMPLINGS),
             help="how the draws' timesteps are chosen (even: 0, T/D, 2T/D, ... as D-TRAK)")
    f.add_argument("--timestep-range", type=int, nargs=2, metavar=("LO", "HI"),
                   help="draw timesteps from [LO, HI) only (default: all T); LO LO+1 matches one sampling step")
    f.add_argument("--output", default="loss", choices=list(TRAIN_OUTPUTS),
                   help="model output: loss (journey-TRAK) or square/l1/l2/mean (D-TRAK)")
    f.add_argument("--params", nargs="*", help="parameter-name prefixes to differentiate (default: all; with --lora: re:lora_)")
    f.add_argument("--lora", action="append", help="trained LoRA weights (peft dir or pytorch_lora_weights.safetensors); one, or one per --model")
    f.add_argument("--half", action="store_true", help="store features in float16")
    f.add_argument("--anchors", type=int, nargs="+",
                   help="build an anchored store: one store per anchor timestep, with --num-draws common draws at "
                        "exactly that timestep; queries use the nearest anchor and its noises (attribution.scoring.anchored)")
    f.add_argument("--draw-seed", type=int, default=FeaturizeConfig.draw_seed,
                   help="seed of the (timestep, noise) draws")
    f.add_argument("--draw-sharing", choices=list(DRAW_SHARINGS), default=FeaturizeConfig.draw_sharing,
                   help="per-example: each example draws its own (timestep, noise) pairs; common: every example "
                        "shares the same pairs (common random numbers)")
    f.add_argument("--batch-size", type=int, default=64, help="examples per store write (gradients are chunked inside)")
    f.add_argument("--device", default="auto", help="cpu, cuda or auto")
    f.add_argument(
        "--distributed",
        action="store_true",
        help="run under torchrun (torchrun --nproc_per_node=N -m attribution.cli featurize --distributed ...): "
        "process r featurizes rows i %% N == r into the same store; rank 0 creates and finalizes it "
        "(gloo on CPU, nccl with one GPU per process)",
    )
    f.set_defaults(func=cmd_featurize)

    a = sub.add_parser("attribute", help="score every training example at the steps of a sample")
    a.add_argument("--store", required=True, type=Path, help="store built by featurize")
    a.add_argument("--model", action="append", help="model directories (default: those recorded in the store)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=int, help="generate a sample from this seed")
    src.add_argument("--image", type=Path, help="attribute an image file (DDIM inversion)")
    a.add_argument("--steps", default="all", help="'all' or comma-separated step indices")
    _setting(a, "--num-steps", SamplingConfig, "num_inference_steps", type=int, help="sampling steps")
    a.add_argument("--inversion-iters", type=int, default=INVERSION_REFINE_ITERS,
                   help="with --image: fixed-point refinements per DDIM inversion step (0: plain inversion)")
    _setting(a, "--scheduler", SamplingConfig, "scheduler", choices=["ddim", "ddpm"])
    a.add_argument("--lora", action="append", help="the LoRA weights the store was built with (as for featurize)")
    _setting(a, "--prompt", SamplingConfig, "prompt", help="text prompt (text-conditional models)")
    _setting(a, "--guidance-scale", SamplingConfig, "guidance_scale", type=float,
             help="classifier-free guidance (text-conditional models)")
    a.add_argument("--mask", type=Path,
                   help="image whose pixels brighter than mid-grey (gray level > 127 of 255) select the patch; "
                        "at the model's size, or at another size of the same aspect ratio (then box-averaged)")
    a.add_argument("--method", default="journey", choices=[*METHODS, *BASELINE_METHODS], metavar="METHOD",
                   help="attribution method (ekfac/kfac need `attribution fit-factors`; --ridge is then their relative damping): "
                        + "; ".join(f"{n} ({m.label})" for n, m in METHODS.items())
                        + "; baseline-pixel or pixel, baseline-embedding or embedding (cosine similarity of x0_hat "
                          "with each training image, in pixels or the digit classifier's embedding; no store features)")
    a.add_argument("--data",
                   help="the store's training set (default: the one recorded in the store): for the baselines and "
                        "the check of a stored row recomputed from the models")
    _setting(a, "--num-resamples", QueryConfig, "num_resamples", type=int, help="K in Eq. (3)")
    _setting(a, "--ridge", QueryConfig, "ridge", type=float)
    a.add_argument("--top-k", type=int, default=10, help="influencers each way to print and save")
    a.add_argument("--device", default="auto", help="cpu, cuda or auto")
    a.add_argument("--out", required=True, type=Path, help="output .npz of the scores")
    a.set_defaults(func=cmd_attribute)
    k = sub.add_parser("fit-factors", help="fit the EK-FAC/K-FAC Hessian factors of a loss store's checkpoints (kronfluence)")
    k.add_argument("--store", required=True, type=Path, help="a store built with --output loss")
    k.add_argument("--model", action="append", help="model directories (default: those recorded in the store)")
    k.add_argument("--data", default="digits", help="the store's training set")
    k.add_argument("--lora", action="append", help="the LoRA weights the store was built with")
    k.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled",
                   help="sampled: true Fisher (= Gauss-Newton in expectation); empirical: the loss's own gradients")
    k.add_argument("--max-examples", type=int, help="fit on a random subset of this many training examples")
    k.add_argument("--batch-size", type=int, default=64, help="(example, draw) items per batch")
    k.add_argument("--device", default="auto", help="cpu, cuda or auto")
    k.set_defaults(func=cmd_fit_factors)
    w = sub.add_parser("fit-group-weights", help="fit the label-free block weights of journey-groups on a "
                       "block-sjlt loss store (self-retrieval of training images)")
    w.add_argument("--store", required=True, type=Path, help="a store built with --projection block-sjlt --output loss")
    w.add_argument("--model", action="append", help="model directories (default: those recorded in the store)")
    w.add_argument("--data", default="digits", help="the store's training set")
    w.add_argument("--lora", action="append", help="the LoRA weights the store was built with")
    _setting(w, "--ridge", QueryConfig, "ridge", type=float,
             help="relative ridge of the per-group kernels (the fit is kept per ridge; queries use the one of their ridge)")
    _setting(w, "--num-resamples", QueryConfig, "num_resamples", type=int, help="K noises of each self-query (Eq. 3)")
    w.add_argument("--num-self", type=int, default=800, help="self-queries: (training image, sampling timestep) pairs")
    w.add_argument("--fit-share", type=float, default=0.5, help="share of the self-queries fitted on; the rest is held out")
    w.add_argument("--seed", type=int, default=12345, help="seed of the self-queries' images, timesteps and noises")
    w.add_argument("--device", default="auto", help="cpu, cuda or auto")
    w.set_defaults(func=cmd_fit_group_weights)
    c = sub.add_parser("counterfactual", help="remove a sample's top influencers (or random ones, or a class), "
                       "retrain the generating checkpoint without them, regenerate from the same noise")
    c.add_argument("--store", required=True, type=Path, help="store built by featurize (the bundled one: assets/store/journey)")
    c.add_argument("--model", action="append", type=Path, help="model directories (default: those recorded in the store)")
    c.add_argument("--data", default="digits", help="the store's training set (ignored for the bundled store)")
    c.add_argument("--classifier", type=Path, help="digit classifier for class probabilities (the bundled store uses its own)")
    cs = c.add_mutually_exclusive_group(required=True)
    cs.add_argument("--seed", type=int, help="the sample's seed")
    cs.add_argument("--image", type=Path, help="an image file (regenerated from its DDIM-inverted noise)")
    c.add_argument("--step", type=int, required=True, help="step whose scores choose what to remove (0 = noisiest)")
    c.add_argument("--remove", default="top", help="top (positive influencers), bottom (negative), random (the control) "
                   "or class:C (every training image of class C)")
    c.add_argument("--k", type=int, default=100, help="how many images to remove (ignored by class:C)")
    c.add_argument("--method", default="journey", choices=list(METHODS), metavar="METHOD",
                   help="attribution method whose scores rank the images")
    c.add_argument("--random-seed", type=int, default=0, help="seed of --remove random (the draw does not depend on the sample)")
    _setting(c, "--num-steps", SamplingConfig, "num_inference_steps", type=int, help="sampling steps")
    c.add_argument("--device", default="cpu", help="where to retrain: cpu or cuda (one retraining of the bundled "
                   "checkpoint: about 8 min on 2 CPU cores)")
    c.add_argument("--cache", type=Path, help="result cache (default: $ATTRIBUTION_CACHE/counterfactuals); a rerun "
                   "resumes an interrupted retraining and a finished one is read back")
    c.add_argument("--out", required=True, type=Path, help="directory to copy the result into (PNGs + result.json)")
    c.set_defaults(func=cmd_counterfactual)
    b = sub.add_parser("build-assets", help="rebuild the bundled default under assets/ (skips what exists)")
    b.add_argument("--assets", type=Path, help="assets directory (default: the repo's assets/)")
    _setting(b, "--epochs", TrainConfig, "epochs", type=int)
    b.add_argument("--verify", action="store_true", help="only check the files against MANIFEST.json")
    b.set_defaults(func=cmd_build_assets)
    d = sub.add_parser("doctor", help="verify a store, its model directories and data; print what is wrong and the fix")
    d.add_argument("--store", required=True, type=Path, help="store directory to check")
    d.add_argument("--model", action="append", help="model directories (default: those recorded in the store)")
    d.add_argument("--data", help="dataset spec to compare with the store's ('digits', a folder, an .npz)")
    d.add_argument("--record-checksums", action="store_true",
                   help="add row checksums to a store written without them (trusts its current contents)")
    d.add_argument("--bind-settings", action="store_true",
                   help="for a store written before settings were bound: once every check passes and the recomputed "
                        "rows match, record the manifest's settings beside the rows (later edits are then refused)")
    d.add_argument("--rows", type=int, default=3,
                   help="rows per checkpoint recomputed from the models and compared with the stored ones "
                        "(catches a manifest whose settings were edited; 0: skip)")
    d.add_argument("-v", "--verbose", action="store_true", help="also print the checks that passed")
    d.set_defaults(func=cmd_doctor)

    if bench:
        from .evaluation.commands import add_bench_parser

        add_bench_parser(sub)
    else:  # listed only: its parser imports the benchmark's modules (seconds), which other commands never need
        from .evaluation import BENCH_HELP

        sub.add_parser("bench", help=BENCH_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(bench=bool(argv) and argv[0] == "bench").parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # end a half-drawn bar's line first
            bar.close()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line (some library messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
