"""02's record of the steering mode: the per-row backoff keys, their summary in generate.json, and the
figure of where rows backed off (:mod:`steerheal_utils.vector.modes`)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

BACKOFF_KEYS = ("backoffs", "backoff_at", "backoff_kl", "final_dose", "kl_mean", "kl_max")
"""Keys a ``backtrack`` row adds to generated.jsonl (:func:`steerheal_utils.generate.backtrack.sample_backtrack`)."""


def mode_summary(cfg, rows: list[dict]) -> dict[str, Any]:
    """generate.json's ``steer_mode`` block; empty in the ``constant`` mode (its generate.json is as before).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> cfg = NS(steer_mode="backtrack", backtrack_kl=2.0, backtrack_k=4, backtrack_factor=0.5, backtrack_max=3)
        >>> rows = [{"backoffs": 0, "backoff_at": [], "n_tokens": 9},
        ...         {"backoffs": 2, "backoff_at": [5, 9], "n_tokens": 12}]
        >>> mode_summary(cfg, rows)["backoff"]["rows_backed_off"]
        1
    """
    if cfg.steer_mode == "constant":
        return {}
    out: dict[str, Any] = {"steer_mode": cfg.steer_mode}
    if cfg.steer_mode == "cosine_gate":
        out["cos_gate"] = {"threshold": cfg.cos_gate, "kind": cfg.gate_kind}
    if cfg.steer_mode == "backtrack":
        n = [r.get("backoffs", 0) for r in rows]
        at = [a for r in rows for a in r.get("backoff_at", [])]
        out["backoff"] = {
            "threshold_kl": cfg.backtrack_kl, "k": cfg.backtrack_k, "factor": cfg.backtrack_factor,
            "max_per_row": cfg.backtrack_max, "rows": len(rows), "rows_backed_off": sum(x > 0 for x in n),
            "backoffs": sum(n), "rows_at_max": sum(x >= cfg.backtrack_max for x in n) if cfg.backtrack_max else 0,
            "per_row_counts": {str(c): n.count(c) for c in sorted(set(n))},
            "mean_token_index": sum(at) / len(at) if at else None,
            "mean_kl_per_token": (sum(r.get("kl_mean", 0.0) * r["n_tokens"] for r in rows)
                                  / max(1, sum(r["n_tokens"] for r in rows))),
        }
    return out


def token_doses(dose: float, n_tokens: int, backoff_at: list[int], k: int, factor: float) -> list[float]:
    """The dose each kept token of a ``backtrack`` row was sampled at (before any ``dose_halflife`` decay),
    rebuilt from its record: a backoff seen when the row held ``m`` tokens drops the last ``min(k, m)``
    and multiplies the dose by ``factor`` for what follows.

    Example:
        >>> token_doses(0.2, 5, [3], k=2, factor=0.5)  # 3 tokens at 0.2, 2 dropped, then 4 more at 0.1
        [0.2, 0.1, 0.1, 0.1, 0.1]
        >>> token_doses(0.2, 3, [], k=2, factor=0.5)
        [0.2, 0.2, 0.2]
    """
    out: list[float] = []
    cur = float(dose)
    for m in backoff_at:
        out += [cur] * (m - len(out))  # the tokens sampled since the last backoff
        del out[m - min(k, m):]
        cur *= factor
    if len(out) > n_tokens:
        raise ValueError(f"a backoff record that does not fit its row: {len(out)} tokens kept before the last "
                         f"backoff, {n_tokens} in the row")
    return out + [cur] * (n_tokens - len(out))


def effective_dose(rows: list[dict], k: int, factor: float) -> float | None:
    """Token-weighted mean dose of ``backtrack`` rows (:func:`token_doses`); None without tokens.

    Example:
        >>> effective_dose([{"dose": 0.2, "n_tokens": 5, "backoff_at": [3]},
        ...                 {"dose": 0.2, "n_tokens": 3, "backoff_at": []}], k=2, factor=0.5)
        0.15
    """
    doses = [d for r in rows for d in token_doses(r["dose"], r["n_tokens"], r.get("backoff_at", []), k, factor)]
    return round(sum(doses) / len(doses), 10) if doses else None


def backoff_figure(summary: dict, rows: list[dict]) -> go.Figure | None:
    """Where rows backed off (generated-token index of each spike, and its KL) and how often; None
    outside the ``backtrack`` mode."""
    bo = summary.get("backoff")
    if not bo:
        return None
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=("spikes: token index and KL (nats)", "backoffs per row"))
    fig.add_scatter(x=[a for r in rows for a in r.get("backoff_at", [])],
                    y=[k for r in rows for k in r.get("backoff_kl", [])], mode="markers", name="backoff",
                    marker=dict(color="firebrick", size=7, opacity=0.6), row=1, col=1)
    fig.add_hline(y=bo["threshold_kl"], line_dash="dash", line_color="gray",
                  annotation_text=f"threshold {bo['threshold_kl']:g} nats", row=1, col=1)
    counts = bo["per_row_counts"]
    fig.add_bar(x=list(counts), y=list(counts.values()), name="rows", marker_color="#444", row=1, col=2)
    fig.update_xaxes(title="generated token index", row=1, col=1)
    fig.update_xaxes(title="backoffs", type="category", row=1, col=2)
    fig.update_layout(height=320, showlegend=False,
                      title=(f"round {summary['round']}: backtrack: {bo['rows_backed_off']}/{bo['rows']} rows backed off "
                             f"({bo['backoffs']} times; rewind {bo['k']}, dose x{bo['factor']:g} each)"))
    return fig
