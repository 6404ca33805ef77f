"""Plotly figures: likelihood curves over the steps, one example's score over the steps, the score heat map."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np

from attribution.sampling import Trajectory
from attribution.scoring import GroupInfluence
from attribution.workspace import Workspace, short_text

from .grids import per_step_normalized
from .images import NEGATIVE_COLOR, NEUTRAL_COLOR, POSITIVE_COLOR

STEP_AXIS = "denoising step (noisy → clean)"


def predicted_class(ws: Workspace, traj: Trajectory) -> int | None:
    """The classifier's label of the final sample, or None without a classifier."""
    if ws.classifier is None:
        return None
    return int(ws.classify(traj.display_sample[None])[0].argmax())


def curve_steps(num_steps: int, subset: str) -> list[int]:
    """Steps for likelihood curves: ``"every 5th"``, ``"every 2nd"`` or ``"all"`` (last step always included)."""
    stride = {"every 5th": 5, "every 2nd": 2, "all": 1}[subset]
    steps = list(range(0, num_steps, stride))
    return steps if steps[-1] == num_steps - 1 else steps + [num_steps - 1]


def _step_hover(traj: Trajectory, steps: Sequence[int]) -> list[int]:
    return [int(traj.timesteps[s]) for s in steps]


def default_labels(ws: Workspace, traj: Trajectory, limit: int = 4) -> list[str]:
    """Starting text labels for CLIP curves: the sample's prompt, then distinct training captions."""
    out: list[str] = []
    for text in [traj.prompt or ""] + list(ws.captions or []):
        text = " ".join(text.split())
        if text and text not in out:
            out.append(text)
        if len(out) == limit:
            break
    return out if len(out) >= 2 else out + [f"label {i + 1}" for i in range(2 - len(out))]


def parse_labels(raw: str) -> list[str]:
    """One label per non-blank line (ValueError with a message for fewer than two or repeats)."""
    from attribution.models import check_labels

    return check_labels([line for line in raw.splitlines() if line.strip()])


def curves_figure(curves, names: Sequence[str], highlight: int, traj: Trajectory, current_step: int | None = None,
                  feature: str = "class"):
    """Plotly lines of every class (or text label) probability vs step; ``highlight`` drawn bold with its rise interval shaded."""
    import plotly.express as px
    import plotly.graph_objects as go

    palette = px.colors.qualitative.T10
    steps = [int(s) for s in curves.steps]
    fig = go.Figure()
    interval = curves.rise_interval(highlight)
    if interval is not None:
        a, b = interval
        fig.add_vrect(x0=a - 0.5, x1=b + 0.5, fillcolor=POSITIVE_COLOR, opacity=0.12, line_width=0,
                      annotation_text=f"“{short_text(names[highlight], 32)}” is decided here", annotation_position="top left")
    order = [c for c in range(len(names)) if c != highlight] + [highlight]
    for c in order:
        bold = c == highlight
        fig.add_trace(go.Scatter(
            x=steps, y=curves.probs[:, c], mode="lines+markers" if bold else "lines", name=f"“{short_text(names[c], 32)}”",
            line=dict(width=4 if bold else 1.5, color=palette[c % len(palette)]),
            opacity=1.0 if bold else 0.45, customdata=_step_hover(traj, steps), legendrank=c,
            hovertemplate=f"“{html.escape(short_text(names[c], 60))}”: %{{y:.0%}} at step %{{x}} (t=%{{customdata}})<extra></extra>",
        ))
    if current_step is not None:
        fig.add_vline(x=current_step, line_dash="dot", line_color=NEUTRAL_COLOR)
    fig.update_layout(
        height=430, margin=dict(l=10, r=10, t=30, b=10), legend_title_text=feature,
        xaxis_title=STEP_AXIS, yaxis_title=f"probability of the {feature}", yaxis=dict(range=[0, 1.02], tickformat=".0%"),
    )
    return fig


def example_figure(values: np.ndarray, traj: Trajectory, title: str, current_step: int | None = None):
    """Bars of one training image's score at every step: green positive, red negative, zero line."""
    import plotly.graph_objects as go

    steps = list(range(len(values)))
    colors = [POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values]
    fig = go.Figure(go.Bar(
        x=steps, y=values, marker_color=colors, customdata=_step_hover(traj, steps),
        hovertemplate="step %{x} (t=%{customdata}): %{y:+.3g}<extra></extra>",
    ))
    fig.add_hline(y=0, line_color="#111827", line_width=1)
    if current_step is not None:
        fig.add_vline(x=current_step, line_dash="dot", line_color=NEUTRAL_COLOR)
    fig.update_layout(height=330, margin=dict(l=10, r=10, t=40, b=10), title=title,
                      xaxis_title=STEP_AXIS, yaxis_title="score (+ helps, − hurts)", showlegend=False)
    return fig


def heatmap_figure(ws: Workspace, scores: np.ndarray, indices: np.ndarray, traj: Trajectory, normalize: bool):
    """Heatmap of training images (rows) × steps (columns); red-white-green, centred on zero."""
    import plotly.graph_objects as go

    values = scores[:, indices]
    if normalize:
        values = per_step_normalized(values, scores)
    z = values.T
    zmax = float(np.abs(z).max()) or 1.0
    ylabels = [f"idx {int(i)} · “{short_text(ws.label(int(i)), 32)}”" for i in indices]
    steps = list(range(scores.shape[0]))
    fig = go.Figure(go.Heatmap(
        z=z, x=steps, y=ylabels, zmin=-zmax, zmax=zmax, zmid=0,
        colorscale=[[0, NEGATIVE_COLOR], [0.5, "#ffffff"], [1, POSITIVE_COLOR]],
        colorbar=dict(title="score" + (" / step max" if normalize else "")),
        hovertemplate="%{y}<br>step %{x}: %{z:+.3g}<extra></extra>",
    ))
    fig.update_layout(height=max(320, 16 * len(indices) + 120), margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title=STEP_AXIS, yaxis=dict(autorange="reversed", tickfont=dict(size=10)))
    return fig


def group_influence_bars(gi: GroupInfluence, highlight: int | None = None) -> str:
    """Bar chart of the summed score of every class at one step, as HTML (green: the class's removal
    would make this step less likely; red: more likely); ``highlight`` outlines the sample's class.

    Plain HTML rather than a plotly chart: the Explore page is the app's first page, and plotly's
    4.6 MB script delayed every new session's first paint by about a second on a small machine.
    Each bar carries its value in ``data-value`` and its details in a hover tooltip.
    """
    sums = np.asarray(gi.sums, dtype=float).tolist()
    hi, lo = max(max(sums), 0.0), min(min(sums), 0.0)
    span = (hi - lo) or 1.0
    zero = 100 * hi / span  # % from the top of the plot
    cols = []
    for i, (name, v) in enumerate(zip(gi.names, sums)):
        top = zero - 100 * max(v, 0.0) / span
        tip = (f"class {name}: summed score {v:+.3g}; {100 * gi.positive_share[i]:.0f} % of the positive, "
               f"{100 * gi.negative_share[i]:.0f} % of the negative influence; {gi.top_positive_counts[i]} of the "
               f"top {gi.top_k} positive, {gi.top_negative_counts[i]} of the top {gi.top_k} negative")
        outline = "outline:3px solid #222;" if i == highlight else ""
        color = POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR
        cols.append(
            f"<div style='flex:1;display:flex;flex-direction:column;align-items:center;min-width:0'>"
            f"<div style='position:relative;width:70%;height:170px'>"
            f"<div class='bar' data-class='{html.escape(str(name))}' data-value='{v!r}' title='{html.escape(tip)}' "
            f"style='position:absolute;left:0;right:0;top:{top:.2f}%;height:max({100 * abs(v) / span:.2f}%,1px);"
            f"background:{color};{outline}'></div></div>"
            f"<div style='font-size:0.8rem;margin-top:4px'>{html.escape(short_text(str(name), 10))}</div></div>")
    return (
        "<div class='group-influence' aria-label='Summed score per class'>"
        "<div style='font-weight:600;margin-bottom:6px'>Summed score per class</div>"
        f"<div style='display:flex;align-items:stretch;gap:2px'>"
        f"<div style='display:flex;flex-direction:column;justify-content:space-between;height:170px;font-size:0.75rem;"
        f"color:{NEUTRAL_COLOR};text-align:right;padding-right:4px'><span>{hi:+.3g}</span><span>{lo:+.3g}</span></div>"
        f"<div style='flex:1;display:flex;position:relative;border-left:1px solid #ccc'>"
        f"<div style='position:absolute;left:0;right:0;top:{zero:.2f}%;border-top:1px solid #888;height:0'></div>"
        f"{''.join(cols)}</div></div>"
        f"<div style='font-size:0.8rem;color:{NEUTRAL_COLOR};text-align:center;margin-top:2px'>class of the training "
        "images (outlined: the sample's class)</div></div>")


def class_share_figure(curves, cls: int, name: str, steps: Sequence[int], positive: np.ndarray, negative: np.ndarray,
                       top_k: int, traj: Trajectory, current_step: int | None = None):
    """journey-TRAK Figure 3: the class's likelihood over the steps (line) with the share of the top-k positive and
    negative influencers that have the class (bars), at ``steps``."""
    import plotly.graph_objects as go

    cls_steps = [int(s) for s in curves.steps]
    hover = _step_hover(traj, list(steps))
    fig = go.Figure()
    fig.add_trace(go.Bar(x=list(steps), y=np.asarray(positive).tolist(), name=f"top-{top_k} positive with the class",
                         marker_color=POSITIVE_COLOR, opacity=0.75, customdata=hover,
                         hovertemplate="%{y:.0%} of the top positive at step %{x} (t=%{customdata})<extra></extra>"))
    fig.add_trace(go.Bar(x=list(steps), y=np.asarray(negative).tolist(), name=f"top-{top_k} negative with the class",
                         marker_color=NEGATIVE_COLOR, opacity=0.75, customdata=hover,
                         hovertemplate="%{y:.0%} of the top negative at step %{x} (t=%{customdata})<extra></extra>"))
    fig.add_trace(go.Scatter(x=cls_steps, y=curves.probs[:, cls].tolist(), mode="lines+markers",
                             name=f"likelihood of “{short_text(name, 24)}”", line=dict(width=3, color="#333")))
    if current_step is not None:
        fig.add_vline(x=current_step, line_dash="dot", line_color=NEUTRAL_COLOR)
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10), barmode="group",
                      title="Influencers that have the class, step by step (journey-TRAK Figure 3)",
                      xaxis_title=STEP_AXIS, yaxis=dict(range=[0, 1.02], tickformat=".0%"), yaxis_title="share")
    return fig
