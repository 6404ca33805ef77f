"""Widgets shared by the pages: page header, sample reminder, prompt inputs, the method picker and the step slider."""

from __future__ import annotations

import streamlit as st

from attribution.sampling import Trajectory
from attribution.workspace import Workspace

from . import state
from .labels import DTRAK_OUTPUTS
from .progress import build_status
from .state import current_sample, sample_label


def prompt_inputs(ws: Workspace, container=None) -> tuple[str | None, float | None]:
    """The conditioning inputs: a prompt box (text models) or a class picker (class-conditional models),
    and the guidance scale where the model uses it; (None, None) for unconditional models."""
    if not ws.is_conditional:
        return None, None
    target = container if container is not None else st
    st.session_state.setdefault(state.PROMPT_INPUT, ws.default_prompt())
    c_prompt, c_scale = target.columns([3.2, 1], vertical_alignment="bottom")
    if ws.conditioning == "class":
        classes = ws.class_choices
        if st.session_state[state.PROMPT_INPUT] not in classes:
            st.session_state[state.PROMPT_INPUT] = ws.default_prompt()
        prompt = c_prompt.selectbox("Class", classes, key=state.PROMPT_INPUT,
                                    help="The class the model is conditioned on; the scores are conditioned on it too.")
    else:
        prompt = c_prompt.text_input("Prompt", key=state.PROMPT_INPUT, max_chars=500,
                                     help="The text the model is conditioned on; the scores are conditioned on it too.")
    scale = None
    if ws.uses_guidance:
        scale = float(c_scale.number_input(
            "Guidance scale", min_value=1.0, max_value=20.0, value=ws.default_guidance_scale, step=0.5,
            key=state.GUIDANCE_INPUT,
            help=("Guidance embedding: this guidance-distilled model takes the scale as an input (one prediction "
                  "per step); higher = follow the prompt more." if ws.guidance_embedded else
                  "Classifier-free guidance: 1 = conditional prediction only, higher = follow the "
                  f"{'class' if ws.conditioning == 'class' else 'prompt'} more.")))
    return prompt, scale


def sample_caption() -> None:
    """A one-line reminder of which sample a page is showing."""
    st.caption(f"Current sample: **{sample_label()}** · change it on the Explore page.")


def sample_page(ws: Workspace, title: str, explanation: str) -> tuple[str, Trajectory]:
    """The header of a page that works on the current sample: title, explanation, the sample
    (seed 0 if none yet) and the reminder of which one it is; returns its key and trajectory."""
    page_header(title, explanation)
    key, traj = current_sample(ws)
    sample_caption()
    return key, traj


def method_selector(ws: Workspace, container=None, baselines: bool = True) -> str:
    """Sidebar select box of the available methods (default journey-TRAK), kept across pages."""
    methods = {k: v for k, v in available_methods(ws).items() if baselines or not k.startswith("baseline")}
    names = list(methods)
    if st.session_state.get(state.METHOD) not in methods:
        st.session_state[state.METHOD] = "journey" if "journey" in names else names[0]
    target = container if container is not None else st.sidebar
    return target.selectbox(
        "Attribution method",
        names,
        format_func=lambda n: methods[n],
        key=state.METHOD,
        help="journey-TRAK is the paper's method; journey-TRAK/blocks (where the store allows it) gives each network "
             "block its own kernel, which shows class-level influence more clearly; the others are for comparison "
             "(see About).",
        persist_state="session",
    )


def available_methods(ws: Workspace) -> dict[str, str]:
    """``ws.available_methods()`` minus the D-TRAK stores still being built here."""
    building = {f"dtrak-{o}" for o in DTRAK_OUTPUTS if build_status(ws, o).running}
    return {k: v for k, v in ws.available_methods().items() if k not in building}


def step_label(traj: Trajectory, step: int) -> str:
    """``step 12 · t=759`` for a step index of the trajectory."""
    return f"step {step} · t={int(traj.timesteps[step])}"


def step_slider(traj: Trajectory, label: str = "Denoising step (noisy → clean)") -> int:
    """The shared step slider 0..S-1, shown with each step's timestep; default: the middle step.

    The step is one value for every page: it lives in :data:`~ui.state.SHARED_STEP`, which the
    slider's widget state (:data:`~ui.state.STEP`) is set from before it is drawn and which the
    slider writes back on every change, so a page that did not draw the slider (or whose widget
    state the browser session dropped) still opens at the step chosen on another page.
    """
    n = traj.num_steps
    shared = st.session_state.get(state.SHARED_STEP)
    if shared is not None and 0 <= shared < n:
        st.session_state[state.STEP] = shared
    elif not 0 <= st.session_state.get(state.STEP, -1) < n:
        st.session_state[state.STEP] = n // 2 if state.STEP not in st.session_state else n - 1

    def keep() -> None:
        st.session_state[state.SHARED_STEP] = st.session_state[state.STEP]

    step = st.select_slider(
        label,
        options=list(range(n)),
        format_func=lambda s: step_label(traj, s),
        key=state.STEP,
        on_change=keep,
        help="Step 0 is pure noise; the last step is the finished image. t is the diffusion timestep.",
        persist_state="session",
    )
    st.session_state[state.SHARED_STEP] = step
    return step


def page_header(title: str, explanation: str) -> None:
    """Page title and its one-sentence explanation."""
    st.title(title)
    st.markdown(f"<p style='font-size:1.05rem;color:#4b5563;margin-top:-0.6rem'>{explanation}</p>", unsafe_allow_html=True)
