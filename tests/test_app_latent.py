"""The app on a user's own latent text-conditional model: prompt box, decoded images, captions, CLIP curves.

Builds, in the test session: a tiny random Stable-Diffusion-layout pipeline, a
captioned folder of 8 images, a journey store (d = 32) and a tiny random CLIP,
then launches the app on them through the launch environment variables
(``$ATTRIBUTION_MODEL`` ...; the same settings as ``streamlit run app.py -- --model DIR ...``).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from latent_builders import CAPTIONS, make_tiny_clip  # noqa: E402
from test_app import influencer_captions, make_app, stroke_png  # noqa: E402

IMG = re.compile(r"<img src='data:image/png;base64,([^']+)' alt='([^']*)'")


@pytest.fixture(scope="session")
def latent_launch(latent_dirs, caption_folder, tmp_path_factory) -> dict[str, str]:
    """Environment that launches the app on the tiny latent pipeline, its captioned data, a store and a CLIP."""
    from attribution.config import FeaturizeConfig
    from attribution.data import image_folder_dataset
    from attribution.features import featurize
    from attribution.models import load_model

    root = tmp_path_factory.mktemp("latent_app")
    model = load_model(latent_dirs["a"])
    data = image_folder_dataset(caption_folder, model.pixel_shape)
    featurize([model], data, root / "store", FeaturizeConfig(proj_dim=32, num_draws=1, store_dtype="float32"))
    clip = make_tiny_clip(root / "clip")
    allowed = ":".join(str(p) for p in (latent_dirs["a"].parent, caption_folder, root))
    return {"ATTRIBUTION_MODEL": str(latent_dirs["a"]), "ATTRIBUTION_DATA": str(caption_folder),
            "ATTRIBUTION_STORE": str(root / "store"), "ATTRIBUTION_CLIP": str(clip), "ATTRIBUTION_ALLOWED_DIRS": allowed}


@pytest.fixture
def latent_ws(latent_launch, monkeypatch):
    """The app's workspace under the latent launch settings (background scoring of all steps stubbed)."""
    import ui

    for k, v in latent_launch.items():
        monkeypatch.setenv(k, v)
    ws = ui.get_workspace()
    assert ws.models[0].is_conditional and ws.bundle.clip_dir is not None
    monkeypatch.setattr(ws, "prefetch", lambda key, method, steps, chunk=5: None)
    return ws


def shown_images(at) -> list[tuple[str, tuple[int, ...]]]:
    """(alt text, array shape) of every inline image of the page's markdown, in page order."""
    out = []
    for m in at.markdown:
        for data, alt in IMG.findall(m.value):
            out.append((alt, np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).shape))
    return out


def test_explore_with_a_prompt_shows_decoded_images_and_captions(latent_ws):
    ws = latent_ws
    at = make_app()
    prompt_box = at.text_input(key="prompt_input")
    assert prompt_box.label == "Prompt" and prompt_box.value == CAPTIONS[0]
    assert at.number_input(key="guidance_input").value == 7.5
    assert at.session_state["sample"]["prompt"] == CAPTIONS[0]  # the first sample already uses it

    at.text_input(key="prompt_input").set_value("blue stripes")
    at.number_input(key="guidance_input").set_value(3.0)
    at.number_input(key="seed_input").set_value(5)
    [b for b in at.button if b.label == "Generate"][0].click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.session_state["sample"] == {"kind": "seed", "seed": 5, "prompt": "blue stripes", "guidance_scale": 3.0}
    key = at.session_state["sample_key"]
    traj = ws.trajectory(key)
    assert traj.prompt == "blue stripes" and traj.config.guidance_scale == 3.0
    assert any("“blue stripes”" in m.value for m in at.markdown)  # under the final sample

    images = shown_images(at)
    # x_t: the (4, 8, 8) latent's first 3 channels; x0_hat and the sample decoded to (3, 16, 16); thumbnails RGB 16x16
    assert images[0] == ("Noisy input x_t", (8, 8, 3))
    assert images[1] == ("One-step prediction x̂0", (16, 16, 3)) and images[2] == ("Final sample", (16, 16, 3))
    thumbs = images[3:]
    assert len(thumbs) == 8 and all(shape == (16, 16, 3) for _, shape in thumbs)
    # the final sample shown is the VAE decoding of the final latent, not the latent
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(IMG.findall(
        [m.value for m in at.markdown if "alt='Final sample'" in m.value][0])[0][0]))))
    np.testing.assert_array_equal(shown, ui_sample(traj))

    caps = influencer_captions(at)
    assert len(caps) == 8  # 4 + 4: with 8 training images, no image is in both grids
    step = at.select_slider(key="step").value
    row = ws.scores(key, "journey", [step])[0]
    order = np.argsort(-row, kind="stable")
    for rank, i in enumerate(list(order[:4]) + list(order[::-1][:4])):  # the captions, most extreme first
        assert f"“{CAPTIONS[i]}” · idx {i}" in caps[rank], (rank, caps[rank])
    assert {c.split("“")[1].split("”")[0] for c in caps} <= set(CAPTIONS)


def ui_sample(traj) -> np.ndarray:
    import ui

    return ui.sample_uint8(traj)


def plotly_array(values) -> np.ndarray:
    """A trace's data: a list, or plotly's typed-array encoding {"dtype": "f4", "bdata": base64}."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
    return np.asarray(values, dtype=float)


def test_feature_curves_with_text_labels(latent_ws):
    at = make_app("curves", curve_samples=2)
    labels = at.text_area(key="curve_labels")
    assert labels.value.splitlines()[0] == CAPTIONS[0]  # the prompt first, then captions
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert len(fig["data"]) == len(labels.value.splitlines())
    assert fig["layout"]["yaxis"]["title"]["text"] == "probability of the label"
    at.text_area(key="curve_labels").set_value("a red square\nblue stripes\ndark noise").run()
    assert not at.exception, [e.message for e in at.exception]
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert sorted(t["name"] for t in fig["data"]) == sorted(["“a red square”", "“blue stripes”", "“dark noise”"])
    probs = np.array([plotly_array(t["y"]) for t in fig["data"]])
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)  # the labels share the probability
    at.text_area(key="curve_labels").set_value("only one").run()
    assert any("at least two" in e.value for e in at.error)


def test_patch_and_other_pages_run_on_the_latent_model(latent_ws):
    drawing = {"drawing": {"raw": {"objects": [{"type": "path"}]}, "data": stroke_png(288, 288)}, "backgroundFit": None}
    at = make_app("patch", patch_canvas_0=drawing)
    assert any("the mask as the model sees it: 16×16" in c for el in at.get("image") for c in el.captions)
    assert len(influencer_captions(at)) == 16  # painted patch + whole image, 4 + 4 each
    for page in ("about", "compare"):
        make_app(page)


def test_launch_settings_from_arguments(latent_launch, tmp_path):
    import ui

    env = {"ATTRIBUTION_ALLOWED_DIRS": latent_launch["ATTRIBUTION_ALLOWED_DIRS"]}
    model, data, store = latent_launch["ATTRIBUTION_MODEL"], latent_launch["ATTRIBUTION_DATA"], latent_launch["ATTRIBUTION_STORE"]
    s = ui.launch_settings(["--model", model, "--data", data, "--store", store], env)
    assert s == ui.LaunchSettings(model=(str(Path(model).resolve()),), data=str(Path(data).resolve()),
                                  store=str(Path(store).resolve()))
    assert ui.launch_settings([], env) is None  # nothing given: the bundled default
    with pytest.raises(ValueError, match="needs --data"):
        ui.launch_settings(["--model", model], env)
    with pytest.raises(ValueError, match="outside the allowed"):
        ui.launch_settings(["--model", model, "--data", str(tmp_path), "--store", store], env)
    (tmp_path / "link").symlink_to("/etc")  # a link out of an allowed directory is resolved first
    with pytest.raises(ValueError, match="outside the allowed"):
        ui.launch_settings(["--model", model, "--data", data, "--store", store, "--clip", str(tmp_path / "link")],
                           {"ATTRIBUTION_ALLOWED_DIRS": f"{env['ATTRIBUTION_ALLOWED_DIRS']}:{tmp_path}"})
    with pytest.raises(ValueError, match="does not exist"):
        ui.launch_settings(["--model", model + "-missing", "--data", data, "--store", store], env)
    with pytest.raises(ValueError, match="bad app arguments"):
        ui.launch_settings(["--modle", model], env)


def test_over_the_steps_labels_rows_with_captions(latent_ws):
    ws = latent_ws
    key, _ = ws.generate(0, num_steps=6, prompt="a red square", guidance_scale=2.0)
    ws.scores(key, "journey", range(6))  # every step scored, as the background job would
    at = make_app("over_steps", sample={"kind": "seed", "seed": 0, "prompt": "a red square", "guidance_scale": 2.0},
                  sample_key=key)
    specs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    assert len(specs) == 2 and specs[1]["data"][0]["type"] == "heatmap"
    rows = specs[1]["data"][0]["y"]
    assert rows and all(any(f"“{c}”" in r for c in CAPTIONS) for r in rows)
    assert f"(“{CAPTIONS[at.number_input(key='example_idx').value]}”)" in specs[0]["layout"]["title"]["text"]
