"""Shared fixtures: tiny diffusers models saved on disk and tiny datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from attribution.data import ArrayDataset
from attribution.models import load_models


def make_tiny_pipeline(directory: Path, seed: int, channels: int = 1, size: int = 8, prediction: str = "epsilon",
                       shift: float = 3.0) -> Path:
    """A random tiny UNet2DModel + its training scheduler saved in DDPMPipeline layout.

    ``prediction``: the objective (``"epsilon"``, ``"v_prediction"``, ``"sample"``: a DDPMScheduler with
    that prediction_type; ``"flow"``: a FlowMatchEulerDiscreteScheduler with ``shift``).
    """
    from attribution.models import make_training_scheduler

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=False,
    )
    # Random init gives near-zero outputs in places; perturb so gradients are informative.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = make_training_scheduler(prediction, 100, shift)
    unet.save_pretrained(directory / "unet")
    sched.save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1", '
        f'"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "{type(sched).__name__}"]}}'
    )
    return directory


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return [make_tiny_pipeline(root / f"m{seed}", seed) for seed in (0, 1)]


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    return load_models(tiny_model_dirs)


@pytest.fixture(scope="session")
def tiny_dataset() -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 8, 8), dtype=np.uint8)
    labels = np.arange(24) % 3
    return ArrayDataset(images, labels=labels, name="tiny")


# ---------------------------------------------------------------------- latent text-conditional pipelines
@pytest.fixture(scope="session")
def latent_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD-layout pipeline ``a``; ``other_vae`` and ``other_text`` differ from it in one component."""
    import shutil

    pytest.importorskip("transformers")
    from latent_builders import make_tiny_latent_pipeline, tiny_text_encoder, tiny_vae

    root = tmp_path_factory.mktemp("latent_models")
    a = make_tiny_latent_pipeline(root / "a")
    variants = {"other_vae": ("vae", tiny_vae(11)), "other_text": ("text_encoder", tiny_text_encoder(21))}
    for name, (component, module) in variants.items():
        shutil.copytree(a, root / name)
        shutil.rmtree(root / name / component)
        module.save_pretrained(root / name / component)
    return {"a": a, **{name: root / name for name in variants}}


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory) -> Path:
    """8 RGB 16x16 images with captions in metadata.jsonl (tests/latent_builders.py)."""
    from latent_builders import write_caption_folder

    return write_caption_folder(tmp_path_factory.mktemp("captioned"))


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory) -> dict:
    """The whole ``attribution bench`` pipeline on 20 digits at 8x8, 8 subsets x 2 training seeds, 2 checkpoints,
    1-epoch models, counterfactual with 2 training seeds (~40 s).

    Returns {"work": work dir, "out": report dir, "methods": methods evaluated}.
    """
    from attribution.cli import main

    root = tmp_path_factory.mktemp("bench")
    work, out = root / "work", root / "results"
    w = ["--work", str(work)]
    q = ["--num-queries", "3", "--num-val-queries", "2", "--num-resamples", "2", "--proj-dim", "32",
         "--num-draws", "1", "2", "--ridges", "0.1", "1.0"]
    methods = ["journey", "trak-final", "tracin", "retrac", "dtrak-square", "das", "das-leverage", "pixel", "embedding"]
    steps = [
        ["bench", "prepare", *w, "--num-train", "20", "--image-size", "8", "--num-subsets", "8",
         "--num-checkpoints", "2", "--epochs", "1", "--block-out-channels", "4", "8"],
        ["bench", "retrain", *w, "--replicates", "2"],
        ["bench", "lds", *w, *q, "--methods", *methods, "--replicates", "2"],
        ["bench", "counterfactual", *w, *q, "--num-cf-queries", "1", "--ks", "2", "--kinds", "journey", "journey-bottom", "random",
         "--cf-num-draws", "1", "--cf-train-seeds", "0", "1", "--coupled"],
        ["bench", "report", *w, "--out", str(out)],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return {"work": work, "out": out, "methods": methods}
