"""Over the steps: one training image's influence across the whole generation, and who matters when."""

from __future__ import annotations

import streamlit as st

import ui

ws = ui.get_workspace()
key, traj = ui.sample_page(
    ws,
    "Over the steps",
    "Follow one training image's influence through the whole generation, and see which training images "
    "matter at which steps — some help early and hurt late.",
)
method = ui.method_selector(ws)
step = ui.step_slider(traj, label="Reference step (for the picks below and the dotted line)")

if not ui.background_scores(ws, key, method, traj.num_steps, center=step):
    st.info("These views need the scores of every step; they appear as soon as the scoring above finishes.",
            icon=":material/hourglass_top:")
    st.stop()
scores = ui.all_step_scores(ws, key, method, traj.num_steps)


def _pick(i: int) -> None:
    st.session_state[ui.state.EXAMPLE_IDX] = i


# ---------------------------------------------------------------- one training image across the steps
st.subheader("One training image across the steps")
inf = ui.influencers(scores[step], 4)
picks = list(inf.pos_idx) + list(inf.neg_idx)
st.session_state.setdefault(ui.state.EXAMPLE_IDX, int(picks[0]))
left, right = st.columns([1.15, 2.6], gap="large")
with left:
    idx = st.number_input("Training image index", 0, ws.num_train - 1, step=1, key=ui.state.EXAMPLE_IDX,
                          persist_state="session")
    st.image(ui.framed(ui.upscale(ws.train_images([idx])[0], 120), ui.NEUTRAL_COLOR, 2), width=124,
             caption=f"idx {idx} · label “{ws.label(idx)}”")
    st.markdown(f"**…or click a top influencer of {ui.step_label(traj, step)}**")
    for row_idx, kind in ((inf.pos_idx, "positive"), (inf.neg_idx, "negative")):
        cols = st.columns(len(row_idx), gap="small")
        color = ui.POSITIVE_COLOR if kind == "positive" else ui.NEGATIVE_COLOR
        for col, i in zip(cols, row_idx):
            col.image(ui.framed(ui.upscale(ws.train_images([int(i)])[0], 48), color, 3), width=54)
            col.button(f"{int(i)}", key=f"pick-{kind}-{int(i)}", on_click=_pick, args=(int(i),), type="tertiary",
                       help=f"plot training image {int(i)} (“{ws.label(int(i))}”, {kind} at this step)")
with right:
    title = f"Score of training image {idx} (“{ws.label(idx)}”) at each step"
    st.plotly_chart(ui.example_figure(scores[:, idx], traj, title, step), key=ui.state.EXAMPLE_CHART)

# ---------------------------------------------------------------- who matters when
st.subheader("Who matters when")
c_k, c_norm = st.columns([1, 2], vertical_alignment="bottom")
k = c_k.slider("Top influencers per step", 1, 10, 5, key=ui.state.HEAT_K, persist_state="session",
               help="Rows: every training image in the top-k positive or top-k negative of some step.")
normalize = c_norm.toggle("Scale each step to its largest score", value=True, key=ui.state.HEAT_NORM,
                          help="Scores at different steps have very different sizes; scaling makes every step readable.")
rows, union = ui.top_union(scores, k)
shown = f"{len(rows)} training images" if len(rows) == union else f"the {len(rows)} (of {union}) that make the most top-{k} lists"
st.caption(f"Rows: {shown}, ordered by the step where they matter most. Green helps, red hurts.")
st.plotly_chart(ui.heatmap_figure(ws, scores, rows, traj, normalize), key=ui.state.HEATMAP)

# ---------------------------------------------------------------- examples that change sides
st.subheader("Training images that change sides")
flips = ui.flips_table(ws, scores, k)
if flips.empty:
    st.info(f"No training image is both in the top {k} positive at one step and in the top {k} negative at another.")
else:
    st.caption(f"In the top {k} positive at some steps and in the top {k} negative at others "
               f"({len(flips)} shown).")
    st.dataframe(
        flips, hide_index=True, row_height=52, height=min(52 * len(flips) + 40, 640),
        column_config={"image": st.column_config.ImageColumn("image", width="small"),
                       "index": st.column_config.NumberColumn("index", format="%d")},
    )
