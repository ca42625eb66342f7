"""04_heal's plots: per-step telemetry, per-token KL heatmap, Q1's answer sets side by side."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..kl import AGGREGATES
from .train import HealResult


def figures(res: HealResult) -> list[go.Figure]:
    """Per-step telemetry: NLL, D under every aggregate (+ tau), hinge-active fraction, lr."""
    s = res.steps
    x = [r["step"] for r in s]
    fig = make_subplots(rows=2, cols=2, subplot_titles=("completion NLL", "D per aggregate (used: solid)",
                                                        "hinge-active fraction", "learning rate"))
    fig.add_scatter(x=x, y=[r["nll"] for r in s], name="NLL", row=1, col=1)
    used = f"D_{res.agg}"
    for how in AGGREGATES:
        k = f"D_{how}"
        fig.add_scatter(x=x, y=[r[k] for r in s], name=k, line=dict(dash="solid" if k == used else "dot"), row=1, col=2)
    if res.tau is not None:
        fig.add_hline(y=res.tau, line_dash="dash", annotation_text=f"tau={res.tau:.3g}", row=1, col=2)
    fig.add_scatter(x=x, y=[r["hinge_frac"] for r in s], name="hinge", row=2, col=1)
    fig.add_scatter(x=x, y=[r["lr"] for r in s], name="lr", row=2, col=2)
    fig.update_layout(height=560, title=f"heal {res.new}: {len(s)} steps, lam_r={res.lam_r:.3g}")
    return [fig]


def kl_heatmap(token_rows: Sequence[dict], tau: float | None = None, max_tokens: int = 96) -> go.Figure:
    """Heatmap of per-token KL for a few completions (hover shows the token)."""
    n = min(max_tokens, max((len(r["kl"]) for r in token_rows), default=0))
    z = [r["kl"][:n] + [None] * (n - len(r["kl"][:n])) for r in token_rows]
    text = [r["tokens"][:n] + [""] * (n - len(r["tokens"][:n])) for r in token_rows]
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="pos %{x}: %{text}<br>KL %{z:.3f}<extra></extra>",
                               colorscale="Magma", colorbar=dict(title="KL")))
    fig.update_layout(height=120 + 40 * len(z), title="per-token KL(healed || base)" + (f"; tau={tau:.3g}" if tau else ""),
                      xaxis_title="completion position", yaxis_title="row")
    return fig


def q1_figure(q1: dict) -> go.Figure:
    """Bars per answer set: loop rate, narration rate, median tail ppl, KL to base per token."""
    sets = q1["sets"]
    names = list(sets)
    keys = [("loop_rate", "loop-detector rate"), ("narration_rate", "narration rate"),
            ("tail_ppl_median", "median tail ppl under base"), ("kl_to_base_per_token", "KL(healed || base) per token")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in keys])
    for j, (k, _) in enumerate(keys, 1):
        fig.add_bar(x=names, y=[sets[n][k] for n in names], showlegend=False, row=1, col=j)
    fig.update_layout(height=360, title=f"Q1, round {q1['round']}: can we heal? ({q1['prompts']} prompts)")
    return fig
