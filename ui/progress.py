"""Scores on screen and in the background: the step a page shows, the other steps' background job
and its progress, and the background builds of missing D-TRAK stores (the workspace's job runner)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import streamlit as st

from attribution.scoring import PatchMask
from attribution.workspace import Workspace

from . import state
from .labels import DTRAK_OUTPUTS


def computed_steps(ws: Workspace, key: str, method: str, num_steps: int, mask: np.ndarray | None = None) -> list[int]:
    """Steps of sample ``key`` whose scores for ``method`` are already in the workspace cache."""
    mask = PatchMask.of(mask) if mask is not None else None  # hashed once for all the steps
    return [s for s in range(num_steps) if ws.cached_scores(key, method, s, mask) is not None]


def step_scores(ws: Workspace, key: str, method: str, step: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, float | None]:
    """(N,) scores of one step and the seconds spent computing them (None when cached)."""
    mask = PatchMask.of(mask) if mask is not None else None  # hashed once for the lookup and the scoring
    row = ws.cached_scores(key, method, step, mask)
    if row is not None:
        return row, None
    what = "the painted patch" if mask is not None else f"step {step}"
    with st.spinner(f"Scoring {ws.num_train:,} training images for {what}…"):
        t0 = time.perf_counter()
        row = ws.scores(key, method, [step], mask)[0]
        return row, time.perf_counter() - t0


def steps_by_distance(num_steps: int, center: int) -> list[int]:
    """All steps ordered by distance from ``center`` (the ones next to the slider come first)."""
    return sorted(range(num_steps), key=lambda s: (abs(s - center), s))


def background_scores(ws: Workspace, key: str, method: str, num_steps: int, center: int = 0) -> bool:
    """Make sure every step of ``key`` gets scored; True when all are cached.

    Otherwise starts (or joins) the workspace's background job and shows its
    progress in a fragment that polls ``ws.job_status`` every second and reruns
    the whole page once the job is done (so polling stops).
    """
    if len(computed_steps(ws, key, method, num_steps)) == num_steps:
        return True
    failed = st.session_state.setdefault(state.FAILED_JOBS, {})
    if (key, method) in failed:
        st.error(f"Scoring the remaining steps failed: {failed[(key, method)]}")
        if st.button("Retry", key=f"retry-{key}-{method}"):
            failed.pop((key, method))
            st.rerun()
        return False
    # One step per chunk: the page's own request never waits for more than one background step.
    ws.prefetch(key, method, steps_by_distance(num_steps, center), chunk=1)

    @st.fragment(run_every=1.0)
    def poll() -> None:
        done, total, error = ws.job_status(key, method)
        if error:
            failed[(key, method)] = error
            st.rerun(scope="app")
        n_done = len(computed_steps(ws, key, method, num_steps))
        if n_done == num_steps or (total and done >= total):
            st.rerun(scope="app")
        st.progress(n_done / num_steps, text=f"Scoring the other steps in the background: {n_done} of {num_steps} done")

    poll()
    return False


def all_step_scores(ws: Workspace, key: str, method: str, num_steps: int) -> np.ndarray:
    """(S, N) scores of every step (all must be cached or cheap to compute)."""
    return ws.scores(key, method, list(range(num_steps)))


@dataclass
class BuildStatus:
    running: bool
    done: int
    total: int
    error: str | None
    finished: bool


def build_status(ws: Workspace, output: str) -> BuildStatus:
    """Progress of the background build of store ``output`` (shared by all sessions: the workspace holds it)."""
    job = ws.build_job(output)
    if job is None:
        return BuildStatus(False, 0, 0, None, False)
    return BuildStatus(job.running, job.done, job.total, job.error, job.finished)


def start_store_build(ws: Workspace, output: str) -> None:
    """Featurize the D-TRAK store ``output`` in the background, on copies of the models (no-op if one is running)."""
    ws.start_build(output)


def poll_builds(ws: Workspace, outputs: Sequence[str]) -> None:
    """Progress bars of the running store builds; reruns the page when one finishes."""
    running = [o for o in outputs if build_status(ws, o).running]
    if not running:
        return

    @st.fragment(run_every=1.0)
    def poll() -> None:
        for o in running:
            s = build_status(ws, o)
            if not s.running:
                st.rerun(scope="app")
            frac = s.done / s.total if s.total else 0.0
            st.progress(frac, text=f"Building the {DTRAK_OUTPUTS[o]} store: {s.done:,} of {s.total or '?'}")

    poll()
