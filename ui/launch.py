"""Which workspace the app serves: the launch settings (command line, environment), loaded once per server.

The workspace is shared by every session (``st.cache_resource``): its models, stores and
caches, and its background jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import streamlit as st

from attribution.config import FeaturizeConfig
from attribution.tools import PathEscapeError, resolve_within
from attribution.tools.threads import THREADS_ENV, configure_torch_threads
from attribution.workspace import ASSETS_DIR, CACHE_DIR, Bundle, Workspace, custom_bundle, default_bundle

from .labels import DTRAK_OUTPUTS

BUNDLE_ENV = "ATTRIBUTION_BUNDLE"


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


@st.cache_resource(show_spinner="Loading the models, the training set and the attribution store…")
def _load_workspace(bundle_dir: str | None) -> Workspace:
    configure_torch_threads()
    bundle = bundle_from_dir(bundle_dir) if bundle_dir else default_bundle()
    return Workspace(bundle)


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
    return Workspace(bundle)


def get_workspace() -> Workspace:
    """The shared workspace: the launch settings' model if given (:func:`launch_settings`),
    else ``$ATTRIBUTION_BUNDLE`` if set, else the bundled digits ensemble."""
    settings = launch_settings()
    if settings is not None:
        return _load_custom_workspace(settings)
    return _load_workspace(os.environ.get(BUNDLE_ENV) or None)
