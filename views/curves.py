"""Feature curves: how the likelihood of each class evolves over the denoising steps."""

from __future__ import annotations

import zlib

import numpy as np
import streamlit as st

import ui
from attribution.scoring import class_share_over_steps

ws = ui.get_workspace()
text_labels = ws.has_clip  # a local CLIP model scores free-text labels
key, traj = ui.sample_page(
    ws,
    "Feature curves",
    "How likely each of your text labels is, at each step, for the image the model will end up drawing: from "
    "every step we finish the generation several times at random and let CLIP compare the results with the labels."
    if text_labels else
    "How sure the model is, at each step, about which digit it will end up drawing: from every step we finish "
    "the generation several times at random and let a digit classifier vote.",
)

if not text_labels and ws.classifier is None:
    st.warning("This bundle has no classifier and no CLIP model, so there is no feature to track. "
               "Launch the app with `--clip DIR` (a local CLIP model) to follow text labels.")
    st.stop()

if text_labels:
    default = ui.default_labels(ws, traj)
    raw = st.text_area("Text labels, one per line (at least two; their probabilities add up to 1)",
                       value="\n".join(default), key=ui.state.CURVE_LABELS, height=150, max_chars=2000)
    try:
        names = ui.parse_labels(raw)
    except ValueError as e:
        st.error(f"{str(e).capitalize()}.", icon=":material/error:")
        st.stop()
    predicted = None
else:
    names = ws.class_names()
    predicted = ui.predicted_class(ws, traj)
c_n, c_steps, c_cls, c_img = st.columns([1.2, 1.2, 1.2, 0.6], vertical_alignment="bottom", gap="medium")
num_samples = c_n.slider("Samples per step", 2, 32, 8, key=ui.state.CURVE_SAMPLES,
                         help="More samples give smoother curves and take longer.")
subset = c_steps.segmented_control("Steps", ["every 5th", "every 2nd", "all"], default="every 5th",
                                   key=ui.state.CURVE_SUBSET, required=True)
steps = ui.curve_steps(traj.num_steps, subset)
slot = st.empty()


def _progress(done: int, total: int) -> None:
    slot.progress(done / total, text=f"Finishing the generation {num_samples}× from each of {total} steps: {done}/{total}")


if text_labels:
    curves = ws.label_curves(key, steps, names, num_samples, progress=_progress)
    predicted = int(curves.probs[-1].argmax())  # the label CLIP prefers for the finished image
    feature, verdict = "label", f"closest label “{ui.short_text(names[predicted], 24)}”"
else:
    curves = ws.curves(key, steps, num_samples, progress=_progress)
    feature, verdict = "class", f"classified “{names[predicted]}”"
slot.empty()
cls = c_cls.selectbox(
    f"{feature.capitalize()} to highlight", list(range(len(names))), index=predicted,
    format_func=lambda c: f"“{ui.short_text(names[c], 40)}”" + ("  (the final sample)" if c == predicted else ""),
    key=f"curve_{feature}_{key}" if not text_labels else f"curve_label_{key}_{zlib.crc32('|'.join(names).encode())}",
)
c_img.image(ui.tensor_image(traj.display_sample, 96), width=96, caption=verdict)
st.plotly_chart(ui.curves_figure(curves, names, cls, traj, st.session_state.get(ui.state.SHARED_STEP), feature=feature),
                key=ui.state.CURVES_CHART)

interval = curves.rise_interval(cls)
if interval is None:
    st.info(f"The likelihood of “{names[cls]}” never climbs from 20 % to 80 % over these steps.")
elif interval[0] == int(curves.steps[0]):
    st.success(f"“{names[cls]}” is already the likely outcome at the first step shown ({ui.step_label(traj, interval[0])}): "
               "with this sample it is decided almost from the start.", icon=":material/insights:")
else:
    a, b = interval
    st.success(
        f"The likelihood of “{names[cls]}” rises from 20 % to 80 % between **{ui.step_label(traj, a)}** and "
        f"**{ui.step_label(traj, b)}**: these steps decide it. Scrub to them on Explore to see "
        "which training images drive that decision.", icon=":material/insights:")
st.caption("The dotted line marks the step selected on the other pages. Each point averages the "
           f"{'CLIP label' if text_labels else 'classifier'}'s probabilities over {num_samples} completions "
           "that start from x_t at that step.")

if not text_labels and ws.dataset.labels is not None:
    method = ui.method_selector(ws, baselines=False)
    top_k = st.session_state.get(ui.state.TOP_K, 8)
    with st.spinner(f"Scoring the {len(steps)} steps shown with {method}…"):
        scores = ws.scores(key, method, steps)
    pos_share, neg_share = class_share_over_steps(scores, np.asarray(ws.dataset.labels), cls, top_k)
    st.plotly_chart(ui.class_share_figure(curves, cls, names[cls], steps, pos_share, neg_share, top_k, traj,
                                          st.session_state.get(ui.state.STEP)), key="class_share_chart")
    st.caption(f"Bars: the share of the top-{top_k} positive (green) and negative (red) influencers of each step "
               f"whose label is “{names[cls]}” (chance: about {100 / len(names):.0f} %). The paper's Figure 3 finds "
               "the positive share rising with the likelihood, and the negative share too once the class is near "
               "certain.")
