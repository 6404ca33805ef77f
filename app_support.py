"""Shared pieces of the Streamlit front end: the workspace, the current sample, widgets, grids, exports.

Pages stay thin: they read the session state, call the :class:`~attribution.workspace.workspace.Workspace`
and draw with the helpers here. Nothing in this module does attribution math; the
few array manipulations below are display conversions (upscaling, masks from a
drawing, picking rows for a table).

Session-state keys used across pages:
    ``sample``       recipe of the current sample: ``{"kind": "seed", "seed": int}`` or
                     ``{"kind": "upload", "name": str, "data": bytes}``
    ``sample_key``   the workspace key of its trajectory
    ``step``         the selected denoising step (slider, kept across pages)
    ``method``       the selected attribution method (kept across pages)
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import shlex
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import streamlit as st
from PIL import Image, ImageDraw, ImageFont

from attribution.config import FeaturizeConfig
from attribution.data import ImageDecodeError, model_to_uint8
from attribution.sampling import Trajectory
from attribution.scoring import top_k
from attribution.tools import PathEscapeError, resolve_within, safe_name
from attribution.workspace import ASSETS_DIR, CACHE_DIR, Bundle, Workspace, custom_bundle, default_bundle

POSITIVE_COLOR = "#1a9850"
NEGATIVE_COLOR = "#d73027"
NEUTRAL_COLOR = "#6b7280"
DTRAK_OUTPUTS = {"square": "D-TRAK, ||ε||²", "l1": "D-TRAK, L1 norm", "l2": "D-TRAK, L2 norm", "mean": "D-TRAK, mean"}
BUNDLE_ENV = "ATTRIBUTION_BUNDLE"
Kind = Literal["positive", "negative"]
METHOD_BLURBS = {
    "journey": "step-specific TRAK on the denoising loss (the paper's method)",
    "tracin": "sum of gradient dot products over checkpoints",
    "retrac": "TracIn with normalized gradients (less bias to a few large-gradient images)",
    "dtrak-square": "TRAK on ||ε||² instead of the loss",
    "dtrak-l1": "TRAK on the L1 norm of ε",
    "dtrak-l2": "TRAK on the L2 norm of ε",
    "dtrak-mean": "TRAK on the mean of ε",
    "baseline-pixel": "pixel similarity to x̂0 (no model gradients)",
    "baseline-embedding": "classifier-embedding similarity to x̂0",
}
METHOD_SHORT = {
    "journey": "journey-TRAK", "tracin": "TracIn", "retrac": "ReTrac", "dtrak-square": "D-TRAK ‖ε‖²",
    "dtrak-l1": "D-TRAK L1", "dtrak-l2": "D-TRAK L2", "dtrak-mean": "D-TRAK mean",
    "baseline-pixel": "pixel sim.", "baseline-embedding": "embedding sim.",
}


# ---------------------------------------------------------------------------- workspace
def bundle_from_dir(root: str | Path) -> Bundle:
    """A bundle laid out as ``root/m0, m1, ...`` (diffusers dirs) + ``root/store`` (journey store).

    Optional: ``root/data.npz`` (training images + labels; default: the bundled
    digits) and ``root/store-{square,l1,l2,mean}`` for the D-TRAK stores.
    """
    root = Path(root)
    model_dirs = tuple(sorted((p for p in root.glob("m*") if (p / "model_index.json").exists()), key=lambda p: p.name))
    if not model_dirs:
        raise FileNotFoundError(f"{BUNDLE_ENV}={root} holds no model directories m0, m1, ...")
    data = str(root / "data.npz") if (root / "data.npz").exists() else "digits"
    stores = {"loss": root / "store", **{o: root / f"store-{o}" for o in DTRAK_OUTPUTS}}
    featurize = FeaturizeConfig()
    manifest = root / "store" / "manifest.json"
    if manifest.exists():  # build the D-TRAK stores with the journey store's settings
        featurize = FeaturizeConfig.from_dict(json.loads(manifest.read_text())["settings"])
    return Bundle(
        name=f"Custom bundle ({root.name})",
        model_dirs=model_dirs,
        data=data,
        stores=stores,
        classifier_dir=ASSETS_DIR / "classifier",
        featurize=featurize,
        roots=(root, CACHE_DIR),
    )


THREADS_ENV = "ATTRIBUTION_TORCH_THREADS"


def configure_torch_threads() -> int:
    """One intra-op torch thread per Python thread by default (``$ATTRIBUTION_TORCH_THREADS`` overrides).

    The app scores the step on screen and prefetches the others in a background
    thread at the same time; with torch's default of one OpenMP thread per core,
    the two fight over the cores, and on a busy 2-core machine a UNet forward
    measured 100x slower (0.56 s instead of 5.6 ms; one journey step 18-250 s
    instead of 0.5-1 s).
    """
    import torch

    n = int(os.environ.get(THREADS_ENV, "1"))
    torch.set_num_threads(n)
    return n


class ScoringGate:
    """One gradient computation at a time, the page's request before the background job's.

    Workaround for a race in the core: ``torch.func.functional_call`` swaps the
    parameters of the shared UNet during a call, so two threads scoring at once
    (the step on screen + ``ws.prefetch``) get wrong gradients (measured: 4 of 20
    steps off by 38-55 % of their largest score), and the wrong rows are cached.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = 0  # page (foreground) requests waiting for the lock

    @contextmanager
    def hold(self, background: bool):
        if background:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._waiting == 0)
                if self._lock.acquire(timeout=0.05):
                    break
        else:
            with self._cond:
                self._waiting += 1
            self._lock.acquire()
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()
        try:
            yield
        finally:
            self._lock.release()


def serialize_scoring(ws: Workspace) -> Workspace:
    """Route ``ws.scores`` (also what its prefetch thread calls) through a :class:`ScoringGate`."""
    gate = ScoringGate()
    compute = ws.scores

    def scores(key, method, steps, mask=None, progress=None):
        steps = [int(s) for s in steps]
        if all(ws.cached_scores(key, method, s, mask) is not None for s in steps):
            return compute(key, method, steps, mask, progress)
        background = threading.current_thread().name.startswith("prefetch-")
        with gate.hold(background):
            return compute(key, method, steps, mask, progress)

    ws.scores = scores
    return ws


@st.cache_resource(show_spinner="Loading the models, the training set and the attribution store…")
def _load_workspace(bundle_dir: str | None) -> Workspace:
    configure_torch_threads()
    bundle = bundle_from_dir(bundle_dir) if bundle_dir else default_bundle()
    return serialize_scoring(Workspace(bundle))


ALLOWED_ENV = "ATTRIBUTION_ALLOWED_DIRS"
LAUNCH_ENV = {"model": "ATTRIBUTION_MODEL", "data": "ATTRIBUTION_DATA", "store": "ATTRIBUTION_STORE",
              "lora": "ATTRIBUTION_LORA", "clip": "ATTRIBUTION_CLIP"}


@dataclass(frozen=True)
class LaunchSettings:
    """The user's own model, data and store, from ``streamlit run app.py -- --model DIR ...`` or the environment."""

    model: tuple[str, ...]
    data: str
    store: str
    lora: tuple[str, ...] = ()
    clip: str | None = None


def allowed_roots(environ=os.environ) -> list[Path]:
    """Directories launch paths must lie in: ``$ATTRIBUTION_ALLOWED_DIRS`` (os.pathsep-separated),
    else the working directory, the home directory and the repository."""
    raw = environ.get(ALLOWED_ENV, "")
    roots = [p for p in raw.split(os.pathsep) if p.strip()] if raw.strip() else [os.getcwd(), str(Path.home()), str(ASSETS_DIR.parent)]
    return [Path(r).expanduser().resolve() for r in roots]


def checked_path(path: str, what: str, roots: Sequence[Path]) -> str:
    """``path`` resolved (symlinks followed); ValueError unless it exists inside one of ``roots``."""
    try:
        p = resolve_within(Path(path).expanduser(), roots)
    except PathEscapeError as e:
        raise ValueError(f"{what} {path} is outside the allowed directories: {e}; add its parent to ${ALLOWED_ENV}") from None
    if what != "store" and not p.exists():
        raise ValueError(f"{what} {path} does not exist")
    return str(p)


def launch_settings(argv: Sequence[str] | None = None, environ=os.environ) -> LaunchSettings | None:
    """Parse ``--model DIR [--model DIR ...] --data DIR --store DIR [--lora DIR] [--clip DIR]``.

    ``argv`` defaults to the script arguments when run as ``streamlit run app.py -- ...``;
    with none, ``$ATTRIBUTION_MODEL`` (os.pathsep-separated), ``$ATTRIBUTION_DATA``,
    ``$ATTRIBUTION_STORE``, ``$ATTRIBUTION_LORA``, ``$ATTRIBUTION_CLIP`` are read. Returns None
    when neither names a model. Every path must lie in :func:`allowed_roots`.
    """
    if argv is None:
        argv = sys.argv[1:] if Path(sys.argv[0]).name == "app.py" else []
    parser = argparse.ArgumentParser(prog="streamlit run app.py --", exit_on_error=False)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--data")
    parser.add_argument("--store")
    parser.add_argument("--lora", action="append", default=[])
    parser.add_argument("--clip")
    try:
        args = parser.parse_args(list(argv))
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"bad app arguments {shlex.join(argv)}: {e}") from None
    if not args.model:
        env = {k: environ.get(v, "") for k, v in LAUNCH_ENV.items()}
        if not env["model"]:
            return None
        args.model = [m for m in env["model"].split(os.pathsep) if m]
        args.lora = [m for m in env["lora"].split(os.pathsep) if m]
        args.data, args.store, args.clip = env["data"] or None, env["store"] or None, env["clip"] or None
    if not args.data or not args.store:
        raise ValueError("a custom model needs --data (its training images) and --store (where its features are)")
    roots = allowed_roots(environ)
    return LaunchSettings(
        model=tuple(checked_path(m, "model", roots) for m in args.model),
        data=checked_path(args.data, "data", roots),
        store=checked_path(args.store, "store", roots),
        lora=tuple(checked_path(m, "LoRA", roots) for m in args.lora),
        clip=checked_path(args.clip, "CLIP model", roots) if args.clip else None,
    )


@st.cache_resource(show_spinner="Loading your model, its training set and the attribution store…")
def _load_custom_workspace(settings: LaunchSettings) -> Workspace:
    configure_torch_threads()
    bundle = custom_bundle(settings.model, settings.data, settings.store, settings.lora, settings.clip)
    return serialize_scoring(Workspace(bundle))


def get_workspace() -> Workspace:
    """The shared workspace: the launch settings' model if given (:func:`launch_settings`),
    else ``$ATTRIBUTION_BUNDLE`` if set, else the bundled digits ensemble."""
    settings = launch_settings()
    if settings is not None:
        return _load_custom_workspace(settings)
    return _load_workspace(os.environ.get(BUNDLE_ENV) or None)


def describe_bundle(ws: Workspace) -> str:
    """One markdown paragraph saying what the loaded bundle is."""
    c, h, w = ws.image_shape
    kind = "grayscale" if c == 1 else "colour"
    n_models = len(ws.models)
    what = "MNIST digits" if ws.bundle.data.startswith("digits") or ws.class_names() == [str(i) for i in range(10)] else "images"
    stores = ", ".join(label for name, label in ws.available_methods().items() if not name.startswith("baseline"))
    if ws.models[0].is_latent:
        lc, lh, lw = ws.image_shape
        _, ph, pw = ws.pixel_shape
        kind = "text-conditional latent" if is_conditional(ws) else "latent"
        lora = " with a LoRA adapter" if ws.bundle.lora_dirs else ""
        return (
            f"**{ws.bundle.name}**  \n"
            f"{n_models} {kind} diffusion model{'s' if n_models > 1 else ''}{lora} "
            f"({ph}×{pw} images, {lc}×{lh}×{lw} latents), trained on **{ws.num_train:,} "
            f"{'captioned ' if ws.dataset.captions is not None else ''}images**.  \n"
            f"Attribution methods ready: {stores or 'similarity baselines only'}."
        )
    return (
        f"**{ws.bundle.name}**  \n"
        f"{n_models} diffusion models (DDPMs) trained on **{ws.num_train:,} {what}** ({h}×{w} {kind}); "
        f"the first generates, all {n_models} are averaged for the scores.  \n"
        f"Attribution methods ready: {stores or 'similarity baselines only'}."
    )


# ---------------------------------------------------------------------------- current sample
def is_conditional(ws: Workspace) -> bool:
    """Whether the bundle's models take a text prompt."""
    return ws.models[0].is_conditional


def _prompt_fields(prompt: str | None, guidance_scale: float | None) -> dict:
    """The prompt part of a sample recipe (empty for unconditional models)."""
    if prompt is None:
        return {}
    return {"prompt": prompt, "guidance_scale": float(guidance_scale if guidance_scale is not None else 1.0)}


def _generate(ws: Workspace, recipe: dict) -> tuple[str, Trajectory]:
    if "prompt" in recipe:
        return ws.generate(recipe["seed"], prompt=recipe["prompt"], guidance_scale=recipe["guidance_scale"])
    return ws.generate(recipe["seed"])


def _upload(ws: Workspace, recipe: dict) -> tuple[str, Trajectory]:
    if "prompt" in recipe:
        return ws.upload(recipe["data"], prompt=recipe["prompt"])
    return ws.upload(recipe["data"])


def set_seed_sample(ws: Workspace, seed: int, prompt: str | None = None, guidance_scale: float | None = None) -> str:
    """Generate the sample of ``seed`` (and ``prompt``, conditional models) and make it current; returns its key."""
    recipe = {"kind": "seed", "seed": int(seed), **_prompt_fields(prompt, guidance_scale)}
    key, _ = _generate(ws, recipe)
    st.session_state["sample"] = recipe
    st.session_state["sample_key"] = key
    return key


def set_upload_sample(ws: Workspace, data: bytes, name: str, prompt: str | None = None) -> str:
    """Invert an uploaded image (conditioned on ``prompt``) and make it current (raises ``ImageDecodeError``)."""
    recipe = {"kind": "upload", "name": safe_name(name), "data": data, **_prompt_fields(prompt, 1.0)}
    key, _ = _upload(ws, recipe)
    st.session_state["sample"] = recipe
    st.session_state["sample_key"] = key
    return key


def handle_upload(ws: Workspace, data: bytes, name: str, prompt: str | None = None) -> str | None:
    """Use an uploaded file as the current sample; returns an error message for the user, or None."""
    try:
        set_upload_sample(ws, data, name, prompt)
    except ImageDecodeError as e:
        return f"Could not use {safe_name(name)}: {e}"
    return None


def prompt_inputs(ws: Workspace, container=None) -> tuple[str | None, float | None]:
    """Prompt and guidance-scale inputs for text-conditional models; (None, None) otherwise."""
    if not is_conditional(ws):
        return None, None
    target = container if container is not None else st
    captions = ws.dataset.captions or []
    st.session_state.setdefault("prompt_input", captions[0] if captions else "")
    c_prompt, c_scale = target.columns([3.2, 1], vertical_alignment="bottom")
    prompt = c_prompt.text_input("Prompt", key="prompt_input", max_chars=500,
                                 help="The text the model is conditioned on; the scores are conditioned on it too.")
    scale = c_scale.number_input("Guidance scale", min_value=1.0, max_value=20.0, value=7.5, step=0.5,
                                 key="guidance_input",
                                 help="Classifier-free guidance: 1 = conditional prediction only, higher = follow the prompt more.")
    return prompt, float(scale)


def current_sample(ws: Workspace, autogenerate: bool = True) -> tuple[str, Trajectory] | None:
    """Key and trajectory of the current sample, regenerated from its recipe if the cache dropped it.

    With no sample yet, generates seed 0 when ``autogenerate`` (else returns None).
    """
    recipe = st.session_state.get("sample")
    if recipe is None:
        if not autogenerate:
            return None
        with st.spinner("Generating a first sample (seed 0)…"):
            if is_conditional(ws):
                captions = ws.dataset.captions or [""]
                set_seed_sample(ws, 0, st.session_state.get("prompt_input", captions[0]),
                                st.session_state.get("guidance_input", 7.5))
            else:
                set_seed_sample(ws, 0)
        recipe = st.session_state["sample"]
    key = st.session_state.get("sample_key")
    traj = ws.trajectory(key) if key else None
    if traj is None:
        with st.spinner("Restoring the current sample…"):
            key, traj = _generate(ws, recipe) if recipe["kind"] == "seed" else _upload(ws, recipe)
        st.session_state["sample_key"] = key
    return key, traj


def sample_label() -> str:
    """Short description of the current sample, e.g. ``seed 3`` or ``upload seven.png``."""
    recipe = st.session_state.get("sample")
    if recipe is None:
        return "none yet"
    label = f"seed {recipe['seed']}" if recipe["kind"] == "seed" else f"upload {recipe['name']}"
    if recipe.get("prompt") is not None:
        label += f" · “{short_text(recipe['prompt'], 60)}”"
    return label


def short_text(text: str, limit: int = 48) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (long captions in grids and tables)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def sample_caption() -> None:
    """A one-line reminder of which sample a page is showing."""
    st.caption(f"Current sample: **{sample_label()}** · change it on the Explore page.")


def sample_page(ws: Workspace, title: str, explanation: str) -> tuple[str, Trajectory]:
    """The header of a page that works on the current sample: title, explanation, the sample
    (seed 0 if none yet) and the reminder of which one it is; returns its key and trajectory."""
    page_header(title, explanation)
    key, traj = current_sample(ws)
    sample_caption()
    return key, traj


# ---------------------------------------------------------------------------- widgets
def method_selector(ws: Workspace, container=None, baselines: bool = True) -> str:
    """Sidebar select box of the available methods (default journey-TRAK), kept across pages."""
    methods = {k: v for k, v in available_methods(ws).items() if baselines or not k.startswith("baseline")}
    names = list(methods)
    if st.session_state.get("method") not in methods:
        st.session_state["method"] = "journey" if "journey" in names else names[0]
    target = container if container is not None else st.sidebar
    return target.selectbox(
        "Attribution method",
        names,
        format_func=lambda n: methods[n],
        key="method",
        help="journey-TRAK is the paper's method; the others are for comparison (see About).",
        persist_state="session",
    )


def available_methods(ws: Workspace) -> dict[str, str]:
    """``ws.available_methods()`` minus the D-TRAK stores still being built here."""
    building = {f"dtrak-{o}" for o in DTRAK_OUTPUTS if build_status(ws, o).running}
    return {k: v for k, v in ws.available_methods().items() if k not in building}


def step_label(traj: Trajectory, step: int) -> str:
    """``step 12 · t=759`` for a step index of the trajectory."""
    return f"step {step} · t={int(traj.timesteps[step])}"


def step_slider(traj: Trajectory, label: str = "Denoising step (noisy → clean)") -> int:
    """The shared step slider 0..S-1, shown with each step's timestep; default: the middle step."""
    n = traj.num_steps
    if not 0 <= st.session_state.get("step", -1) < n:
        st.session_state["step"] = n // 2 if "step" not in st.session_state else n - 1
    return st.select_slider(
        label,
        options=list(range(n)),
        format_func=lambda s: step_label(traj, s),
        key="step",
        help="Step 0 is pure noise; the last step is the finished image. t is the diffusion timestep.",
        persist_state="session",
    )


# ---------------------------------------------------------------------------- images
def upscale(image: np.ndarray, size: int) -> Image.Image:
    """uint8 (H, W, C) -> PIL image of ``size`` px on its long side, nearest neighbour (crisp pixels)."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    img = Image.fromarray(arr)
    scale = size / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.NEAREST)


def tensor_image(x, size: int) -> Image.Image:
    """A model-space image (C, H, W) in [-1, 1] -> upscaled PIL image."""
    return upscale(model_to_uint8(x[None])[0], size)


def framed(img: Image.Image, color: str, width: int = 4) -> Image.Image:
    """``img`` inside a coloured frame (the green / red accent of influencer grids)."""
    out = Image.new("RGB", (img.width + 2 * width, img.height + 2 * width), color)
    out.paste(img.convert("RGB"), (width, width))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    """PNG data URI of an image (for image columns in tables)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def img_tag(image: np.ndarray, size: int, border: str | None = None, alt: str = "") -> str:
    """An ``<img>`` of a uint8 (H, W, C) image inlined as PNG and scaled by the browser with crisp pixels.

    Inline images need no extra request per rerun, which keeps scrubbing fast.
    """
    arr = image[..., 0] if image.shape[-1] == 1 else image
    style = (f"width:{size}px;height:{size}px;max-width:none;object-fit:fill;image-rendering:pixelated;"
             "display:block;border-radius:3px")
    if border:
        style += f";border:4px solid {border};box-sizing:content-box"
    return f"<img src='{data_uri(Image.fromarray(arr))}' alt='{html.escape(alt)}' style='{style}'/>"


def trajectory_images(traj: Trajectory, step: int, size: int = 192) -> None:
    """x_t, x̂0 and the final sample side by side, large and crisp."""
    cols = st.columns(3, gap="medium")
    latent = traj.decoded_x0_hat is not None
    panels = [
        (traj.display_x_t[step], "Noisy input x_t",
         "the noisy latent the model sees (channels 1–3 as colours)" if latent else "what the model sees at this step"),
        (traj.display_x0_hat[step], "One-step prediction x̂0",
         "the model's guess of the final image from x_t" + (", decoded by the VAE" if latent else "")),
        (traj.display_sample, "Final sample", f"where the trajectory ends · {sample_label()}"),
    ]
    for col, (x, title, sub) in zip(cols, panels):
        col.markdown(
            f"<div><b>{title}</b><br><span style='color:{NEUTRAL_COLOR}'>{html.escape(sub)}</span>"
            f"<div style='margin-top:10px'>{img_tag(model_to_uint8(x[None])[0], size, alt=title)}</div></div>",
            unsafe_allow_html=True,
        )


# ---------------------------------------------------------------------------- influencer grids
@dataclass
class Influencers:
    """Top-k training examples of one score row: indices and scores, most extreme first."""

    pos_idx: np.ndarray
    pos_scores: np.ndarray
    neg_idx: np.ndarray
    neg_scores: np.ndarray


def influencers(row: np.ndarray, k: int) -> Influencers:
    """Top-k positive and negative examples of a (N,) score row.

    At most N // 2 each, so that a small training set never shows an example in both grids.
    """
    pos, neg = top_k(row[None], min(k, max(len(row) // 2, 1)))
    return Influencers(pos[0], row[pos[0]], neg[0], row[neg[0]])


def influencer_grid(
    ws: Workspace,
    indices: Sequence[int],
    scores: Sequence[float],
    kind: Kind,
    title: str | None = None,
    subtitle: str | None = None,
    size: int = 96,
    compact: bool = False,
) -> None:
    """Thumbnails framed green (positive) or red (negative) with rank, score, label and index.

    ``compact`` captions show only the score and the index (for narrow rows).
    """
    color = POSITIVE_COLOR if kind == "positive" else NEGATIVE_COLOR
    parts = []
    if title:
        parts.append(
            f"<div style='border-left:6px solid {color};padding:2px 10px;margin:6px 0 10px 0'>"
            f"<span style='font-weight:600;color:{color}'>{title}</span>"
            + (f"<br><span style='color:{NEUTRAL_COLOR};font-size:0.9em'>{subtitle}</span>" if subtitle else "")
            + "</div>"
        )
    if len(indices) == 0:
        parts.append(f"<p style='color:{NEUTRAL_COLOR}'>none</p>")
    else:
        images = ws.train_images(list(indices))
        cells = []
        for r, (im, i, sc) in enumerate(zip(images, indices, scores)):
            i, sc = int(i), float(sc)
            if compact:
                cap = f"{sc:+.2g}<br>idx {i}"
            else:
                label = ws.label(i)
                cap = (f"<b>#{r + 1}</b> {sc:+.3g}<br><span title='{html.escape(label)}'>"
                       f"“{html.escape(short_text(label))}”</span> · idx {i}")
            cells.append(
                f"<figure style='margin:0;width:{size + 8}px;text-align:center'>"
                f"{img_tag(im, size, color, alt=f'training image {i}')}"
                f"<figcaption style='font-size:0.75rem;line-height:1.3;color:#4b5563;margin-top:4px'>{cap}</figcaption>"
                "</figure>"
            )
        spacing = "10px 6px" if compact else "12px 8px"
        parts.append(f"<div class='influencer-grid' style='display:flex;flex-wrap:wrap;gap:{spacing}'>{''.join(cells)}</div>")
    st.markdown(f"<div class='influencer-panel {kind}' style='margin-top:14px'>{''.join(parts)}</div>",
                unsafe_allow_html=True)


PANEL_TEXT = {
    ("positive", False): ("Positive influencers", "make this step's prediction more likely (lower its denoising loss)"),
    ("negative", False): ("Negative influencers", "push this step's prediction away (raise its denoising loss)"),
    ("positive", True): ("Most similar training images", "highest similarity to x̂0 (a baseline, not an influence)"),
    ("negative", True): ("Least similar training images", "lowest similarity to x̂0 (a baseline, not an influence)"),
}


def influencer_panel(ws: Workspace, inf: Influencers, kind: Kind, baseline: bool = False, size: int = 96,
                     title: str | None = None) -> None:
    """The positive or negative grid of ``inf`` with its title and one-line explanation."""
    default_title, subtitle = PANEL_TEXT[(kind, baseline)]
    idx, scores = (inf.pos_idx, inf.pos_scores) if kind == "positive" else (inf.neg_idx, inf.neg_scores)
    influencer_grid(ws, idx, scores, kind, title or default_title, subtitle, size)


def influencer_pair(ws: Workspace, inf: Influencers, baseline: bool = False, size: int = 96, gap: str = "large") -> None:
    """Positive grid and negative grid side by side."""
    left, right = st.columns(2, gap=gap)
    with left:
        influencer_panel(ws, inf, "positive", baseline, size)
    with right:
        influencer_panel(ws, inf, "negative", baseline, size)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType size support
        return ImageFont.load_default()


def influencer_grid_png(
    ws: Workspace,
    inf: Influencers,
    title: str,
    context: Sequence[tuple[str, np.ndarray]] = (),
    size: int = 96,
) -> bytes:
    """A PNG of the two grids (positive row, negative row) with captions, for export.

    ``context``: (caption, uint8 (H, W, C)) images drawn on the left, e.g. x̂0 and the final sample.
    """
    k = max(len(inf.pos_idx), len(inf.neg_idx), 1)
    pad, cap_h, head_h, title_h = 12, 34, 26, 34
    cell_w = size + 8 + pad
    big = size * 2 if context else 0
    left = pad + big + 2 * pad if context else pad
    width = left + k * cell_w
    height = title_h + 2 * (head_h + size + 8 + cap_h) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill="black", font=_font(16))
    slot = (height - title_h - pad) // max(len(context), 1)
    for n, (caption, image) in enumerate(context):
        y_ctx = title_h + 4 + n * slot
        canvas.paste(upscale(image, slot - 24).convert("RGB"), (pad, y_ctx))
        draw.text((pad, y_ctx + slot - 20), caption, fill=NEUTRAL_COLOR, font=_font(12))
    y = title_h
    rows = [("Positive influencers", inf.pos_idx, inf.pos_scores, POSITIVE_COLOR),
            ("Negative influencers", inf.neg_idx, inf.neg_scores, NEGATIVE_COLOR)]
    for name, idx, scores, color in rows:
        draw.text((left, y + 4), name, fill=color, font=_font(14))
        y += head_h
        images = ws.train_images(list(idx)) if len(idx) else []
        for j, (im, i, sc) in enumerate(zip(images, idx, scores)):
            x = left + j * cell_w
            canvas.paste(framed(upscale(im, size), color), (x, y))
            draw.text((x, y + size + 10), f"#{j + 1} {sc:+.3g}", fill="black", font=_font(11))
            draw.text((x, y + size + 23), f"'{ws.label(int(i))}' idx {int(i)}", fill=NEUTRAL_COLOR, font=_font(11))
        y += size + 8 + cap_h
    return png_bytes(canvas)


# ---------------------------------------------------------------------------- scores & progress
def computed_steps(ws: Workspace, key: str, method: str, num_steps: int, mask: np.ndarray | None = None) -> list[int]:
    """Steps of sample ``key`` whose scores for ``method`` are already in the workspace cache."""
    return [s for s in range(num_steps) if ws.cached_scores(key, method, s, mask) is not None]


def step_scores(ws: Workspace, key: str, method: str, step: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, float | None]:
    """(N,) scores of one step and the seconds spent computing them (None when cached)."""
    row = ws.cached_scores(key, method, step, mask)
    if row is not None:
        return row, None
    what = "the painted patch" if mask is not None else f"step {step}"
    with st.spinner(f"Scoring {ws.num_train:,} training images for {what}…"):
        t0 = time.perf_counter()
        row = ws.scores(key, method, [step], mask)[0]
        return row, time.perf_counter() - t0


def steps_by_distance(num_steps: int, center: int) -> list[int]:
    """All steps ordered by distance from ``center`` (the ones next to the slider come first)."""
    return sorted(range(num_steps), key=lambda s: (abs(s - center), s))


def background_scores(ws: Workspace, key: str, method: str, num_steps: int, center: int = 0) -> bool:
    """Make sure every step of ``key`` gets scored; True when all are cached.

    Otherwise starts (or joins) the workspace's background job and shows its
    progress in a fragment that polls ``ws.job_status`` every second and reruns
    the whole page once the job is done (so polling stops).
    """
    if len(computed_steps(ws, key, method, num_steps)) == num_steps:
        return True
    failed = st.session_state.setdefault("failed_jobs", {})
    if (key, method) in failed:
        st.error(f"Scoring the remaining steps failed: {failed[(key, method)]}")
        if st.button("Retry", key=f"retry-{key}-{method}"):
            failed.pop((key, method))
            st.rerun()
        return False
    # One step per chunk: the page's own request never waits for more than one background step.
    ws.prefetch(key, method, steps_by_distance(num_steps, center), chunk=1)

    @st.fragment(run_every=1.0)
    def poll() -> None:
        done, total, error = ws.job_status(key, method)
        if error:
            failed[(key, method)] = error
            st.rerun(scope="app")
        n_done = len(computed_steps(ws, key, method, num_steps))
        if n_done == num_steps or (total and done >= total):
            st.rerun(scope="app")
        st.progress(n_done / num_steps, text=f"Scoring the other steps in the background: {n_done} of {num_steps} done")

    poll()
    return False


def all_step_scores(ws: Workspace, key: str, method: str, num_steps: int) -> np.ndarray:
    """(S, N) scores of every step (all must be cached or cheap to compute)."""
    return ws.scores(key, method, list(range(num_steps)))


# ---------------------------------------------------------------------------- exports
def scores_csv(ws: Workspace, traj: Trajectory, steps: Sequence[int], scores: np.ndarray) -> bytes:
    """Wide CSV: one row per step (step, timestep), one column per training example."""
    header = "step,timestep," + ",".join(f"train_{i}" for i in range(scores.shape[1]))
    lines = [header]
    for s, row in zip(steps, scores):
        lines.append(f"{s},{int(traj.timesteps[s])}," + ",".join(f"{v:.6g}" for v in row))
    return ("\n".join(lines) + "\n").encode()


def scores_npz(ws: Workspace, key: str, method: str, traj: Trajectory, steps: Sequence[int], scores: np.ndarray) -> bytes:
    """NPZ with scores (S, N), steps, timesteps, the method, the sample key and the final sample (pixels, (C, H, W))."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        scores=scores.astype(np.float32),
        steps=np.asarray(steps, dtype=np.int64),
        timesteps=traj.timesteps[list(steps)].numpy(),
        method=np.array(method),
        sample_key=np.array(key),
        sample=traj.display_sample.numpy(),
    )
    return buf.getvalue()


def export_buttons(ws: Workspace, key: str, method: str, traj: Trajectory, inf: Influencers, step: int) -> None:
    """Download the computed scores (CSV, NPZ) and a PNG of the influencer grid."""
    steps = computed_steps(ws, key, method, traj.num_steps)
    stem = f"{key}-{method}"

    def load() -> np.ndarray:
        return ws.scores(key, method, steps)

    cols = st.columns(3)
    n = len(steps)
    cols[0].download_button(
        f"Scores as CSV ({n} step{'s' if n != 1 else ''})", data=lambda: scores_csv(ws, traj, steps, load()),
        file_name=f"{stem}-scores.csv", mime="text/csv", icon=":material/table:", width="stretch",
        on_click="ignore",
    )
    cols[1].download_button(
        "Scores as NPZ", data=lambda: scores_npz(ws, key, method, traj, steps, load()),
        file_name=f"{stem}-scores.npz", mime="application/octet-stream", icon=":material/data_array:",
        width="stretch", on_click="ignore",
    )
    title = f"{sample_label()} · {method} · {step_label(traj, step)}"
    cols[2].download_button(
        "Influencer grid as PNG",
        data=lambda: influencer_grid_png(ws, inf, title, [("x0_hat at this step", model_to_uint8(traj.display_x0_hat[step:step + 1])[0]),
                                                          ("final sample", sample_uint8(traj))]),
        file_name=f"{stem}-step{step}-influencers.png", mime="image/png", icon=":material/image:",
        width="stretch", on_click="ignore",
    )


# ---------------------------------------------------------------------------- masks
def canvas_to_mask(rgba: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A canvas drawing (H', W', 4) -> (H, W) mask in [0, 1]: painted (alpha > 0) = 1, area-averaged.

    Returns None when nothing is painted.
    """
    if rgba is None or rgba.ndim != 3 or rgba.shape[-1] < 4:
        return None
    painted = (rgba[..., 3] > 0).astype(np.float32)
    if not painted.any():
        return None
    h, w = shape
    small = Image.fromarray(painted, mode="F").resize((w, h), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def mask_overlay(sample: np.ndarray, mask: np.ndarray, size: int, color: tuple[int, int, int] = (255, 170, 0)) -> Image.Image:
    """The sample (H, W, C) uint8 with the mask tinted on top, upscaled (for a preview)."""
    base = sample[..., 0] if sample.shape[-1] == 1 else sample.mean(-1)
    rgb = np.repeat(base[..., None], 3, -1).astype(np.float32)
    a = 0.55 * mask[..., None]
    rgb = rgb * (1 - a) + np.array(color, np.float32) * a
    return upscale(rgb.round().astype(np.uint8), size)


# ---------------------------------------------------------------------------- tables over steps
def top_union(scores: np.ndarray, k: int, max_rows: int = 40) -> tuple[np.ndarray, int]:
    """Training images in the top-k positive or negative of some step, at most ``max_rows`` of them.

    Keeps the ones that make the most top-k lists (ties: the larger peak of |score| relative
    to its step), ordered by the step of their peak. Returns (indices, size of the whole union).
    """
    pos, neg = top_k(scores, k)
    idx, counts = np.unique(np.concatenate([pos.ravel(), neg.ravel()]), return_counts=True)
    rel = np.abs(per_step_normalized(scores[:, idx], scores))
    keep = np.lexsort((-rel.max(0), -counts))[:max_rows]
    idx, rel = idx[keep], rel[:, keep]
    peak = rel.argmax(0)
    return idx[np.lexsort((idx, peak))], len(counts)


def sign_flips(scores: np.ndarray, k: int) -> list[tuple[int, list[int], list[int]]]:
    """Examples in the top-k positive at some step and the top-k negative at another: (idx, pos steps, neg steps)."""
    pos, neg = top_k(scores, k)
    pos_steps: dict[int, list[int]] = {}
    neg_steps: dict[int, list[int]] = {}
    for s in range(scores.shape[0]):
        for i in pos[s]:
            pos_steps.setdefault(int(i), []).append(s)
        for i in neg[s]:
            neg_steps.setdefault(int(i), []).append(s)
    both = sorted(set(pos_steps) & set(neg_steps), key=lambda i: -(len(pos_steps[i]) + len(neg_steps[i])))
    return [(i, pos_steps[i], neg_steps[i]) for i in both]


def per_step_normalized(values: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``values`` (S, R) divided by each step's largest |score| over all N (display scale in [-1, 1])."""
    scale = np.abs(scores).max(1, keepdims=True)
    return values / np.where(scale > 0, scale, 1.0)


def spearman_table(rows: dict[str, np.ndarray], labels: dict[str, str] = METHOD_SHORT):
    """Spearman correlation between methods' (N,) score vectors, as a pandas DataFrame (short names)."""
    import pandas as pd
    from scipy.stats import rankdata

    names = list(rows)
    ranks = np.stack([rankdata(rows[n]) for n in names])
    corr = np.corrcoef(ranks) if len(names) > 1 else np.ones((1, 1))
    corr = np.round(corr, 2) + 0.0  # no "-0.00"
    short = [labels.get(n, n) for n in names]
    return pd.DataFrame(corr, index=short, columns=short)


# ---------------------------------------------------------------------------- D-TRAK store builds
@dataclass
class BuildStatus:
    running: bool
    done: int
    total: int
    error: str | None
    finished: bool


@st.cache_resource
def _build_jobs() -> dict[tuple[str, str], dict]:
    """Store builds running in this server process, shared by all sessions."""
    return {}


def build_status(ws: Workspace, output: str) -> BuildStatus:
    job = _build_jobs().get((ws.bundle.name, output))
    if job is None:
        return BuildStatus(False, 0, 0, None, False)
    return BuildStatus(job["thread"].is_alive(), job["done"], job["total"], job["error"], job["finished"])


def build_store_isolated(ws: Workspace, output: str, progress=None) -> Path:
    """What ``ws.build_store`` does, but on private copies of the models.

    Featurizing differentiates the models with ``functional_call``, which must not
    run on the modules the page is scoring with at the same time (see :class:`ScoringGate`).
    """
    import copy
    from dataclasses import replace

    from attribution.features import featurize

    path = ws.store_path(output)  # refuses a location outside the bundle's directories
    models = [copy.deepcopy(m) for m in ws.models]
    featurize(models, ws.dataset, path, replace(ws.bundle.featurize, output=output), progress=progress)
    return path


def start_store_build(ws: Workspace, output: str) -> None:
    """Featurize the D-TRAK store ``output`` in a background thread (no-op if one is running)."""
    jobs = _build_jobs()
    jk = (ws.bundle.name, output)
    if jk in jobs and jobs[jk]["thread"].is_alive():
        return
    job: dict = {"done": 0, "total": 0, "error": None, "finished": False}

    def progress(done: int, total: int) -> None:
        job["done"], job["total"] = done, total

    def run() -> None:
        try:
            build_store_isolated(ws, output, progress)
            job["finished"] = True
        except Exception as e:  # shown to the user
            job["error"] = f"{type(e).__name__}: {e}"

    job["thread"] = threading.Thread(target=run, daemon=True, name=f"build-store-{output}")
    jobs[jk] = job
    job["thread"].start()


def poll_builds(ws: Workspace, outputs: Sequence[str]) -> None:
    """Progress bars of the running store builds; reruns the page when one finishes."""
    running = [o for o in outputs if build_status(ws, o).running]
    if not running:
        return

    @st.fragment(run_every=1.0)
    def poll() -> None:
        for o in running:
            s = build_status(ws, o)
            if not s.running:
                st.rerun(scope="app")
            frac = s.done / s.total if s.total else 0.0
            st.progress(frac, text=f"Building the {DTRAK_OUTPUTS[o]} store: {s.done:,} of {s.total or '?'}")

    poll()


def page_header(title: str, explanation: str) -> None:
    """Page title and its one-sentence explanation."""
    st.title(title)
    st.markdown(f"<p style='font-size:1.05rem;color:#4b5563;margin-top:-0.6rem'>{explanation}</p>", unsafe_allow_html=True)


# ---------------------------------------------------------------------------- figures
STEP_AXIS = "denoising step (noisy → clean)"


def predicted_class(ws: Workspace, traj: Trajectory) -> int | None:
    """The classifier's label of the final sample, or None without a classifier."""
    if ws.classifier is None:
        return None
    return int(ws.classify(traj.display_sample[None])[0].argmax())


def curve_steps(num_steps: int, subset: str) -> list[int]:
    """Steps for likelihood curves: ``"every 5th"``, ``"every 2nd"`` or ``"all"`` (last step always included)."""
    stride = {"every 5th": 5, "every 2nd": 2, "all": 1}[subset]
    steps = list(range(0, num_steps, stride))
    return steps if steps[-1] == num_steps - 1 else steps + [num_steps - 1]


def _step_hover(traj: Trajectory, steps: Sequence[int]) -> list[int]:
    return [int(traj.timesteps[s]) for s in steps]


def default_labels(ws: Workspace, traj: Trajectory, limit: int = 4) -> list[str]:
    """Starting text labels for CLIP curves: the sample's prompt, then distinct training captions."""
    out: list[str] = []
    for text in [traj.prompt or ""] + list(ws.dataset.captions or []):
        text = " ".join(text.split())
        if text and text not in out:
            out.append(text)
        if len(out) == limit:
            break
    return out if len(out) >= 2 else out + [f"label {i + 1}" for i in range(2 - len(out))]


def parse_labels(raw: str) -> list[str]:
    """One label per non-blank line (ValueError with a message for fewer than two or repeats)."""
    from attribution.models import check_labels

    return check_labels([line for line in raw.splitlines() if line.strip()])


def curves_figure(curves, names: Sequence[str], highlight: int, traj: Trajectory, current_step: int | None = None,
                  feature: str = "class"):
    """Plotly lines of every class (or text label) probability vs step; ``highlight`` drawn bold with its rise interval shaded."""
    import plotly.express as px
    import plotly.graph_objects as go

    palette = px.colors.qualitative.T10
    steps = [int(s) for s in curves.steps]
    fig = go.Figure()
    interval = curves.rise_interval(highlight)
    if interval is not None:
        a, b = interval
        fig.add_vrect(x0=a - 0.5, x1=b + 0.5, fillcolor=POSITIVE_COLOR, opacity=0.12, line_width=0,
                      annotation_text=f"“{short_text(names[highlight], 32)}” is decided here", annotation_position="top left")
    order = [c for c in range(len(names)) if c != highlight] + [highlight]
    for c in order:
        bold = c == highlight
        fig.add_trace(go.Scatter(
            x=steps, y=curves.probs[:, c], mode="lines+markers" if bold else "lines", name=f"“{short_text(names[c], 32)}”",
            line=dict(width=4 if bold else 1.5, color=palette[c % len(palette)]),
            opacity=1.0 if bold else 0.45, customdata=_step_hover(traj, steps), legendrank=c,
            hovertemplate=f"“{html.escape(short_text(names[c], 60))}”: %{{y:.0%}} at step %{{x}} (t=%{{customdata}})<extra></extra>",
        ))
    if current_step is not None:
        fig.add_vline(x=current_step, line_dash="dot", line_color=NEUTRAL_COLOR)
    fig.update_layout(
        height=430, margin=dict(l=10, r=10, t=30, b=10), legend_title_text=feature,
        xaxis_title=STEP_AXIS, yaxis_title=f"probability of the {feature}", yaxis=dict(range=[0, 1.02], tickformat=".0%"),
    )
    return fig


def example_figure(values: np.ndarray, traj: Trajectory, title: str, current_step: int | None = None):
    """Bars of one training image's score at every step: green positive, red negative, zero line."""
    import plotly.graph_objects as go

    steps = list(range(len(values)))
    colors = [POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values]
    fig = go.Figure(go.Bar(
        x=steps, y=values, marker_color=colors, customdata=_step_hover(traj, steps),
        hovertemplate="step %{x} (t=%{customdata}): %{y:+.3g}<extra></extra>",
    ))
    fig.add_hline(y=0, line_color="#111827", line_width=1)
    if current_step is not None:
        fig.add_vline(x=current_step, line_dash="dot", line_color=NEUTRAL_COLOR)
    fig.update_layout(height=330, margin=dict(l=10, r=10, t=40, b=10), title=title,
                      xaxis_title=STEP_AXIS, yaxis_title="score (+ helps, − hurts)", showlegend=False)
    return fig


def heatmap_figure(ws: Workspace, scores: np.ndarray, indices: np.ndarray, traj: Trajectory, normalize: bool):
    """Heatmap of training images (rows) × steps (columns); red-white-green, centred on zero."""
    import plotly.graph_objects as go

    values = scores[:, indices]
    if normalize:
        values = per_step_normalized(values, scores)
    z = values.T
    zmax = float(np.abs(z).max()) or 1.0
    ylabels = [f"idx {int(i)} · “{short_text(ws.label(int(i)), 32)}”" for i in indices]
    steps = list(range(scores.shape[0]))
    fig = go.Figure(go.Heatmap(
        z=z, x=steps, y=ylabels, zmin=-zmax, zmax=zmax, zmid=0,
        colorscale=[[0, NEGATIVE_COLOR], [0.5, "#ffffff"], [1, POSITIVE_COLOR]],
        colorbar=dict(title="score" + (" / step max" if normalize else "")),
        hovertemplate="%{y}<br>step %{x}: %{z:+.3g}<extra></extra>",
    ))
    fig.update_layout(height=max(320, 16 * len(indices) + 120), margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title=STEP_AXIS, yaxis=dict(autorange="reversed", tickfont=dict(size=10)))
    return fig


def step_ranges(steps: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1–3, 7"``."""
    out: list[str] = []
    steps = sorted(steps)
    start = prev = steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(out)


def flips_table(ws: Workspace, scores: np.ndarray, k: int, limit: int = 30):
    """DataFrame of training images that are top-k positive at some step and top-k negative at another."""
    import pandas as pd

    rows = []
    for i, pos, neg in sign_flips(scores, k)[:limit]:
        thumb = data_uri(upscale(ws.train_images([i])[0], 48))
        rows.append({"image": thumb, "index": i, "label": ws.label(i),
                     "positive at steps": step_ranges(pos), "negative at steps": step_ranges(neg)})
    return pd.DataFrame(rows, columns=["image", "index", "label", "positive at steps", "negative at steps"])


def sample_uint8(traj: Trajectory) -> np.ndarray:
    """The final sample as uint8 (H, W, C) (decoded for latent models)."""
    return model_to_uint8(traj.display_sample[None])[0]
