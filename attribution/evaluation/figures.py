"""Plotly figures of a benchmark report (LDS vs step with error bands, counterfactual distances vs k,
score correlation vs step distance). Built from the report dict alone, so the app can draw them."""

from __future__ import annotations

import plotly.graph_objects as go

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#393b79", "#637939"]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def lds_figure(report: dict) -> go.Figure:
    """Mean LDS per step (± 1 standard error band) of every method."""
    lds = report["lds"]
    steps = lds["steps"]
    fig = go.Figure()
    for i, (name, r) in enumerate(lds["methods"].items()):
        color = _PALETTE[i % len(_PALETTE)]
        lo = [m - s for m, s in zip(r["mean"], r["se"])]
        hi = [m + s for m, s in zip(r["mean"], r["se"])]
        fig.add_trace(go.Scatter(x=steps + steps[::-1], y=hi + lo[::-1], fill="toself", fillcolor=_rgba(color, 0.15),
                                 line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=name))
        fig.add_trace(go.Scatter(x=steps, y=r["mean"], mode="lines+markers", name=name, legendgroup=name,
                                 line={"color": color}))
    fig.update_layout(title="LDS per step (mean ± 1 s.e. over query samples)", xaxis_title="sampling step (noisy → clean)",
                      yaxis_title="LDS (Spearman ρ)", template="plotly_white", height=460)
    return fig


def counterfactual_figure(report: dict, metric: str = "pixel_l2") -> go.Figure:
    """Mean distance moved by the regenerated sample vs k, one line per removal rule."""
    fig = go.Figure()
    summary = report["counterfactual"]["summary"]
    kinds = sorted({r["kind"] for r in summary})
    for i, kind in enumerate(kinds):
        rows = sorted((r for r in summary if r["kind"] == kind), key=lambda r: r["k"])
        fig.add_trace(go.Scatter(
            x=[r["k"] for r in rows], y=[r[metric] for r in rows], mode="lines+markers", name=kind,
            error_y={"type": "data", "array": [r[metric + "_se"] or 0.0 for r in rows]},
            line={"color": _PALETTE[i % len(_PALETTE)]},
        ))
    fig.update_layout(title=f"Retrain without top-k: {metric} of the regenerated sample", xaxis_title="k removed",
                      yaxis_title=metric, template="plotly_white", height=420)
    return fig


def step_correlation_figure(report: dict) -> go.Figure:
    """Spearman ρ between a sample's scores at two steps vs their distance (Appendix B.5)."""
    fig = go.Figure()
    for i, (name, c) in enumerate(report["lds"]["analyses"]["step_correlation"].items()):
        fig.add_trace(go.Scatter(x=c["distance"], y=c["rho"], mode="lines+markers", name=name,
                                 error_y={"type": "data", "array": c["se"]}, line={"color": _PALETTE[i % len(_PALETTE)]}))
    fig.update_layout(title="Score correlation across steps", xaxis_title="step distance",
                      yaxis_title="Spearman ρ", template="plotly_white", height=420)
    return fig
