"""Compare methods: one sample and step scored by every attribution method, side by side."""

from __future__ import annotations

import streamlit as st

import ui

ws = ui.get_workspace()
key, traj = ui.sample_page(
    ws,
    "Compare methods",
    "The same sample and step scored by every attribution method, one row each, and how much their full "
    "rankings of the training set agree.",
)
step = ui.step_slider(traj)
k = st.sidebar.slider("Influencers per method", 3, 8, 5, key=ui.state.COMPARE_K, persist_state="session")

methods = ui.available_methods(ws)
rows = {}
with st.status("Scoring this step with every method…", expanded=False) as status:
    for name, label in methods.items():
        status.update(label=f"Scoring this step with {label}…")
        rows[name], _ = ui.step_scores(ws, key, name, step)
    status.update(label=f"{len(methods)} methods scored {ui.step_label(traj, step)}", state="complete")

head = st.columns([1.1, 3, 3], gap="medium")
head[1].markdown(f"<span style='color:{ui.POSITIVE_COLOR};font-weight:600'>Highest scores: most positive (or most similar)</span>",
                 unsafe_allow_html=True)
head[2].markdown(f"<span style='color:{ui.NEGATIVE_COLOR};font-weight:600'>Lowest scores: most negative (or least similar)</span>",
                 unsafe_allow_html=True)
for name, label in methods.items():
    inf = ui.influencers(rows[name], k)
    with st.container(border=True):
        c_name, c_pos, c_neg = st.columns([1.1, 3, 3], gap="medium", vertical_alignment="center")
        c_name.markdown(f"**{label}**  \n<span style='color:{ui.NEUTRAL_COLOR};font-size:0.85em'>"
                        f"{ui.METHOD_BLURBS.get(name, '')}</span>", unsafe_allow_html=True)
        with c_pos:
            ui.influencer_grid(ws, inf.pos_idx, inf.pos_scores, "positive", size=56, compact=True)
        with c_neg:
            ui.influencer_grid(ws, inf.neg_idx, inf.neg_scores, "negative", size=56, compact=True)

st.subheader("Agreement between methods")
st.caption("Spearman rank correlation of the full score vectors (all training images) at this step: "
           "1 = same ranking, 0 = unrelated, −1 = reversed.")
table = ui.spearman_table(rows)
st.dataframe(table.style.format("{:.2f}").background_gradient(cmap="RdYlGn", vmin=-1, vmax=1))

st.subheader("D-TRAK variants")
missing = [o for o in ui.DTRAK_OUTPUTS if not ws.store_exists(o) or ui.build_status(ws, o).running]
if not missing:
    st.caption("Every D-TRAK store is built; their rows appear above.")
else:
    st.caption("D-TRAK replaces the loss by another function of the predicted noise when computing gradients. "
               "Each variant needs its own feature store: about 3–5 minutes on a CPU, built in the background "
               "(you can keep exploring). Interrupted builds resume where they stopped.")
    cols = st.columns(len(missing))
    for col, output in zip(cols, missing):
        s = ui.build_status(ws, output)
        if s.error:
            col.error(f"{ui.DTRAK_OUTPUTS[output]}: {s.error}")
        col.button(f"Build {ui.DTRAK_OUTPUTS[output]}", key=f"build-{output}", disabled=s.running,
                   on_click=ui.start_store_build, args=(ws, output), icon=":material/construction:", width="stretch")
    ui.poll_builds(ws, missing)
