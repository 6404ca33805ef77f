"""Tests for the bundled MNIST digits file and the shipped digit classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attribution.data import (
    DIGITS_FILE,
    build_digits_file,
    file_sha256,
    from_model_tensor,
    load_digit_arrays,
    to_model_tensor,
)
from attribution.models import (
    CLASSIFIER_DIR,
    DigitClassifier,
    count_parameters,
    evaluate_accuracy,
    load_classifier,
    save_classifier,
)


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digit_arrays("heldout")
    return to_model_tensor(images), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_classifier(CLASSIFIER_DIR)


def test_shipped_digits_file_shapes_and_splits() -> None:
    assert DIGITS_FILE.is_file()
    assert DIGITS_FILE.stat().st_size < 2_500_000
    expected = {"train": 4000, "heldout": 1000, "all": 5000}
    for split, n in expected.items():
        images, labels = load_digit_arrays(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() <= 9
        assert set(np.unique(labels).tolist()) == set(range(10))
    all_images, all_labels = load_digit_arrays("all")
    assert np.bincount(all_labels).tolist() == [500] * 10
    assert all_images.max() == 255 and all_images.min() == 0
    train_images, _ = load_digit_arrays("train")
    held_images, _ = load_digit_arrays("heldout")
    np.testing.assert_array_equal(np.concatenate([train_images, held_images]), all_images)


def test_load_digit_arrays_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        load_digit_arrays("test")
    with pytest.raises(FileNotFoundError, match="digits file not found"):
        load_digit_arrays("train", path=tmp_path / "missing.npz")


def test_build_digits_file_reproduces_shipped_file(tmp_path: Path) -> None:
    out = build_digits_file(tmp_path / "digits.npz")
    for split in ("train", "heldout", "all"):
        a_img, a_lab = load_digit_arrays(split, path=out)
        b_img, b_lab = load_digit_arrays(split)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
    assert file_sha256(out) == file_sha256(DIGITS_FILE)


def test_to_model_tensor_range_padding_and_round_trip() -> None:
    images, _ = load_digit_arrays("heldout")
    images = images[:64]
    x = to_model_tensor(images)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() == 1.0
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0][:, border] == -1.0)
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(images).float() / 127.5 - 1.0)

    back = from_model_tensor(x)
    assert back.shape == (64, 32, 32) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[:, 2:30, 2:30], images)
    assert np.all(back[:, border.numpy()] == 0)
    clamped = from_model_tensor(torch.full((1, 1, 32, 32), 3.0))
    assert np.all(clamped == 255)


def test_shipped_classifier_heldout_accuracy(
    classifier: DigitClassifier, heldout: tuple[torch.Tensor, torch.Tensor]
) -> None:
    assert not classifier.training
    assert count_parameters(classifier) < 200_000
    x, y = heldout
    accuracy = evaluate_accuracy(classifier, x, y)
    assert accuracy >= 0.97, accuracy


def test_classifier_output_shapes(
    classifier: DigitClassifier, heldout: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x = heldout[0][:8]
    with torch.no_grad():
        logits = classifier(x)
        feats = classifier.embed(x)
        proba = classifier.predict_proba(x)
    assert logits.shape == (8, 10)
    assert feats.shape == (8, classifier.embed_dim) and 64 <= classifier.embed_dim <= 128
    assert proba.shape == (8, 10)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(8))


def test_save_load_round_trip(
    tmp_path: Path, classifier: DigitClassifier, heldout: tuple[torch.Tensor, torch.Tensor]
) -> None:
    save_classifier(classifier, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))
    reloaded = load_classifier(tmp_path)
    x = heldout[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), classifier(x), rtol=0, atol=0)


def test_load_classifier_errors(tmp_path: Path, classifier: DigitClassifier) -> None:
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_classifier(tmp_path)
    other = tmp_path / "other"
    save_classifier(DigitClassifier(embed_dim=64), other)
    good = tmp_path / "good"
    save_classifier(classifier, good)
    # weights of one architecture with the config of another
    (good / "config.json").write_text((other / "config.json").read_text())
    with pytest.raises(ValueError, match="do not match"):
        load_classifier(good)
    (good / "config.json").write_text('{"architecture": "Something"}')
    with pytest.raises(ValueError, match="architecture"):
        load_classifier(good)
