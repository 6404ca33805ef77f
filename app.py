"""Diffusion attribution explorer: the Streamlit entry point (run ``streamlit run app.py``).

Sets the page layout, loads the shared workspace once, shows what is loaded in
the sidebar and routes to the views in ``views/``.
"""

from __future__ import annotations

import streamlit as st

import ui

st.set_page_config(page_title="Diffusion attribution explorer", page_icon=":material/blur_on:", layout="wide")

PAGES = [
    st.Page("views/explore.py", title="Explore", icon=":material/explore:", default=True),
    st.Page("views/patch.py", title="Patch", icon=":material/brush:"),
    st.Page("views/curves.py", title="Feature curves", icon=":material/show_chart:"),
    st.Page("views/over_steps.py", title="Over the steps", icon=":material/timeline:"),
    st.Page("views/compare.py", title="Compare methods", icon=":material/compare:"),
    st.Page("views/evaluate.py", title="Evaluate", icon=":material/fact_check:"),
    st.Page("views/about.py", title="About", icon=":material/info:"),
]

page = st.navigation(PAGES)
st.html(
    "<style>[data-testid='stMainBlockContainer']{padding-top:2.2rem;padding-bottom:3rem}"
    "[data-testid='stImageCaption']{line-height:1.25}</style>"
)

with st.sidebar:
    st.markdown("### Diffusion attribution explorer")
    try:
        ws = ui.get_workspace()
    except Exception as e:  # missing or broken bundle: say so instead of a stack trace
        st.error(f"Could not load the model bundle: {e}")
        ws = None
    if ws is None:
        if page.title != "About":
            st.stop()
    else:
        with st.container(border=True):
            st.markdown(ws.describe())
        sample_slot = st.empty()

if ws is None:
    page.run()
else:
    with ws.foreground():  # background scoring waits while this session renders
        page.run()

if ws is not None:
    # Filled after the page ran, so it already shows a sample the page just made.
    sample_slot.caption(f"Current sample: **{ui.sample_label()}**")
