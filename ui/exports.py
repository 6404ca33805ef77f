"""Downloads of the scores: CSV and NPZ of a trajectory's steps, and the influencer grid as a PNG."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import streamlit as st

from attribution.data import model_to_uint8
from attribution.sampling import Trajectory
from attribution.workspace import Workspace

from .grids import Influencers, influencer_grid_png
from .images import sample_uint8
from .progress import computed_steps
from .state import sample_label
from .widgets import step_label


def scores_csv(ws: Workspace, traj: Trajectory, steps: Sequence[int], scores: np.ndarray) -> bytes:
    """Wide CSV: one row per step (step, timestep), one column per training example."""
    header = "step,timestep," + ",".join(f"train_{i}" for i in range(scores.shape[1]))
    lines = [header]
    for s, row in zip(steps, scores):
        lines.append(f"{s},{int(traj.timesteps[s])}," + ",".join(f"{v:.6g}" for v in row))
    return ("\n".join(lines) + "\n").encode()


def scores_npz(ws: Workspace, key: str, method: str, traj: Trajectory, steps: Sequence[int], scores: np.ndarray) -> bytes:
    """NPZ with scores (S, N), steps, timesteps, the method, the sample key and the final sample (pixels, (C, H, W))."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        scores=scores.astype(np.float32),
        steps=np.asarray(steps, dtype=np.int64),
        timesteps=traj.timesteps[list(steps)].numpy(),
        method=np.array(method),
        sample_key=np.array(key),
        sample=traj.display_sample.numpy(),
    )
    return buf.getvalue()


def export_buttons(ws: Workspace, key: str, method: str, traj: Trajectory, inf: Influencers, step: int) -> None:
    """Download the computed scores (CSV, NPZ) and a PNG of the influencer grid."""
    steps = computed_steps(ws, key, method, traj.num_steps)
    stem = f"{key}-{method}"

    def load() -> np.ndarray:
        return ws.scores(key, method, steps)

    cols = st.columns(3)
    n = len(steps)
    cols[0].download_button(
        f"Scores as CSV ({n} step{'s' if n != 1 else ''})", data=lambda: scores_csv(ws, traj, steps, load()),
        file_name=f"{stem}-scores.csv", mime="text/csv", icon=":material/table:", width="stretch",
        on_click="ignore",
    )
    cols[1].download_button(
        "Scores as NPZ", data=lambda: scores_npz(ws, key, method, traj, steps, load()),
        file_name=f"{stem}-scores.npz", mime="application/octet-stream", icon=":material/data_array:",
        width="stretch", on_click="ignore",
    )
    title = f"{sample_label()} · {method} · {step_label(traj, step)}"
    cols[2].download_button(
        "Influencer grid as PNG",
        data=lambda: influencer_grid_png(ws, inf, title, [("x0_hat at this step", model_to_uint8(traj.display_x0_hat[step:step + 1])[0]),
                                                          ("final sample", sample_uint8(traj))]),
        file_name=f"{stem}-step{step}-influencers.png", mime="image/png", icon=":material/image:",
        width="stretch", on_click="ignore",
    )
