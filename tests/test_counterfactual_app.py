"""Explore's counterfactual panel: AppTest (start, progress, result, cancel) and the real app in Chromium
(start a job on a tiny bundle, see its progress, reload the page, see the result)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from cf_bundle import build_cf_bundle
from test_app import APP, REPO, TIMEOUT, texts

BUNDLE_ENV = "ATTRIBUTION_BUNDLE"
SHOTS = Path("/tmp") / "cf-screenshots"  # not in the repository


@pytest.fixture(scope="module")
def cf_root(tmp_path_factory) -> Path:
    return build_cf_bundle(tmp_path_factory.mktemp("cfapp") / "bundle")


@pytest.fixture
def cf_ws(cf_root, tmp_path, monkeypatch):
    import ui

    monkeypatch.setenv(BUNDLE_ENV, str(cf_root))
    ws = ui.get_workspace()
    ws.counterfactual_cache = tmp_path / "cache"
    monkeypatch.setattr(ws, "prefetch", lambda key, method, steps, chunk=5: None)
    return ws


def _app(**state):
    from streamlit.testing.v1 import AppTest

    import ui

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _wait_done(ws, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while ws.counterfactual_jobs() and time.time() < deadline:
        time.sleep(0.1)
    assert not ws.counterfactual_jobs()


def test_panel_start_shows_result_and_control(cf_ws):
    import ui

    at = _app(**{ui.state.CF_K: 10})
    assert "What if these were never in the training set?" in [e.label for e in at.expander]
    assert "Not computed yet for seed 0 at step 25: press Start." in texts(at)
    assert "At most 2 run at once" in texts(at)
    assert at.selectbox(key=ui.state.CF_RULE).options[:3] == [ui.counterfactual.RULES[r] for r in ("top", "bottom", "random")]
    at.button(key="cf-start").click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert len(cf_ws.counterfactual_jobs()) in (0, 1, 2)  # started (the tiny run may already be done)
    _wait_done(cf_ws)
    at.run()
    shown = texts(at)
    assert "**Without top-10**" in shown and "**Without random-10**" in shown and "**Original**" in shown
    assert shown.count("pixel distance") == 2 and "Δf_t measured" in shown and "predicted" in shown
    assert "class **" in shown  # the classifier's class and probability
    # opening the same counterfactual again: instant, from the disk cache
    t0 = time.perf_counter()
    again = _app(**{ui.state.CF_K: 10})
    assert "**Without top-10**" in texts(again) and not cf_ws.counterfactual_jobs()
    assert time.perf_counter() - t0 < 30
    # the showcase of another model is not shown for this one
    assert "No precomputed counterfactuals ship with this model." in shown


def test_panel_progress_and_cancel(cf_ws, monkeypatch):
    """A long job shows its progress bar with the time left and a Cancel button that leaves nothing on disk."""
    import ui
    from dataclasses import replace

    real = cf_ws.counterfactual_request

    def long_request(*a, **k):  # 2000 epochs: long enough to watch
        r = real(*a, **k)
        return replace(r, train=replace(r.train, epochs=2000))

    monkeypatch.setattr(cf_ws, "counterfactual_request", long_request)
    at = _app(**{ui.state.CF_K: 10, ui.state.CF_CONTROL: False})
    at.button(key="cf-start").click().run()
    deadline = time.time() + 60
    while not any(j.done > 3 for _, j in cf_ws.counterfactual_jobs()) and time.time() < deadline:
        time.sleep(0.05)
    at.run()
    bars = [p.proto.text for p in at.get("progress")]
    assert any("Without top-10 (seed 0, step 25): retraining without them" in b and "left" in b for b in bars), bars
    cancel = [b for b in at.button if b.label == "Cancel"]
    assert len(cancel) == 1
    cancel[0].click().run()
    _wait_done(cf_ws, 30)
    assert not list((cf_ws.counterfactual_cache).rglob("*.png"))
    assert not [p for p in cf_ws.counterfactual_cache.rglob("*") if p.is_file()]
    assert "Not computed yet" in texts(at)


# ---------------------------------------------------------------------------- the real app in Chromium
sys.path.insert(0, str(REPO / "benchmarks"))
from first_paint import CHROMIUM, CHROMIUM_ARGS, streamlit_server  # noqa: E402


def _choose(page, label: str, option: str, tries: int = 10) -> None:
    """Pick ``option`` of the selectbox ``label``; reopens the list when a rerun of the page closed it."""
    for _ in range(tries):
        page.get_by_role("combobox", name=label, exact=True).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            return
        except Exception:  # playwright's TimeoutError: the list was closed by a rerun
            time.sleep(1)
    raise AssertionError(f"could not choose {option!r} in {label!r}")


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium")
def test_browser_start_reload_result(tmp_path):
    cf_root = build_cf_bundle(tmp_path / "bundle", epochs=8)  # a replay of some seconds: long enough to watch
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    env = {BUNDLE_ENV: str(cf_root), "ATTRIBUTION_CACHE": str(tmp_path / "cache")}
    with streamlit_server(REPO, tmp_path / "streamlit.log", env) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            page.get_by_text("What if these were never in the training set?").wait_for(timeout=240_000)
            # k = 10 (the tiny bundle has 48 training images)
            _choose(page, "k", "10")
            page.get_by_text("Not computed yet for seed 0 at step 25").wait_for(timeout=60_000)
            page.get_by_role("button", name="Start").click()
            page.get_by_text("retraining without them").first.wait_for(timeout=60_000)
            SHOTS.mkdir(exist_ok=True)
            panel = page.locator("[data-testid='stExpander']").filter(has_text="What if these were never")
            panel.screenshot(path=str(SHOTS / "counterfactual-progress.png"))
            page.reload()  # a new session: the widgets are back at k = 100, the job and its result are the server's
            page.get_by_text("Running on this server").or_(page.get_by_text("Computed earlier for seed 0")).first.wait_for(
                timeout=240_000)
            page.get_by_text("Computed earlier for seed 0").wait_for(timeout=240_000)
            page.get_by_text("Without random-10 (step 25)").first.wait_for(timeout=60_000)
            page.get_by_text("pixel distance").first.wait_for(timeout=60_000)
            panel.screenshot(path=str(SHOTS / "counterfactual-result.png"))
        finally:
            browser.close()
