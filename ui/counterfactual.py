"""Explore's "What if these were never in the training set?" panel, and the precomputed showcase.

The panel builds a :class:`~attribution.counterfactual.CounterfactualRequest` for the current
sample and step from the user's choice (top-k positive, top-k negative, k random, a class), and
shows, for it and for the random-k control of the same k: the result (from the workspace's
disk cache or the shipped showcase), or its background job's progress with the time left and a
Cancel button, or a Start button. Everything it shows is on disk or in the shared workspace, not
in the session: a reloaded page, or another browser, finds the same jobs and results; a run a
server restart interrupted is resumed when its panel is opened again.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from attribution.counterfactual import KS, CounterfactualResult
from attribution.counterfactual.showcase import entries, reproduce_command
from attribution.sampling import Trajectory
from attribution.workspace import Workspace
from attribution.workspace.workspace import MAX_COUNTERFACTUAL_JOBS

from . import state
from .images import img_tag

RULES = {"top": "the top-k positive influencers", "bottom": "the top-k negative influencers",
         "random": "k random images (the control)", "class": "a whole class"}
SIZE = 112  # px of each image
COST = ("One retraining of the bundled checkpoint (40 epochs over 4,000 digits) takes about 8 min on 2 free CPU "
        "cores, longer on a busy machine, and well under a minute on a GPU (`attribution counterfactual --device "
        f"cuda`). At most {MAX_COUNTERFACTUAL_JOBS} run at once; later ones wait in a queue.")


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "estimating time left…"
    m, s = divmod(int(round(seconds)), 60)
    return f"about {m} min {s:02d} s left" if m else f"about {s} s left"


def _request_or_error(ws: Workspace, key: str, step: int, remove: str, k: int, method: str):
    try:
        return ws.counterfactual_request(key, step, remove, k, method)
    except (ValueError, FileNotFoundError) as e:
        st.error(str(e), icon=":material/error:")
        return None


def _class_label(ws: Workspace, probs: list[float]) -> str:
    c = int(np.argmax(probs))
    return f"class **{ws.class_names()[c]}** ({100 * probs[c]:.0f} %)"


def _column(ws: Workspace, col, title: str, images: tuple[np.ndarray, np.ndarray], step: int,
            lines: list[str], probs: list[float] | None) -> None:
    """One column of the side-by-side view: final sample and x0_hat at the step, then its numbers."""
    col.markdown(f"**{title}**")
    col.html("<div style='display:flex;gap:6px;align-items:flex-end'>"
             f"<figure style='margin:0'>{img_tag(images[0], SIZE, alt='final sample')}"
             "<figcaption style='font-size:0.75rem;color:#6b7280'>final sample</figcaption></figure>"
             f"<figure style='margin:0'>{img_tag(images[1], SIZE, alt='x0 at the step')}"
             f"<figcaption style='font-size:0.75rem;color:#6b7280'>x̂0 at step {step}</figcaption></figure></div>")
    if probs is not None:
        lines = [_class_label(ws, probs), *lines]
        col.html(_prob_bars(ws.class_names(), probs))
    col.markdown("  \n".join(lines))


def _prob_bars(names: list[str], probs: list[float], height: int = 44) -> str:
    """The classifier's class probabilities as a row of small bars (the most likely class dark)."""
    top = int(np.argmax(probs))
    bars = "".join(
        "<div style='display:flex;flex-direction:column;align-items:center;width:18px'>"
        f"<div style='height:{height}px;display:flex;align-items:flex-end'><div title='{n}: {100 * p:.1f} %' "
        f"style='width:12px;height:{max(1, round(height * p))}px;background:{'#4338ca' if i == top else '#a5b4fc'}'>"
        f"</div></div><span style='font-size:0.7rem;color:#6b7280'>{n}</span></div>"
        for i, (n, p) in enumerate(zip(names, probs)))
    return f"<div style='display:flex;gap:2px;margin:4px 0' aria-label='class probabilities'>{bars}</div>"


def show_results(ws: Workspace, results: dict[str, CounterfactualResult | None], step: int) -> None:
    """Original / without the chosen set / without random-k, side by side (only the finished ones)."""
    done = {name: r for name, r in results.items() if r is not None}
    if not done:
        return
    first = next(iter(done.values()))
    m0 = first.meta["metrics"]
    cols = st.columns(1 + len(done), gap="medium")
    _column(ws, cols[0], "Original", (first.images["original"], first.images["original_x0"]), step,
            [f"f_t = {m0['f_original']:.4f}"], m0.get("probs_original"))
    for col, (name, r) in zip(cols[1:], done.items()):
        m = r.meta["metrics"]
        changed = m.get("class_changed")
        lines = [f"pixel distance **{m['pixel_l2']:.2f}** (x̂0: {m['pixel_l2_x0']:.2f})"]
        if changed is not None:
            lines.append(":red[**class changed**]" if changed else "class unchanged")
        lines.append(f"Δf_t measured **{m['measured_delta_f']:+.4f}** · predicted {m['predicted_delta_f']:+.4f}")
        _column(ws, col, name, (r.images["sample"], r.images["sample_x0"]), step, lines, m.get("probs_new"))
    st.caption("Same seed and the same noises (an upload: its inverted noise). Pixel distance: ‖x′ − x‖₂ of images "
               "in [−1, 1]. Δf_t: change of the step's loss of Eq. 3 at the original x̂0 and noises; the prediction "
               "is the sum of the removed images' scores (positive: the step becomes less likely without them).")


def _job_label(request) -> str:
    return f"Without {request.label()} ({_sample_key_name(request.sample)}, step {request.step})"


def _sample_key_name(key: str) -> str:
    return f"seed {key[4:].split('-')[0]}" if key.startswith("seed") else "an upload"


def _job_bar(ws: Workspace, request, job) -> None:
    """One line of a running job: its progress bar with the time left (or its place in the queue), and Cancel."""
    label = _job_label(request)
    c_bar, c_cancel = st.columns([5, 1], vertical_alignment="bottom")
    if job.stage == "queued":
        c_bar.progress(0.0, text=f"{label}: queued — {MAX_COUNTERFACTUAL_JOBS} retrainings already run, this one "
                                 "starts when one ends")
    else:
        frac = job.done / job.total if job.total else 0.0
        what = "regenerating" if job.stage == "regenerating" else "retraining without them"
        c_bar.progress(min(frac, 1.0), text=f"{label}: {what} — {100 * frac:.0f} %, {_fmt_time(job.seconds_left())}")
    if c_cancel.button("Cancel", key=f"cf-cancel-{request.key()}", icon=":material/close:", width="stretch"):
        ws.cancel_counterfactual(request)
        st.rerun(scope="app")


def _running(ws: Workspace, request) -> bool:
    job = ws.counterfactual_job(request)
    return job is not None and job.running


def _status(ws: Workspace, request, label: str) -> CounterfactualResult | None:
    """The result of ``request`` if finished; else says why not (failed job), and resumes a run a restart interrupted."""
    result = ws.counterfactual_result(request)
    if result is not None or _running(ws, request):
        return result
    job = ws.counterfactual_job(request)
    if job is not None and job.error:
        st.error(f"{label}: {job.error}", icon=":material/error:")
        return None
    epoch = ws.counterfactual_interrupted(request)
    if epoch is not None:
        ws.start_counterfactual(request)  # it resumes at its last finished epoch
        st.info(f"{label}: resumed after epoch {epoch} of {request.train.epochs} (it was interrupted).",
                icon=":material/restart_alt:")
    return None


def _live_bars(ws: Workspace) -> None:
    """Progress bars of every counterfactual job of the server (any sample, any session), redrawn every second;
    the page reruns when one ends, to show its result."""
    running = ws.counterfactual_jobs()
    if not running:
        return

    @st.fragment(run_every=1.0)
    def bars() -> None:
        if not all(job.running for _, job in running):
            st.rerun(scope="app")
        st.markdown(f"**Running on this server** ({len(running)}; at most {MAX_COUNTERFACTUAL_JOBS} at once, the "
                    "others wait)")
        for request, job in running:
            _job_bar(ws, request, job)

    bars()


def counterfactual_panel(ws: Workspace, key: str, traj: Trajectory, step: int, method: str) -> None:
    """The panel (see module doc) for sample ``key`` at ``step``, ranked by ``method``."""
    st.caption("Take away the training images the scores point at, retrain the generating model without them (the "
               "same training run replayed), and generate again from the same noise. If the images mattered, the "
               "sample changes — and changes less when as many random images are taken away. " + COST)
    if method.startswith("baseline"):
        st.info("Pick an attribution method in the sidebar: a similarity baseline has no scores to remove by.",
                icon=":material/info:")
        return
    c_rule, c_k, c_ctl, c_go = st.columns([2.2, 1.2, 1.6, 1], vertical_alignment="bottom")
    rules = dict(RULES) if ws.dataset.labels is not None else {k: v for k, v in RULES.items() if k != "class"}
    rule = c_rule.selectbox("Remove", list(rules), format_func=rules.get, key=state.CF_RULE)
    if rule == "class":
        names = ws.class_names()
        c = c_k.selectbox("Class", range(len(names)), format_func=lambda i: names[i], key=state.CF_CLASS)
        remove, k = f"class:{c}", 0
    else:
        remove = rule
        k = c_k.selectbox("k", KS, index=1, key=state.CF_K)
    control = c_ctl.checkbox("+ random-k control", value=True, key=state.CF_CONTROL, disabled=rule == "random",
                             help="Also retrain without k random images (the same random set for every sample), "
                                  "to compare: removing any k images moves a small model's sample a little.")
    request = _request_or_error(ws, key, step, remove, k, method)
    rows = {}
    if request is not None:
        rows[f"Without {request.label()}"] = request
        if control and rule != "random":
            rows[f"Without random-{request.k}"] = _request_or_error(ws, key, step, "random", request.k, method)
    rows = {name: r for name, r in rows.items() if r is not None}
    started = c_go.button("Start", type="primary", icon=":material/play_arrow:", width="stretch", key="cf-start",
                          disabled=not rows, help="Runs in the background: you can keep exploring, reload the page, "
                                                  "or come back later; finished results are kept on disk.")
    if started:
        for r in rows.values():
            if ws.counterfactual_result(r) is None:
                ws.start_counterfactual(r)
    results = {name: _status(ws, r, name) for name, r in rows.items()}
    _live_bars(ws)
    if any(results.values()):
        show_results(ws, results, step)
    elif rows and not any(_running(ws, r) for r in rows.values()):
        st.caption(f"Not computed yet for {_sample_name(traj)} at step {step}: press Start.")
    _earlier_results(ws, key, traj, {r.key() for r in rows.values()})


def _earlier_results(ws: Workspace, key: str, traj: Trajectory, shown: set[str]) -> None:
    """The other finished counterfactuals of sample ``key`` (other rules, k or steps), grouped by step and k."""
    earlier = [r for r in ws.counterfactual_results_of(key) if r.request.key() not in shown]
    if not earlier:
        return
    st.markdown(f"**Computed earlier for {_sample_name(traj)}**")
    groups: dict[tuple[int, int], list[CounterfactualResult]] = {}
    for r in earlier:
        groups.setdefault((r.request.step, r.request.k), []).append(r)
    for (s, _), group in groups.items():
        show_results(ws, {f"Without {r.request.label()} (step {s})": r for r in group}, s)


def _sample_name(traj: Trajectory) -> str:
    return "this upload" if traj.source == "upload" else f"seed {traj.config.seed}"


def showcase(ws: Workspace) -> None:
    """The shipped, precomputed counterfactuals of the bundled model, all at once (nothing is computed)."""
    found = [r for root in ws.counterfactual_shipped for r in entries(root)]
    by_seed: dict[int, list[CounterfactualResult]] = {}
    for r in found:
        if r.meta["request"]["checkpoint"] == ws.counterfactual_checkpoint():
            by_seed.setdefault(r.meta["sample"]["seed"], []).append(r)
    if not by_seed:
        st.caption("No precomputed counterfactuals ship with this model.")
        return
    st.caption("Precomputed with the bundled model (k = 100, step 25, journey-TRAK scores). The random-100 set is "
               "the same for every sample, so one retraining serves them all. Each entry says the command that "
               "recomputes it exactly.")
    for seed, results in sorted(by_seed.items()):
        step = results[0].meta["request"]["step"]
        st.markdown(f"**Seed {seed}**")
        show_results(ws, {f"Without {r.request.label()}": r for r in results}, step)
        # plain text, not st.code: its highlighter is a 1.5 MB script on the app's first page
        st.text("\n".join(reproduce_command(r) for r in results))
