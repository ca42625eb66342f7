"""Plotly figures of 01: per-layer norms against the dose unit, pos/neg separation, drift from round 0."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .step import VectorResult


def figures(result: VectorResult) -> list:
    """Plotly figures for the notebook: per-layer norms, pos/neg separation, drift from round 0."""
    sv, details = result.vector, {"proj_pos": result.proj_pos, "proj_neg": result.proj_neg}

    layers = sv.layers
    fig = make_subplots(rows=1, cols=2, subplot_titles=("‖v_L‖ and median residual norm r_L", "projections onto v_L (pos vs neg)"))
    fig.add_bar(x=layers, y=[sv.norms()[i] for i in layers], name="‖v_L‖", row=1, col=1)
    fig.add_scatter(x=layers, y=[sv.resid_norms[i] for i in layers], name="r_L", mode="lines+markers", row=1, col=1)
    for layer in layers:
        fig.add_trace(go.Box(y=details["proj_pos"][layer], name=f"L{layer} pos", marker_color="seagreen", showlegend=False), row=1, col=2)
        fig.add_trace(go.Box(y=details["proj_neg"][layer], name=f"L{layer} neg", marker_color="firebrick", showlegend=False), row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(height=380, title=f"round {sv.meta.get('round', '?')}: steering vector")
    figs = [fig]
    if result.cosine_to_round0 is not None:
        cos = result.cosine_to_round0
        figs.append(go.Figure(go.Bar(x=list(cos), y=list(cos.values())),
                              layout=dict(title="cosine to round 0's vector, per layer", yaxis=dict(range=[-1, 1]), height=300)))
    return figs
