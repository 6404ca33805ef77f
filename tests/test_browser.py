"""The real app in headless Chromium: generate, scrub the step slider, paint a patch, visit every page.

Starts ``streamlit run app.py`` on a free port (stopped by PID at teardown), drives
it with Playwright through Debian's ``/usr/bin/chromium`` (see
``docs/browser-testing.md``), saves a screenshot of every page into
``screenshots/`` and prints (does not assert) the time of a first computation and
of redraws of cached steps.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_app import REPO, ensure_app_bundle

sys.path.insert(0, str(REPO / "benchmarks"))
from first_paint import CHROMIUM, CHROMIUM_ARGS, measure, streamlit_server  # noqa: E402

SHOTS = REPO / "screenshots"
SLOW = 300_000  # ms: the first page load includes loading the models and scoring a step on a busy CPU

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of a fresh ``streamlit run app.py``; the process is stopped by its PID afterwards."""
    bundle = ensure_app_bundle(tmp_path_factory.mktemp("browser"))
    env = {"ATTRIBUTION_BUNDLE": bundle} if bundle else None
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    with streamlit_server(REPO, log_path, env) as (url, _):
        yield url
    tail = log_path.read_text()[-2000:]
    if "Traceback" in tail:
        print(f"--- server log tail ---\n{tail}")


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors
        try:
            yield pg
        finally:
            browser.close()


# ---------------------------------------------------------------------------- helpers
def wait_idle(page, timeout: float = SLOW) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=timeout)


def influencer_captions(page, within: str = '[data-testid="stMain"]') -> list[str]:
    caps = page.locator(f"{within} .influencer-grid figcaption").all_inner_texts()
    return [" ".join(c.split()) for c in caps]


def wait_captions_change(page, before: list[str], timeout: float = SLOW) -> list[str]:
    """Wait until the influencer captions differ from ``before`` (and are complete), then return them."""
    deadline = time.time() + timeout / 1000
    while time.time() < deadline:
        now = influencer_captions(page)
        if now and now != before and len(now) >= len(before):
            return now
        time.sleep(0.02)
    raise AssertionError(f"influencer grid did not change from {before[:2]}…")


def wait_caption_count(page, n: int, timeout: float = 60) -> None:
    """Wait until exactly ``n`` influencer captions are shown (stale elements fade out after a rerun)."""
    deadline = time.time() + timeout
    while len(influencer_captions(page)) != n:
        assert time.time() < deadline, f"expected {n} influencer captions, see {len(influencer_captions(page))}"
        time.sleep(0.05)


def wait_background_done(page, timeout: float = 600) -> None:
    """Wait until the background scoring progress bar is gone."""
    deadline = time.time() + timeout
    while page.locator('[data-testid="stMain"] [data-testid="stProgress"]').count():
        if time.time() > deadline:
            raise AssertionError("background scoring did not finish")
        time.sleep(0.5)
    wait_idle(page)


def goto_page(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.wait_for_selector(f'h1:has-text("{title}")', timeout=SLOW)
    wait_idle(page)


def screenshot(page, name: str) -> None:
    """Screenshot of the whole page: the viewport is stretched to the main area's height first."""
    SHOTS.mkdir(exist_ok=True)
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1440, "height": max(1000, min(int(height) + 40, 6000))})
    time.sleep(0.6)  # let images and charts lay out at the new size
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size({"width": 1440, "height": 1000})


def slider_input(page):
    return page.locator('[data-testid="stMain"] [data-testid="stSlider"] input[type="range"]').first


def thumb_value(page) -> str:
    return page.locator('[data-testid="stMain"] [data-testid="stSliderThumbValue"]').first.inner_text()


def paint(page, points: list[tuple[float, float]]) -> None:
    """Drag the mouse along ``points`` given as fractions of the canvas' width and height."""
    canvas = page.locator('[data-testid="stBidiComponentIsolated"] canvas.upper-canvas')
    canvas.wait_for(timeout=60_000)
    box = canvas.bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=25)
    page.mouse.up()


# ---------------------------------------------------------------------------- the tour
def test_explore_slider_and_timings(page, server):
    t0 = time.perf_counter()
    page.goto(server)
    page.wait_for_selector("text=Positive influencers", timeout=SLOW)
    wait_idle(page)
    print(f"\nfirst page load (models + seed 0 + first step): {time.perf_counter() - t0:.2f} s")
    wait_caption_count(page, 16)
    caps = influencer_captions(page)
    assert caps[0].startswith("#1 +")
    assert page.locator('[data-testid="stSidebar"]').get_by_text("Current sample:").count() == 1

    # A first computation: a new seed, generated and scored at the current step.
    page.locator('[data-testid="stNumberInputField"]').first.fill("4242")
    t0 = time.perf_counter()
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("text=seed 4242", timeout=SLOW)
    caps = wait_captions_change(page, caps)
    wait_idle(page)
    first = time.perf_counter() - t0
    server_side = page.locator("text=/scores (computed in [0-9.]+ s|from cache)/").first.inner_text()
    print(f"first computation (generate seed 4242 + score one step, click to grid): {first:.2f} s; page says: {server_side}")

    # Wait for the other steps, then time redraws of cached steps with the keyboard.
    wait_background_done(page)
    caps = influencer_captions(page)
    times = []
    slider = slider_input(page)
    for _ in range(5):
        before_val = thumb_value(page)
        slider.focus()
        t0 = time.perf_counter()
        page.keyboard.press("ArrowRight")
        # Done when the grid changed *and* the caption under it names the new step.
        caps = wait_captions_change(page, caps, timeout=60_000)
        new_val = thumb_value(page)
        assert new_val != before_val
        page.wait_for_selector(f"text=/{new_val} · scores/", timeout=60_000)
        times.append(time.perf_counter() - t0)
        wait_idle(page)
        caps = influencer_captions(page)
    print(f"redraw of a cached step (key press to new grid): median {statistics.median(times) * 1000:.0f} ms, "
          f"all {[round(t * 1000) for t in times]} ms")
    assert "from cache" in page.locator("text=/scores (computed in [0-9.]+ s|from cache)/").first.inner_text()

    # Dragging the slider thumb also changes the grid.
    box = slider.bounding_box() or page.locator('[data-testid="stMain"] [data-testid="stSlider"]').first.bounding_box()
    thumb = page.locator('[data-testid="stMain"] [data-testid="stSlider"] [role="slider"]').first
    tb = thumb.bounding_box() if thumb.count() else None
    start_x = tb["x"] + tb["width"] / 2 if tb else box["x"] + box["width"] / 2
    y = tb["y"] + tb["height"] / 2 if tb else box["y"] + box["height"] / 2
    page.mouse.move(start_x, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.95, y, steps=15)
    page.mouse.up()
    caps = wait_captions_change(page, caps)
    wait_idle(page)
    screenshot(page, "1-explore")

    # Uploads: a broken file shows an error and the page keeps working; a real digit becomes the sample.
    dropzone = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    dropzone.set_input_files(files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.wait_for_selector("text=Could not use broken.png", timeout=SLOW)
    wait_idle(page)
    wait_caption_count(page, 16)
    digit = Image.new("L", (28, 28))
    ImageDraw.Draw(digit).line([(14, 4), (14, 24)], fill=255, width=4)
    buf = io.BytesIO()
    digit.save(buf, format="PNG")
    dropzone.set_input_files(files=[{"name": "one.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_selector("text=upload one.png", timeout=SLOW)
    wait_idle(page)
    assert page.get_by_text("Could not use").count() == 0
    wait_caption_count(page, 16)
    assert not page.errors, page.errors


def test_patch_painting_changes_the_influencers(page, server):
    goto_page(page, "Patch")
    page.wait_for_selector('[data-testid="stBidiComponentIsolated"] canvas.upper-canvas', timeout=60_000)
    assert page.get_by_text("Paint a stroke over the sample").count() == 1
    wait_caption_count(page, 16)
    whole = influencer_captions(page)

    t0 = time.perf_counter()
    paint(page, [(0.2, 0.2), (0.5, 0.3), (0.7, 0.5)])
    page.wait_for_selector("text=Painted patch", timeout=SLOW)
    wait_captions_change(page, whole)
    wait_idle(page)
    print(f"\nmask painted to patch influencers shown: {time.perf_counter() - t0:.2f} s")
    wait_caption_count(page, 32)
    patch1 = influencer_captions(page)[:16]
    assert page.get_by_text("the mask as the model sees it").count() == 1

    paint(page, [(0.3, 0.8), (0.6, 0.85), (0.8, 0.9)])
    deadline = time.time() + SLOW / 1000
    while influencer_captions(page)[:16] == patch1:
        assert time.time() < deadline, "patch influencers did not change after a second stroke"
        time.sleep(0.05)
    wait_idle(page)
    screenshot(page, "2-patch")

    page.get_by_role("button", name="Clear the mask").click()
    page.wait_for_selector("text=Paint a stroke over the sample", timeout=SLOW)
    wait_idle(page)
    wait_caption_count(page, 16)
    assert not page.errors, page.errors


@pytest.mark.parametrize("title, shot, ready", [
    ("Feature curves", "3-feature-curves", ".js-plotly-plot"),
    ("Over the steps", "4-over-the-steps", ".js-plotly-plot"),
    ("Compare methods", "5-compare-methods", "text=Agreement between methods"),
    ("About", "6-about", "text=Sign convention"),
])
def test_other_pages_render(page, server, title, shot, ready):
    goto_page(page, title)
    wait_background_done(page)
    page.wait_for_selector(ready, timeout=SLOW)
    wait_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0
    screenshot(page, shot)
    assert not page.errors, page.errors


def test_deep_link_opens_the_page_inside_the_app(page, server):
    """A bookmarked page URL in a fresh browser session runs through app.py: its navigation and
    bundle panel appear, not a bare page listed by file name (what a ``pages/`` folder would give)."""
    context = page.context.browser.new_context(viewport={"width": 1440, "height": 1000})
    try:
        fresh = context.new_page()
        fresh.goto(server.rstrip("/") + "/about")
        fresh.wait_for_selector('h1:has-text("About")', timeout=SLOW)
        nav = fresh.locator('[data-testid="stSidebarNav"] a')
        nav.first.wait_for(timeout=SLOW)
        labels = [t.strip().splitlines()[-1].strip() for t in nav.all_inner_texts()]  # icon name, then title
        assert "Explore" in labels and "Compare methods" in labels, labels
        assert fresh.locator("text=Diffusion attribution explorer").count() >= 1
    finally:
        context.close()


def test_first_paint_cold_and_warm(page, tmp_path_factory):
    """Measures (prints, asserts no time limit) the first influencers on a fresh server and in new sessions on it."""
    bundle = ensure_app_bundle(tmp_path_factory.mktemp("first-paint"))
    env = {"ATTRIBUTION_BUNDLE": bundle} if bundle else None
    result = measure(REPO, 2, tmp_path_factory.mktemp("first-paint-log") / "streamlit.log", env,
                     browser=page.context.browser)
    print(f"\nfirst paint: server up {result['server_start_s']:.1f} s, cold {result['cold_first_paint_s']:.1f} s, "
          "new sessions " + ", ".join(f"{w:.1f}" for w in result["warm_first_paint_s"]) + " s")
    assert result["cold_first_paint_s"] > 0 and len(result["warm_first_paint_s"]) == 2
    assert all(w > 0 for w in result["warm_first_paint_s"])
