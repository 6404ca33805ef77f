"""Feature-likelihood curves of free-text labels with a local CLIP model (tiny random CLIP saved here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from latent_builders import make_tiny_clip  # noqa: E402

from attribution.config import SamplingConfig
from attribution.models import ModelLoadError, check_labels, load_clip, load_model
from attribution.sampling import continue_from_step, label_curves, likelihood_curves, sample_trajectory

LABELS = ["a red square", "blue stripes", "dark noise"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def clip(clip_dir):
    return load_clip(clip_dir)


def test_label_probabilities_match_the_clip_model(clip):
    """p(label | image) = softmax of CLIPModel's own logits_per_image on the same pixel values."""
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    probs = clip.label_probs(images, LABELS)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    tok = clip.tokenizer(LABELS, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    out = clip.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=clip.preprocess(images))
    torch.testing.assert_close(probs, out.logits_per_image.softmax(-1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(probs[0], probs[1])  # the image matters
    assert clip.embed_images(images[:1].mean(1, keepdim=True)).shape == (1, 16)  # grayscale is repeated


def test_preprocessing_follows_the_image_processor(clip, clip_dir):
    """Resize of the shorter side, center crop and mean/std as transformers' CLIPImageProcessor does them."""
    from transformers import CLIPImageProcessor

    # smooth ramps (PIL's and torch's bicubic kernels differ on noise) with a distinct level per channel,
    # and a bright block on the left: a wrong crop offset, axis or channel order shows at once
    yy, xx = np.mgrid[0:24, 0:40]
    arr = np.stack([4 * yy + 20, 5 * xx + 10, np.full_like(yy, 90)], -1).astype(np.uint8)
    arr[:, :18] = 250
    ref = CLIPImageProcessor.from_pretrained(clip_dir)(images=[Image.fromarray(arr)], return_tensors="pt").pixel_values
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = clip.preprocess(x)
    assert ours.shape == ref.shape == (1, 3, 16, 16)
    # resampling differs slightly between PIL and torch (measured: mean 0.0014, max 0.009; 1/255 ~ 0.015 here)
    assert float((ours - ref).abs().mean()) < 0.01 and float((ours - ref).abs().max()) < 0.05


def test_label_curves_average_clip_over_the_continuations(latent_dirs, clip):
    model = load_model(latent_dirs["a"])
    traj = sample_trajectory(model, SamplingConfig(num_inference_steps=4, seed=2, prompt="a red square", guidance_scale=2.0))
    curves = label_curves(model, traj, clip, LABELS, steps=[0, 2, 3], num_samples=3)
    assert curves.probs.shape == (3, 3) and list(curves.steps) == [0, 2, 3]
    np.testing.assert_allclose(curves.probs.sum(1), 1.0, rtol=1e-5)
    # the same continuation samples as the classifier curves, scored by CLIP
    want = clip.label_probs(continue_from_step(model, traj, 2, 3, seed=0), LABELS).mean(0).numpy()
    np.testing.assert_allclose(curves.probs[1], want, rtol=1e-5, atol=1e-6)
    same = likelihood_curves(model, traj, lambda x: clip.label_probs(x, LABELS), [2], 3)
    np.testing.assert_allclose(same.probs[0], want, rtol=1e-5, atol=1e-6)


def test_bad_labels_and_directories_are_refused(clip, tmp_path):
    assert check_labels([" cat ", "dog"]) == ["cat", "dog"]
    for bad, msg in ((["cat"], "two"), (["cat", " "], "empty"), (["cat", "cat"], "distinct")):
        with pytest.raises(ValueError, match=msg):
            clip.label_probs(torch.zeros(1, 3, 16, 16), bad)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_clip(tmp_path)
