"""The embedded default: every shipped asset loads through the public functions the app uses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from attribution.cli import main as cli_main
from attribution.config import SamplingConfig, TrainConfig
from attribution.data import digits_dataset, model_to_uint8
from attribution.models import train_ddpm
from attribution.sampling import sample_trajectory
from attribution.tools.assets import verify_assets
from attribution.workspace import ASSETS_DIR, Workspace, default_bundle


@pytest.fixture(scope="module")
def workspace() -> Workspace:
    return Workspace(default_bundle(), device="cpu")


def test_assets_match_manifest():
    assert verify_assets(ASSETS_DIR) == []


def test_workspace_loads_default(workspace):
    assert len(workspace.models) == 3
    assert workspace.image_shape == (1, 32, 32)
    assert workspace.num_train == 4000
    assert workspace.dataset.labels is not None and set(workspace.dataset.labels) == set(range(10))
    scorer = workspace.scorer("journey")  # opens the store and checks it against models + data
    assert scorer.store.is_complete()
    assert scorer.store.features(0).shape == (4000, 2048) and scorer.store.features(0).dtype == np.float16
    assert {"journey", "tracin", "retrac", "baseline-pixel", "baseline-embedding"} <= set(workspace.available_methods())


def test_shipped_models_generate_recognizable_digits(workspace):
    """Samples from seeds 0..15 of every checkpoint: most are classified with confidence >= 0.9."""
    confident = []
    for model in workspace.models:
        for seed in range(0, 16, 3):
            traj = sample_trajectory(model, SamplingConfig(num_inference_steps=25, seed=seed))
            p = workspace.classify(traj.sample[None])[0]
            confident.append(float(p.max()) >= 0.9)
    assert np.mean(confident) >= 0.6, f"only {np.mean(confident):.0%} of samples are confidently classified"


def test_training_image_ranks_itself_first(workspace):
    """Self-attribution: training images, uploaded, are their own top influencers at the late steps.

    8 random training digits x the last 6 of 50 DDIM steps (t = 100, 80, ..., 0), among all 4,000.
    Measured (24 digits, steps t = 140..0, ``benchmarks/self_attribution.py`` for the why): first in
    94 % of (digit, step) pairs at t <= 100, top 5 in 98 %; with the previous default's train
    draws (4 per example in equal strata of [0, T)) first in 39 %, and worse with plain inversion."""
    steps = list(range(44, 50))
    ids = np.random.default_rng(0).choice(workspace.num_train, 8, replace=False)
    ranks = []
    for i in ids:
        png = io.BytesIO()
        Image.fromarray(workspace.train_images([int(i)])[0][:, :, 0]).save(png, format="PNG")
        key, traj = workspace.upload(png.getvalue(), num_steps=50)
        assert traj.timesteps[steps].tolist() == [100, 80, 60, 40, 20, 0]
        scores = workspace.scores(key, "journey", steps)
        ranks.append([int((row > row[i]).sum()) for row in scores])
    ranks = np.array(ranks)
    assert (ranks == 0).mean() >= 0.85, ranks
    assert ((ranks == 0).sum(1) >= 4).all(), ranks  # every digit, at most steps
    assert (ranks < 10).mean() >= 0.95, ranks


def test_generated_sample_scores_shape_and_sign_spread(workspace):
    key, traj = workspace.generate(seed=0)
    scores = workspace.scores(key, "journey", [0, 25, 49])
    assert scores.shape == (3, 4000)
    assert (scores > 0).any() and (scores < 0).any()
    # scores at far-apart steps differ (journey-TRAK: steps >= 500 apart nearly uncorrelated)
    assert np.corrcoef(scores[0], scores[2])[0, 1] < 0.9


def test_train_command_short_epoch_reloads_with_diffusers(tmp_path):
    from diffusers import DDPMPipeline

    mask = np.zeros(4000, dtype=bool)
    mask[:64] = True
    np.save(tmp_path / "keep.npy", mask)
    out = tmp_path / "ddpm"
    assert cli_main(["train", "--data", "digits", "--out", str(out), "--epochs", "1", "--subset-mask", str(tmp_path / "keep.npy")]) == 0
    pipe = DDPMPipeline.from_pretrained(out, use_safetensors=True)
    assert pipe.unet.config.sample_size == 32
    assert cli_main(["train", "--data", "digits", "--out", str(out), "--epochs", "1"]) == 2  # refuses to overwrite
    assert cli_main(["train", "--out", str(tmp_path / "c"), "--epochs", "1", "--coupled"]) == 2  # needs a mask


class _Stop(Exception):
    pass


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    data = digits_dataset("train")
    images = data.images(range(96))
    cfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    train_ddpm(images, tmp_path / "straight", cfg)

    def stop_in_epoch_two(done: int, total: int) -> None:
        if done == 4:  # 3 steps per epoch: one step into the second epoch
            raise _Stop

    with pytest.raises(_Stop):
        train_ddpm(images, tmp_path / "resumed", cfg, progress=stop_in_epoch_two)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial").exists()
    train_ddpm(images, tmp_path / "resumed", cfg)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_to_uint8_round_trip():
    data = digits_dataset("heldout")
    x = data.images([0, 1])
    assert np.array_equal(model_to_uint8(x)[..., 0], data.array[:2])


def test_build_assets_verify_command(capsys):
    """`attribution build-assets --verify` (what .ci/run calls) checks the bundled files against MANIFEST.json."""
    assert cli_main(["build-assets", "--verify"]) == 0
    assert "all files match MANIFEST.json" in capsys.readouterr().out
