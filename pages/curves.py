"""Feature curves: how the likelihood of each class evolves over the denoising steps."""

from __future__ import annotations

import streamlit as st

import app_support as ui

ws = ui.get_workspace()
ui.page_header(
    "Feature curves",
    "How sure the model is, at each step, about which digit it will end up drawing: from every step we finish "
    "the generation several times at random and let a digit classifier vote.",
)
key, traj = ui.current_sample(ws)
ui.sample_caption()

if ws.classifier is None:
    st.warning("This bundle has no classifier, so there is no feature to track.")
    st.stop()

names = ws.class_names()
predicted = ui.predicted_class(ws, traj)
c_n, c_steps, c_cls, c_img = st.columns([1.2, 1.2, 1.2, 0.6], vertical_alignment="bottom", gap="medium")
num_samples = c_n.slider("Samples per step", 2, 32, 8, key="curve_samples",
                         help="More samples give smoother curves and take longer.")
subset = c_steps.segmented_control("Steps", ["every 5th", "every 2nd", "all"], default="every 5th",
                                   key="curve_subset", required=True)
cls = c_cls.selectbox(
    "Class to highlight", list(range(len(names))), index=predicted,
    format_func=lambda c: f"“{names[c]}”" + ("  (the final sample)" if c == predicted else ""),
    key=f"curve_class_{key}",
)
c_img.image(ui.tensor_image(traj.sample, 96), width=96, caption=f"classified “{names[predicted]}”")

steps = ui.curve_steps(traj.num_steps, subset)
slot = st.empty()


def _progress(done: int, total: int) -> None:
    slot.progress(done / total, text=f"Finishing the generation {num_samples}× from each of {total} steps: {done}/{total}")


curves = ws.curves(key, steps, num_samples, progress=_progress)
slot.empty()
st.plotly_chart(ui.curves_figure(curves, names, cls, traj, st.session_state.get("step")), key="curves_chart")

interval = curves.rise_interval(cls)
if interval is None:
    st.info(f"The likelihood of “{names[cls]}” never climbs from 20 % to 80 % over these steps.")
elif interval[0] == int(curves.steps[0]):
    st.success(f"“{names[cls]}” is already the likely outcome at the first step shown ({ui.step_label(traj, interval[0])}): "
               "with this sample the digit is decided almost from the start.", icon=":material/insights:")
else:
    a, b = interval
    st.success(
        f"The likelihood of “{names[cls]}” rises from 20 % to 80 % between **{ui.step_label(traj, a)}** and "
        f"**{ui.step_label(traj, b)}**: these steps decide the digit. Scrub to them on Explore to see "
        "which training images drive that decision.", icon=":material/insights:")
st.caption("The dotted line marks the step selected on the other pages. Each point averages the classifier's "
           f"probabilities over {num_samples} completions that start from x_t at that step.")
