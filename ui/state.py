"""The session: every session-state key the pages share, declared once, and the current sample.

The current sample is a :class:`~attribution.workspace.SampleRecipe`, kept in the session in
its plain form (``{"kind": "seed", "seed": 3}``, see ``SampleRecipe.to_state``) under
:data:`SAMPLE`, with its trajectory's workspace key under :data:`SAMPLE_KEY`; the
trajectory itself stays in the shared workspace's cache and is remade from the recipe if
the cache dropped it.
"""

from __future__ import annotations

import streamlit as st

from attribution.data import ImageDecodeError
from attribution.sampling import Trajectory
from attribution.tools import safe_name
from attribution.workspace import SampleRecipe, Workspace

# ---------------------------------------------------------------------------- session keys
#: the current sample's recipe (plain form)
SAMPLE = "sample"
#: the workspace key of its trajectory
SAMPLE_KEY = "sample_key"
#: the step slider's widget state, and the selected denoising step itself, shared by every page
STEP = "step"
SHARED_STEP = "shared_step"
#: the selected attribution method, shared by every page
METHOD = "method"
#: text-conditional models: the prompt and guidance-scale inputs
PROMPT_INPUT = "prompt_input"
GUIDANCE_INPUT = "guidance_input"
#: Explore: the seed input, a seed chosen by a button (applied on the next run), the upload widget,
#: the last upload handled and its error message
SEED_INPUT = "seed_input"
PENDING_SEED = "pending_seed"
UPLOAD = "upload"
UPLOAD_SEEN = "upload_seen"
UPLOAD_ERROR = "upload_error"
#: Explore / Patch: how many influencers each way
TOP_K = "top_k"
#: Patch: the brush size, and a counter bumped to clear the canvas
BRUSH = "brush"
CANVAS_VERSION = "canvas_version"
#: Feature curves: the text labels (CLIP), samples per step, the step subset, the chart
CURVE_LABELS = "curve_labels"
CURVE_SAMPLES = "curve_samples"
CURVE_SUBSET = "curve_subset"
CURVES_CHART = "curves_chart"
#: Over the steps: rows of the heat map, per-step normalization, the chart; the example picked and its chart
HEAT_K = "heat_k"
HEAT_NORM = "heat_norm"
HEATMAP = "heatmap"
EXAMPLE_IDX = "example_idx"
EXAMPLE_CHART = "example_chart"
#: Compare: influencers per method
COMPARE_K = "compare_k"
#: Evaluate: the report picked
EVALUATE_REPORT = "evaluate_report"
#: Explore's counterfactual panel: the removal rule, k, the class, whether to run the random-k control too
CF_RULE = "cf_rule"
CF_K = "cf_k"
CF_CLASS = "cf_class"
CF_CONTROL = "cf_control"
#: background scoring jobs whose failure was already shown
FAILED_JOBS = "failed_jobs"


# ---------------------------------------------------------------------------- the current sample
def _make_current(ws: Workspace, recipe: SampleRecipe) -> str:
    key, _ = ws.sample(recipe)
    st.session_state[SAMPLE] = recipe.to_state()
    st.session_state[SAMPLE_KEY] = key
    return key


def current_recipe() -> SampleRecipe | None:
    """The current sample's recipe, or None before the first sample."""
    state = st.session_state.get(SAMPLE)
    return None if state is None else SampleRecipe.from_state(state)


def set_seed_sample(ws: Workspace, seed: int, prompt: str | None = None, guidance_scale: float | None = None) -> str:
    """Generate the sample of ``seed`` (and ``prompt``, conditional models) and make it current; returns its key."""
    return _make_current(ws, SampleRecipe.generated(seed, prompt, guidance_scale))


def set_upload_sample(ws: Workspace, data: bytes, name: str, prompt: str | None = None) -> str:
    """Invert an uploaded image (conditioned on ``prompt``) and make it current (raises ``ImageDecodeError``)."""
    return _make_current(ws, SampleRecipe.uploaded(data, safe_name(name), prompt))


def handle_upload(ws: Workspace, data: bytes, name: str, prompt: str | None = None) -> str | None:
    """Use an uploaded file as the current sample; returns an error message for the user, or None."""
    try:
        set_upload_sample(ws, data, name, prompt)
    except ImageDecodeError as e:
        return f"Could not use {safe_name(name)}: {e}"
    return None


def current_sample(ws: Workspace, autogenerate: bool = True) -> tuple[str, Trajectory] | None:
    """Key and trajectory of the current sample, regenerated from its recipe if the cache dropped it.

    With no sample yet, generates seed 0 when ``autogenerate`` (else returns None).
    """
    recipe = current_recipe()
    if recipe is None:
        if not autogenerate:
            return None
        with st.spinner("Generating a first sample (seed 0)…"):
            if ws.is_conditional:
                set_seed_sample(ws, 0, st.session_state.get(PROMPT_INPUT, ws.default_prompt()),
                                st.session_state.get(GUIDANCE_INPUT, ws.default_guidance_scale))
            else:
                set_seed_sample(ws, 0)
        recipe = current_recipe()
    key = st.session_state.get(SAMPLE_KEY)
    traj = ws.trajectory(key) if key else None
    if traj is None:
        with st.spinner("Restoring the current sample…"):
            key, traj = ws.sample(recipe)
        st.session_state[SAMPLE_KEY] = key
    return key, traj


def sample_label() -> str:
    """Short description of the current sample, e.g. ``seed 3`` or ``upload seven.png``."""
    recipe = current_recipe()
    return "none yet" if recipe is None else recipe.label()
