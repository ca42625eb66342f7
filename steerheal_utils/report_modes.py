"""The report's "Steering mode" section: per round, how 02 added the vector (issue 16).

Read from each round's ``generate.json`` (its ``steer_mode`` block, written by
:func:`steerheal_utils.generate.modesummary.mode_summary`; absent in the ``constant`` mode) and, for
``backtrack``, from ``generated.jsonl``'s per-row backoff records. Kept apart from
:mod:`steerheal_utils.report` so that :func:`~steerheal_utils.report.write_report` calls it once.
"""

from __future__ import annotations

import html
from pathlib import Path

from . import contract
from .runfolder import read_json, read_jsonl


def _read(run_dir: Path, rnd: int, name: str, jsonl: bool = False):
    p = contract.path(run_dir, rnd, name)
    if not p.exists():
        return None
    try:
        return read_jsonl(p, name) if jsonl else read_json(p, name)
    except Exception:  # a damaged side record must not cost the report: that round's line says so
        return None


def round_mode(run_dir: Path | str, rnd: int) -> dict | None:
    """One round's steering mode as the report shows it, or None when 02 left no record.

    Returns ``mode``, ``halflife``, ``dose``, ``knobs`` (the mode's settings) and, for ``backtrack``,
    ``backoff`` (generate.json's summary plus ``effective_dose``: the token-weighted mean dose the
    kept tokens were sampled at, and ``mean_final_dose``) and ``rows`` (generated.jsonl, for the figure).
    """
    run_dir = Path(run_dir)
    g = _read(run_dir, rnd, "generate_summary")
    if not g:
        return None
    mode = g.get("steer_mode", "constant")
    out = {"round": rnd, "mode": mode, "halflife": g.get("halflife", 0), "dose": g.get("dose"), "knobs": {}}
    if mode == "cosine_gate":
        out["knobs"] = dict(g.get("cos_gate") or {})
    if mode == "backtrack" and g.get("backoff"):
        bo = dict(g["backoff"])
        out["knobs"] = {"threshold_kl": bo.get("threshold_kl"), "k": bo.get("k"), "factor": bo.get("factor"),
                        "max_per_row": bo.get("max_per_row")}
        from .generate.modesummary import effective_dose  # here: the generate package imports torch

        rows = [r for r in (_read(run_dir, rnd, "generated", jsonl=True) or []) if "backoff_at" in r]
        if rows:
            bo["effective_dose"] = effective_dose(rows, bo["k"], bo["factor"])
            bo["mean_final_dose"] = sum(r["final_dose"] for r in rows) / len(rows)
        out["backoff"], out["rows"] = bo, rows
    return out


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else html.escape(str(v)))


def modes_html(run_dir: Path | str, rounds: list[int]) -> str:
    """The section's HTML: one plain line when every round steered with the constant dose; otherwise a
    table of each round's mode, knobs and backoff statistics, and 02's "where it backed off" figure
    per backtrack round. plotly.js is not embedded here: the report's earlier figures carry it."""
    recs = [m for r in rounds if (m := round_mode(run_dir, r))]
    if all(m["mode"] == "constant" for m in recs):
        hl = sorted({m["halflife"] for m in recs})
        decay = "" if hl in ([], [0]) else f", halving every {', '.join(map(str, hl))} generated tokens (dose_halflife)"
        return f"<p>Steering mode: constant in every round (the dose as given{decay}).</p>"
    import plotly.io as pio

    from .generate.modesummary import backoff_figure  # not for constant runs: the generate package imports torch

    head = ("<tr><th>round</th><th>mode</th><th>knobs</th><th>dose</th><th>dose_halflife</th><th>rows backed off</th>"
            "<th>backoffs per row (rows)</th><th>mean token index of a backoff</th><th>effective dose</th>"
            "<th>mean final dose</th></tr>")
    cells, figs = [], []
    for m in recs:
        bo = m.get("backoff") or {}
        knobs = ", ".join(f"{k} {_fmt(v)}" for k, v in m["knobs"].items()) or "-"
        per_row = ", ".join(f"{c}: {n}" for c, n in (bo.get("per_row_counts") or {}).items()) or "-"
        backed = f"{bo['rows_backed_off']}/{bo['rows']} ({bo['backoffs']} backoffs)" if bo else "-"
        cells.append(f"<tr><td>{m['round']}</td><td>{html.escape(m['mode'])}</td><td>{knobs}</td><td>{_fmt(m['dose'])}</td>"
                     f"<td>{_fmt(m['halflife'])}</td><td>{backed}</td><td>{per_row}</td>"
                     f"<td>{_fmt(bo.get('mean_token_index'))}</td><td>{_fmt(bo.get('effective_dose'))}</td>"
                     f"<td>{_fmt(bo.get('mean_final_dose'))}</td></tr>")
        if bo and m.get("rows") and (fig := backoff_figure({"backoff": bo, "round": m["round"]}, m["rows"])):
            figs.append(pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"displaylogo": False}))
    note = ("<p><small>Effective dose: the mean dose the kept tokens were sampled at (token-weighted, before any "
            "dose_halflife decay); the dose column is what 02 chose.</small></p>")
    return f"<table>{head}{''.join(cells)}</table>{note}{''.join(figs)}"
