"""Explore: make a sample, scrub its denoising steps, see the training images that shaped each step."""

from __future__ import annotations

import random

import streamlit as st

import ui

ws = ui.get_workspace()
subject = {"text": "an image from a prompt", "class": "an image of a class"}.get(ws.conditioning, "a digit")
ui.page_header(
    "Explore",
    f"Generate {subject} (or upload one), move through its denoising steps, and see which training images "
    "pushed each step toward what was generated (green) or away from it (red).",
)


def _random_seed() -> None:
    st.session_state[ui.state.SEED_INPUT] = random.randrange(0, 100_000)
    st.session_state[ui.state.PENDING_SEED] = st.session_state[ui.state.SEED_INPUT]


# ---------------------------------------------------------------- where the sample comes from
with st.container(border=True):
    prompt, guidance = ui.prompt_inputs(ws)
    c_seed, c_gen, c_rand, c_up = st.columns([1.0, 0.85, 1.05, 3.1], vertical_alignment="bottom", gap="small")
    seed = c_seed.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=ui.state.SEED_INPUT,
                               help="The same seed (and prompt) always gives the same sample.")
    if c_gen.button("Generate", type="primary", icon=":material/auto_awesome:", width="stretch"):
        st.session_state[ui.state.PENDING_SEED] = int(seed)
    c_rand.button("Random seed", icon=":material/casino:", on_click=_random_seed, width="stretch")
    upload = c_up.file_uploader(
        "…or upload an image (PNG or JPG; it is turned into a trajectory by running the deterministic sampler "
        "backwards)",
        type=["png", "jpg", "jpeg"], key=ui.state.UPLOAD,
    )

if ui.state.PENDING_SEED in st.session_state:
    with st.spinner("Generating…"):
        ui.set_seed_sample(ws, st.session_state.pop(ui.state.PENDING_SEED), prompt, guidance)
if upload is not None and st.session_state.get(ui.state.UPLOAD_SEEN) != upload.file_id:
    st.session_state[ui.state.UPLOAD_SEEN] = upload.file_id
    with st.spinner(f"Inverting {upload.name} into a trajectory…"):
        st.session_state[ui.state.UPLOAD_ERROR] = ui.handle_upload(ws, upload.getvalue(), upload.name, prompt)
if upload is None:
    st.session_state.pop(ui.state.UPLOAD_ERROR, None)
if st.session_state.get(ui.state.UPLOAD_ERROR):
    st.error(st.session_state[ui.state.UPLOAD_ERROR], icon=":material/error:")

key, traj = ui.current_sample(ws)

# ---------------------------------------------------------------- settings
method = ui.method_selector(ws)
k = st.sidebar.slider("Influencers shown", 4, 16, 8, key=ui.state.TOP_K, persist_state="session")

# ---------------------------------------------------------------- trajectory
step = ui.step_slider(traj)
ui.trajectory_images(traj, step, size=192)

# ---------------------------------------------------------------- influencers of this step
row, seconds = ui.step_scores(ws, key, method, step)
inf = ui.influencers(row, k)
ui.influencer_pair(ws, inf, baseline=method.startswith("baseline"))
timing = "from cache" if seconds is None else f"computed in {seconds:.2f} s"
st.caption(f"{ws.available_methods()[method]} · {ui.step_label(traj, step)} · scores {timing}", help=(
    "Scores are estimates: a positive score means removing that training image would make this step's "
    "prediction less likely."))

gi = ws.group_influence(row, k)
if gi is not None:
    with st.expander("Group influence: which classes shaped this step", icon=":material/bar_chart:", expanded=True):
        sample_class = ui.predicted_class(ws, traj)
        c_fig, c_text = st.columns([2, 1], vertical_alignment="center")
        with c_fig:
            st.html(ui.group_influence_bars(gi, sample_class))
        top = gi.strongest
        lines = [f"**Class {gi.names[top]}** has the largest summed score "
                 f"({100 * gi.positive_share[top]:.0f} % of all positive influence)."]
        if sample_class is not None:
            lines.append(f"The sample is classified as **{gi.names[sample_class]}**: {gi.top_positive_counts[sample_class]} "
                         f"of the top {gi.top_k} positive and {gi.top_negative_counts[sample_class]} of the top "
                         f"{gi.top_k} negative influencers have its class.")
        lines.append("A class's summed score is what removing the whole class is predicted to do: a positive sum "
                     "means the step would become less likely without it.")
        c_text.markdown("\n\n".join(lines))

if not (ws.is_latent or ws.is_conditional):
    with st.expander("What if these were never in the training set?", icon=":material/science:", expanded=True):
        tab_this, tab_show = st.tabs(["This sample", "Showcase (precomputed)"])
        with tab_this:
            ui.counterfactual_panel(ws, key, traj, step, method)
        with tab_show:
            ui.showcase(ws)

all_done = ui.background_scores(ws, key, method, traj.num_steps, center=step)

with st.expander("Export", icon=":material/download:"):
    st.caption("Scores of every step computed so far (one row per step, one column per training image), "
               "and the two grids above as a picture.")
    ui.export_buttons(ws, key, method, traj, inf, step)
