"""06_online's plots: the telemetry of every training step so far (all checkpoints)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .step import OnlineResult


def figures(res: OnlineResult) -> list[go.Figure]:
    """Per step, over every checkpoint so far: the filter's keep rate, the heal loss and NLL, the
    barrier's D (with tau) and the mean per-token KL to the reference. Dotted verticals: checkpoints;
    open markers: steps that re-read the vector."""
    s = [*res.history, *res.steps]
    x = [r["step"] for r in s]
    tr = [r for r in s if r.get("trained")]
    xt = [r["step"] for r in tr]
    fig = make_subplots(rows=2, cols=2, subplot_titles=("filter keep rate per batch", "heal loss and NLL (kept rows)",
                                                        "D: the barrier's aggregate", "mean per-token KL to the reference"))
    fig.add_scatter(x=x, y=[r["keep_rate"] for r in s], name="keep rate", mode="lines+markers", row=1, col=1)
    ref = [r for r in s if r.get("refreshed")]
    fig.add_scatter(x=[r["step"] for r in ref], y=[r["keep_rate"] for r in ref], mode="markers", name="vector re-read",
                    marker=dict(symbol="circle-open", size=12), row=1, col=1)
    fig.add_scatter(x=xt, y=[r["loss"] for r in tr], name="loss", row=1, col=2)
    fig.add_scatter(x=xt, y=[r["nll"] for r in tr], name="NLL", line=dict(dash="dot"), row=1, col=2)
    fig.add_scatter(x=xt, y=[r["D"] for r in tr], name="D", row=2, col=1)
    taus = [r["tau"] for r in tr if r.get("tau") is not None]
    if taus:
        fig.add_hline(y=taus[-1], line_dash="dash", annotation_text=f"tau={taus[-1]:.3g}", row=2, col=1)
    fig.add_scatter(x=xt, y=[r["D_mean"] for r in tr], name="KL mean", row=2, col=2)
    for r in sorted({int(r["round"]) for r in s})[1:]:
        first = min(q["step"] for q in s if int(q["round"]) == r)
        fig.add_vline(x=first - 0.5, line_dash="dot", line_color="grey")
    fig.update_layout(height=560, title=f"online loop: {len(s)} steps, {len(tr)} heal steps "
                                        f"(round {res.summary['round']:02d}: steps {res.summary['steps'][0]}-{res.summary['steps'][1] - 1})")
    fig.update_xaxes(title_text="training step")
    return [fig]
