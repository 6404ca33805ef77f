"""Bad and odd uploads: a clear ImageDecodeError (never another exception), a one-line CLI error, an
st.error on the Explore page; nothing crashes and nothing is written. The decoder is fuzzed with hypothesis."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_data import _bomb_png as bomb_png

from attribution.data import ImageDecodeError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(shape, dtype=np.uint8, top=255):
    return np.random.default_rng(0).integers(0, top, shape, dtype=dtype)


RGB = Image.fromarray(_noise((40, 30, 3)))
PNG = encode(RGB, "PNG")
JPEG = encode(RGB, "JPEG", quality=90)

#: name -> (bytes, part of the expected message)
BAD = {
    "text": (b"name,value\n1,2\n", "not an image"),
    "empty": (b"", "empty"),
    "html": (b"<html><script>alert(1)</script></html>", "not an image"),
    "truncated-png": (PNG[: len(PNG) // 2], "could not be decoded"),
    "truncated-jpeg": (JPEG[: len(JPEG) // 2], "could not be decoded"),
    "png-header-only": (PNG[:40], "could not be decoded"),
    "bomb-100000x100000": (bomb_png(100_000, 100_000), "more pixels than the limit"),
    "bomb-8000x8000": (bomb_png(8_000, 8_000), "more than the limit"),
    "strip-1x5000": (encode(Image.new("L", (5000, 1)), "PNG"), "more than 64 times"),
}

#: name -> image that must be converted (modes and sizes the conversion rule handles)
ODD = {
    "16-bit": encode(Image.fromarray(_noise((20, 30), np.uint16, 65535)), "PNG"),
    "cmyk-jpeg": encode(Image.fromarray(_noise((24, 24, 4)), "CMYK"), "JPEG"),
    "alpha": encode(Image.fromarray(_noise((50, 40, 4)), "RGBA"), "PNG"),
    "gray-alpha": encode(Image.fromarray(_noise((16, 16, 2)), "LA"), "PNG"),
    "palette-transparency": encode(Image.new("P", (33, 33)), "PNG", transparency=0),
    "3x3": encode(Image.fromarray(_noise((3, 3))), "PNG"),
    "wide-300x20": encode(Image.fromarray(_noise((20, 300, 3))), "JPEG"),
    "bmp": encode(RGB, "BMP"),
    "webp": encode(RGB, "WEBP"),
    "gif": encode(RGB.convert("P"), "GIF"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_uploads_get_a_clear_error(name):
    data, message = BAD[name]
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, (1, 32, 32))


@pytest.mark.parametrize("name", ODD)
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 16, 16)])
def test_odd_uploads_are_converted(name, shape):
    x = decode_image(ODD[name], shape)
    assert tuple(x.shape) == shape and bool(x.isfinite().all())
    assert float(x.min()) >= -1 and float(x.max()) <= 1


# ---------------------------------------------------------------------------- fuzzing
SEEDS = [PNG, JPEG, ODD["16-bit"], ODD["cmyk-jpeg"], ODD["alpha"], ODD["bmp"], ODD["webp"], ODD["gif"],
         encode(RGB, "TIFF"), encode(Image.fromarray(_noise((8, 8))), "ICO")]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image file with random bytes overwritten, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(mutated_images(), st.binary(max_size=512)), st.sampled_from([(1, 32, 32), (3, 16, 16)]))
def test_fuzzed_uploads_raise_only_image_decode_error(data, shape):
    try:
        x = decode_image(data, shape)
    except ImageDecodeError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert tuple(x.shape) == shape and bool(x.isfinite().all())
    assert float(x.min()) >= -1 and float(x.max()) <= 1


# ---------------------------------------------------------------------------- CLI
def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``roots`` (what "nothing written" is checked against)."""
    out = {}
    for root in roots:
        for p in Path(root).rglob("*") if Path(root).exists() else []:
            if p.is_file():
                st_ = p.stat()
                out[str(p)] = (st_.st_size, st_.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def cli_store(tiny_models, tiny_dataset, tmp_path_factory) -> Path:
    from attribution.config import FeaturizeConfig
    from attribution.features import featurize

    root = tmp_path_factory.mktemp("cli") / "store"
    featurize(tiny_models, tiny_dataset, root, FeaturizeConfig(proj_dim=16, num_draws=1))
    return root


@pytest.mark.parametrize("name", [*BAD, "directory", "absent"])
def test_cli_attribute_bad_image_is_one_line(name, cli_store, tiny_model_dirs, tmp_path, capsys):
    from attribution.cli import main

    if name == "directory":
        image = tmp_path / "dir.png"
        image.mkdir()
    elif name == "absent":
        image = tmp_path / "absent.png"
    else:
        image = tmp_path / f"{name}.png"
        image.write_bytes(BAD[name][0])
    before = _tree(cli_store, tmp_path, *tiny_model_dirs)
    code = main(["attribute", "--store", str(cli_store), "--image", str(image), "--out", str(tmp_path / "o.npz"),
                 "--num-steps", "3", "--num-resamples", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert _tree(cli_store, tmp_path, *tiny_model_dirs) == before  # no output, nothing touched


def test_cli_attribute_odd_image_works(cli_store, tmp_path, capsys):
    from attribution.cli import main

    image = tmp_path / "cmyk.jpg"
    image.write_bytes(ODD["cmyk-jpeg"])
    code = main(["attribute", "--store", str(cli_store), "--image", str(image), "--out", str(tmp_path / "o.npz"),
                 "--num-steps", "3", "--steps", "1", "--num-resamples", "2"])
    assert code == 0, capsys.readouterr().err
    with np.load(tmp_path / "o.npz") as z:
        assert z["scores"].shape == (1, 24) and np.isfinite(z["scores"]).all()


# ---------------------------------------------------------------------------- the Explore page
from test_app import REPO, app_bundle, make_app, quiet_prefetch, ws  # noqa: E402,F401  (fixtures)

APP_BAD = ["text", "empty", "truncated-png", "truncated-jpeg", "bomb-100000x100000", "bomb-8000x8000", "strip-1x5000"]
APP_ODD = ["16-bit", "cmyk-jpeg"]  # the other modes and sizes: test_odd_uploads_are_converted


def test_explore_page_uploads(app_bundle, ws):
    """Each bad file: an st.error naming it, the sample unchanged; each odd one: inverted. Nothing written."""
    from attribution.workspace import ASSETS_DIR, CACHE_DIR

    watched = [ASSETS_DIR, CACHE_DIR, REPO / "attribution", REPO / "views"] + ([Path(app_bundle)] if app_bundle else [])
    at = make_app()
    before = _tree(*watched)
    for name in APP_BAD:
        at.file_uploader[0].set_value((f"{name}.png", BAD[name][0], "image/png")).run()
        assert not at.exception, (name, [e.message for e in at.exception])
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and errors[0].startswith(f"Could not use {name}.png: "), (name, errors)
        assert BAD[name][1] in errors[0]
        assert at.session_state["sample"] == {"kind": "seed", "seed": 0}, name
    for name in APP_ODD:
        at.file_uploader[0].set_value((f"{name}.png", ODD[name], "image/png")).run()
        assert not at.exception and not at.error, (name, [e.value for e in at.error])
        assert at.session_state["sample"]["kind"] == "upload" and at.session_state["sample"]["name"] == f"{name}.png"
    assert _tree(*watched) == before
