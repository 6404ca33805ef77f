"""Datasets and image decoding: the conversion rule and clear errors on bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from attribution.data import ImageDecodeError, decode_image, image_folder_dataset, load_dataset


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
        (_png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)))[:200], "could not be decoded"),
        (_bomb_png(100_000, 100_000), "more pixels than the limit"),
        (_bomb_png(8_000, 8_000), "more than the limit"),
    ],
)
def test_bad_uploads_get_clear_errors(payload, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(payload, (1, 32, 32))


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (50, 40), (255, 255, 255, 128)),
        Image.new("CMYK", (64, 64), (0, 0, 0, 0)),
        Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)),
        Image.new("P", (33, 33)),
        Image.new("1", (16, 16), 1),
    ],
)
def test_modes_and_sizes_are_converted(img):
    for shape in ((1, 32, 32), (3, 16, 16)):
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if img.mode == "CMYK" else "PNG")
        x = decode_image(buf.getvalue(), shape)
        assert tuple(x.shape) == shape
        assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_resize_then_center_crop():
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, 10:30] = 255  # a centered white band, half the width
    x = decode_image(_png(Image.fromarray(arr)), (1, 8, 8))
    # shorter side 20 -> 8 (width 16), center crop 8: the band fills the crop
    assert float(x.mean()) > 0.9


def test_image_folder_with_class_subfolders(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    ds = image_folder_dataset(tmp_path, (3, 8, 8))
    assert len(ds) == 6 and ds.image_shape == (3, 8, 8)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images([0, 5]).shape == (2, 3, 8, 8)
    assert ds.fingerprint() == image_folder_dataset(tmp_path, (3, 8, 8)).fingerprint()


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        image_folder_dataset(tmp_path / "absent", (1, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        image_folder_dataset(tmp_path, (1, 8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        image_folder_dataset(tmp_path, (1, 8, 8))


def test_load_dataset_specs(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.arange(5))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert len(ds) == 5 and ds.labels.tolist() == list(range(5))
    digits = load_dataset("digits:heldout")
    assert len(digits) == 1000 and digits.image_shape == (1, 32, 32)
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nothing"))


def test_cli_bad_image_is_a_one_line_error(tmp_path, tiny_model_dirs, tiny_dataset, capsys):
    from attribution.cli import main
    from attribution.config import FeaturizeConfig
    from attribution.features import featurize
    from attribution.models import load_models

    featurize(load_models(tiny_model_dirs), tiny_dataset, tmp_path / "store", FeaturizeConfig(proj_dim=16, num_draws=1))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code = main(["attribute", "--store", str(tmp_path / "store"), "--image", str(bad), "--out", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "not an image" in err[0]
    assert not (tmp_path / "o.npz").exists()
    code = main(["attribute", "--store", str(tmp_path / "store"), "--seed", "1", "--steps", "0,3",
                 "--num-steps", "4", "--num-resamples", "2", "--out", str(tmp_path / "o.npz")])
    assert code == 0
    with np.load(tmp_path / "o.npz") as z:
        assert z["scores"].shape == (2, len(tiny_dataset)) and z["top_positive"].shape == (2, 10)
        assert z["x0_hat"].shape == (2, 1, 8, 8)
