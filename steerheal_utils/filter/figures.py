"""Plotly figures of 03: counts per reason, score histograms against their gates, examples, the labelled set."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .gates import GATES
from .step import FilterResult


def _clip(text: str, n: int = 320) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def figures(result: FilterResult) -> list[Any]:
    """Plotly figures for 03: counts per reason, score histograms with their gates, example tables,
    and precision/recall on the labelled set."""
    rows, summary = result.rows, result.summary

    figs = []
    counts = summary["reasons"]
    figs.append(go.Figure(go.Bar(x=list(counts), y=list(counts.values()),
                                 marker_color=["seagreen" if k == "keep" else "firebrick" for k in counts]),
                          layout=dict(title=f"round {summary['round']}: {summary['n_kept']} of {summary['n']} kept "
                                            f"(min_train {summary['min_train']})", height=320)))
    th = summary["thresholds"]
    gates = [g for g in GATES if any(r.get(g[0]) is not None for r in rows)]
    ncol = 4
    nrow = max(1, math.ceil(len(gates) / ncol))
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[f"{k} ({side} {th[f]:g})" for k, f, side, _ in gates])
    for j, (key, fld, _side, log) in enumerate(gates):
        r_, c_ = j // ncol + 1, j % ncol + 1
        for keep, color in ((True, "seagreen"), (False, "firebrick")):
            xs = [r[key] for r in rows if r["keep"] == keep and r.get(key) is not None]
            if log:
                xs = [math.log10(max(x, 1e-12)) for x in xs]
            fig.add_histogram(x=xs, marker_color=color, opacity=0.6, name="kept" if keep else "dropped",
                              legendgroup=str(keep), showlegend=j == 0, row=r_, col=c_)
        gate = math.log10(th[fld]) if log else th[fld]
        fig.add_vline(x=gate, line_dash="dash", line_color="black", row=r_, col=c_)
    fig.update_layout(barmode="overlay", height=230 * nrow, title="scores, kept vs dropped; dashed = gate "
                      "(tail_ppl on a log10 axis)")
    figs.append(fig)

    def table(sel: list[dict[str, Any]], title: str) -> Any:
        cols = ["id", "reason", "tail_ppl", "ngram_repeat", "prompt", "completion"]
        vals = [[r.get("id", ""), r["reason"], f"{r['tail_ppl']:.3g}" if r.get("tail_ppl") is not None else "-",
                 f"{r.get('ngram_repeat', 0):.2f}", _clip(r.get("prompt", ""), 120), _clip(r["completion"])]
                for r in sel]
        return go.Figure(go.Table(columnwidth=[60, 80, 50, 50, 200, 460], header=dict(values=cols),
                                  cells=dict(values=list(zip(*vals)) if vals else [[] for _ in cols], align="left")),
                         layout=dict(title=title, height=120 + 110 * max(1, len(sel))))

    kept = [r for r in rows if r["keep"]][:6]
    dropped, seen = [], Counter()
    for r in rows:  # up to two examples of each drop reason
        if not r["keep"] and seen[r["reason"]] < 2:
            dropped.append(r)
            seen[r["reason"]] += 1
    figs.append(table(kept, f"kept examples ({len(kept)} of {summary['n_kept']})"))
    figs.append(table(dropped, "dropped examples (up to two per reason)"))
    lab = summary.get("labelled")
    if lab:
        per = lab["per_label"]
        labels = sorted(per)
        figs.append(go.Figure(go.Bar(x=labels, y=[per[k]["drop_rate"] for k in labels]),
                              layout=dict(title=f"labelled set: keep precision {lab['precision'] or float('nan'):.2f}, "
                                                f"keep recall {lab['recall'] or float('nan'):.2f}, degenerate recall "
                                                f"{lab['degenerate_recall'] or float('nan'):.2f}; drop rate per label",
                                          yaxis=dict(range=[0, 1.05]), height=340)))
    return figs
