"""Time to the first influencers on screen: a fresh server (cold) and a new browser session on it (warm).

Starts ``streamlit run app.py`` in ``--repo`` (default: this checkout) on a free port, opens the
Explore page in headless Chromium and measures, from ``page.goto`` to the first influencer
caption of the grid: the cold first paint (the first session loads the models, the store and
scores a step) and then ``--sessions`` new sessions of two kinds: new tabs of the same browser
profile (what a user's new tab on a running server costs: the static files are in the browser's
cache, each tab is its own Streamlit session) and fresh profiles (an empty cache: every script
chunk is downloaded and compiled again). The server is stopped by its PID.

The command-line run does this twice with one private, at first empty, cache directory
(``$ATTRIBUTION_CACHE``): a fresh machine (the kernels of the read-only bundled store are
computed and cached), then a restarted server, which finds the cache filled. Two floors are
measured in the same browser: a one-element Streamlit page (what any new tab costs here), and the
cold first paint of a page that only imports torch and diffusers' ``UNet2DModel``, loads one
bundled checkpoint and runs one forward before showing that element (what any live first paint
of a diffusers model costs here, before any attribution work).

Usage: python benchmarks/first_paint.py [--repo DIR] [--sessions 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CAPTION = '[data-testid="stMain"] .influencer-grid figcaption'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(repo: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, float]]:
    """(URL, seconds until it answered its health check) of a fresh ``streamlit run app.py`` in ``repo``."""
    port = free_port()
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield url, time.perf_counter() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def first_paint(browser, url: str, timeout_ms: float = 300_000, selector: str = CAPTION, context=None) -> float:
    """Seconds from opening ``url`` in a new session to the first influencer caption (``selector``).

    The session opens as a new tab of ``context`` (a browser profile whose HTTP cache it shares, as a
    user's new tab does), or, without one, in a fresh browser context (a new profile, empty cache).
    """
    own = context is None
    context = browser.new_context(viewport={"width": 1440, "height": 1000}) if own else context
    page = context.new_page()
    try:
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector(selector, timeout=timeout_ms)
        return time.perf_counter() - t0
    finally:
        page.close()
        if own:
            context.close()


def measure(repo: Path, sessions: int, log_path: Path, env: dict[str, str] | None = None,
            browser=None) -> dict[str, float | list[float]]:
    """Server start, the cold first paint, then ``sessions`` new tabs of the same browser profile
    (``warm_first_paint_s``) and ``sessions`` fresh profiles (``new_profile_first_paint_s``).
    ``browser``: a running playwright browser to reuse (playwright allows one sync session per
    thread), else one is launched."""
    from playwright.sync_api import sync_playwright

    with streamlit_server(repo, log_path, env) as (url, started), ExitStack() as stack:
        if browser is None:
            p = stack.enter_context(sync_playwright())
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            stack.callback(browser.close)
        profile = browser.new_context(viewport={"width": 1440, "height": 1000})
        stack.callback(profile.close)
        cold = first_paint(browser, url, context=profile)
        tabs = [first_paint(browser, url, context=profile) for _ in range(sessions)]
        profiles = [first_paint(browser, url) for _ in range(sessions)]
    return {"server_start_s": started, "cold_first_paint_s": cold, "warm_first_paint_s": tabs,
            "new_profile_first_paint_s": profiles}


FLOOR_APP = (
    "import streamlit as st\n"
    "st.html('<div class=\"influencer-grid\"><figure><figcaption>floor</figcaption></figure></div>')\n"
)


def floor(browser, sessions: int, log_path: Path) -> list[float]:
    """New-tab first paints of a one-element Streamlit page (the browser's and Streamlit's own cost)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "app.py").write_text(FLOOR_APP)
        with streamlit_server(Path(d), log_path) as (url, _):
            profile = browser.new_context()
            try:
                first_paint(browser, url, selector=".influencer-grid figcaption", context=profile)
                return [first_paint(browser, url, selector=".influencer-grid figcaption", context=profile)
                        for _ in range(sessions)]
            finally:
                profile.close()


COLD_FLOOR_APP = (
    "import streamlit as st\n"
    "import torch\n"
    "from diffusers.models.unets.unet_2d import UNet2DModel\n"
    "unet = UNet2DModel.from_pretrained({unet!r}, use_safetensors=True)\n"
    "with torch.no_grad():\n"
    "    unet(torch.zeros(1, unet.config.in_channels, 32, 32), 0)\n"
    "st.html('<div class=\"influencer-grid\"><figure><figcaption>floor</figcaption></figure></div>')\n"
)


def cold_floor(browser, repo: Path, log_path: Path) -> float:
    """Cold first paint of a fresh server whose page imports torch and diffusers, loads one bundled
    UNet and runs it once (see the module doc)."""
    unet = repo / "assets" / "ensemble" / "ddpm-seed0" / "unet"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "app.py").write_text(COLD_FLOOR_APP.format(unet=str(unet)))
        with streamlit_server(Path(d), log_path) as (url, _):
            return first_paint(browser, url, selector=".influencer-grid figcaption")


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose app.py is served")
    ap.add_argument("--sessions", type=int, default=3, help="new sessions measured after the cold one")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    log = Path("/tmp") / f"first_paint_{os.getpid()}.log"
    with sync_playwright() as p, tempfile.TemporaryDirectory() as cache:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        env = {"ATTRIBUTION_CACHE": cache}
        result = {"fresh_machine": measure(args.repo.resolve(), args.sessions, log, env, browser),
                  "restarted_server": measure(args.repo.resolve(), args.sessions, log, env, browser),
                  "floor_new_session_s": floor(browser, args.sessions, log),
                  "floor_cold_first_paint_s": cold_floor(browser, args.repo.resolve(), log)}
        browser.close()
    for name in ("fresh_machine", "restarted_server"):
        r = result[name]
        print(f"{name:17s} server up in {r['server_start_s']:.1f} s; cold first paint {r['cold_first_paint_s']:.1f} s; "
              "new tabs " + ", ".join(f"{w:.1f}" for w in r["warm_first_paint_s"]) + " s; new profiles "
              + ", ".join(f"{w:.1f}" for w in r["new_profile_first_paint_s"]) + " s")
    print("floor (one-element Streamlit page): new tabs "
          + ", ".join(f"{w:.1f}" for w in result["floor_new_session_s"]) + " s")
    print(f"floor (fresh server; torch + diffusers imported, one UNet loaded and run): cold first paint "
          f"{result['floor_cold_first_paint_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
