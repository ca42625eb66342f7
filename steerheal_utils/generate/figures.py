"""Plotly figures of 02: the dose search (keep rate per dose, the monotone fit, the threshold, the
chosen dose and its interval; flags in red), the probe verdicts per call, completion lengths."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .keepcurve import wilson
from .modesummary import backoff_figure
from .step import GenerateResult


def figures(result: GenerateResult) -> list:
    """Plotly figures for 02: the dose search (keep rate per dose with 95% intervals, the monotone
    fit, the threshold, the chosen dose and its interval; flags in red in the title), the probe
    verdicts per call, and completion lengths."""
    summary, rows = result.summary, result.rows

    figs = []
    flags = summary.get("dose_flags") or []
    flag_txt = f" <span style='color:#c00'><b>FLAGGED: {', '.join(flags)}</b></span>" if flags else ""
    cal = summary.get("calibration") or {}
    path = summary.get("calibration_path") or []
    if cal and path:
        pts = cal["points"]
        pos = [p for p in pts if p["dose"] > 0]
        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                            subplot_titles=("keep rate per dose (95% Wilson bars), monotone fit", "probe verdicts per call"))
        ci = [wilson(p["kept"], p["n"]) for p in pos]
        fig.add_scatter(x=[p["dose"] for p in pos], y=[p["frac"] for p in pos], mode="markers", name="kept (raw)",
                        error_y=dict(type="data", symmetric=False, array=[c[1] - p["frac"] for c, p in zip(ci, pos)],
                                     arrayminus=[p["frac"] - c[0] for c, p in zip(ci, pos)]),
                        text=[f"{p['kept']}/{p['n']}" for p in pos], marker=dict(size=9, color="#444"), row=1, col=1)
        fig.add_scatter(x=[p["dose"] for p in pos], y=[p["fit"] for p in pos], mode="lines", name="monotone fit",
                        line=dict(color="seagreen"), row=1, col=1)
        if cal.get("baseline_keep") is not None:
            lo0, hi0 = wilson(pts[0]["kept"], pts[0]["n"])
            fig.add_hrect(y0=lo0, y1=hi0, fillcolor="gray", opacity=0.15, line_width=0, row=1, col=1)
            fig.add_hline(y=cal["baseline_keep"], line_dash="dot", line_color="gray", row=1, col=1,
                          annotation_text=f"unsteered {pts[0]['kept']}/{pts[0]['n']}")
        thr_txt = (f"threshold {cal['threshold']:.2f} = {cal['target']:g} x unsteered" if cal.get("relative")
                   else f"threshold {cal['threshold']:.2f}")
        fig.add_hline(y=cal["threshold"], line_dash="dash", line_color="firebrick", annotation_text=thr_txt, row=1, col=1)
        lo_ci, hi_ci = cal["crossing_ci"]
        fig.add_vrect(x0=lo_ci, x1=hi_ci, fillcolor="royalblue", opacity=0.12, line_width=0, row=1, col=1)
        fig.add_vline(x=summary["dose"], line_dash="dot", line_color="royalblue",
                      annotation_text=f"chosen {summary['dose']:.3g} (90%: {lo_ci:.3g}-{hi_ci:.3g})", row=1, col=1)
        reasons = sorted({k for p in path for k in p["reasons"]}, key=lambda k: (k != "keep", k))
        for k in reasons:
            fig.add_bar(x=[f"{p['step']} {p['phase'][0]}: {p['dose']:.3g}" for p in path],
                        y=[p["reasons"].get(k, 0) for p in path], name=k, row=1, col=2)
        fig.update_xaxes(type="log", title="dose (fraction of r_L)", row=1, col=1)
        fig.update_yaxes(range=[-0.05, 1.05], title="kept fraction", row=1, col=1)
        mono = f"monotone test p = {cal['monotone_p']:.3g}"
        fig.update_layout(barmode="stack", height=420,
                          title=f"round {summary['round']}: dose search ({mono}){flag_txt}")
        figs.append(fig)
    fig = go.Figure()
    for trunc, color in ((False, "seagreen"), (True, "darkorange")):
        fig.add_histogram(x=[r["n_tokens"] for r in rows if r["truncated"] == trunc], name="cut at max_new_tokens" if trunc else "ended (EOS)",
                          marker_color=color)
    src = "" if summary.get("dose_source") == "calibrated" else f" ({summary.get('dose_source')})"
    how = ("persona system prompt, no vector" if summary.get("dose") is None
           else f"dose {summary['dose']:.3g}{src}")
    fig.update_layout(barmode="stack", height=300, xaxis_title="tokens",
                      title=f"completion length (tokens), {how}" + ("" if cal else flag_txt))
    figs.append(fig)
    bo = backoff_figure(summary, rows)  # the backtrack mode: where rows backed off
    if bo is not None:
        figs.append(bo)
    return figs
