"""Patch: paint a region of the sample and see which training images shaped that region at a step."""

from __future__ import annotations

import streamlit as st
from streamlit_drawable_canvas import st_canvas

import ui

CANVAS_SIZE = 288  # 9 canvas pixels per model pixel

ws = ui.get_workspace()
key, traj = ui.sample_page(
    ws,
    "Patch",
    "Paint over part of the sample to ask which training images shaped just that region at the chosen step, "
    "compared with the influencers of the whole image.",
)

method = ui.method_selector(ws)
k = st.sidebar.slider("Influencers shown", 4, 16, 8, key=ui.state.TOP_K, persist_state="session")
brush = st.sidebar.slider("Brush size", 8, 64, 28, step=4, key=ui.state.BRUSH, persist_state="session")
baseline = method.startswith("baseline")

step = ui.step_slider(traj)


def _clear() -> None:
    st.session_state[ui.state.CANVAS_VERSION] = st.session_state.get(ui.state.CANVAS_VERSION, 0) + 1


paint_col, result_col = st.columns([1.05, 2.6], gap="medium")
with paint_col:
    st.markdown("**Paint the region you care about**")
    st.write("")  # room for the canvas toolbar
    result = st_canvas(
        stroke_width=brush,
        stroke_color="rgba(255, 140, 0, 0.6)",
        background_image=ui.tensor_image(traj.display_sample, CANVAS_SIZE),
        height=CANVAS_SIZE,
        width=CANVAS_SIZE,
        drawing_mode="freedraw",
        return_image_data=True,
        key=f"patch_canvas_{st.session_state.get(ui.state.CANVAS_VERSION, 0)}",
    )
    st.button("Clear the mask", icon=":material/ink_eraser:", on_click=_clear)
    mask = ui.canvas_to_mask(result.image_data, tuple(ws.pixel_shape[1:]))
    if mask is not None:
        st.image(ui.mask_overlay(ui.sample_uint8(traj), mask, 128), width=128,
                 caption=f"the mask as the model sees it: {mask.shape[0]}×{mask.shape[1]}, "
                         f"{mask.mean():.0%} of the image")

with result_col:
    st.markdown("#### Painted patch")
    if mask is None:
        st.info("Paint a stroke over the sample on the left: the training images that shaped that patch "
                "will appear here.", icon=":material/brush:")
    else:
        try:
            row, seconds = ui.step_scores(ws, key, method, step, mask)
        except ValueError as e:  # e.g. a mask that selects no pixel
            st.info(f"{str(e).capitalize()}.", icon=":material/brush:")
        else:
            ui.influencer_pair(ws, ui.influencers(row, k), baseline, size=64, gap="small")
            timing = "from cache" if seconds is None else f"computed in {seconds:.2f} s"
            st.caption(f"{ui.step_label(traj, step)} · patch scores {timing}")
    st.markdown("#### Whole image")
    row, _ = ui.step_scores(ws, key, method, step)
    ui.influencer_pair(ws, ui.influencers(row, k), baseline, size=64, gap="small")
