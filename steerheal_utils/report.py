"""The run report: ``metrics.csv``, ``report.html`` (self-contained) and ``trajectory.png``.

Everything is rebuilt from the ``round_*/eval.json`` files, so the report of a crashed or
resumed run is always consistent with what the rounds wrote. Panels:

- A: on-target scores per condition over rounds (auth_nats, care_nats, axis probe): base as a
  star, steered red, healed green, each with its 95% paired-bootstrap CI as error bars; the
  prompted control as a reference line, the random-control band as a grey area (its lowest to
  its highest control) with its mean dotted;
- B: log-incoherence ``1 - coherence`` on a log axis (down = coherent), with CIs;
- C: the axis's map of the trajectory (care vs authority by default; grey dots: the controls);
- D: drift: cosine of each round's vector to round 0's, KL of the healed model to base;

- E: all seven foundations per condition over rounds, with CIs;
- F: the heal loss per step (NLL and the barrier statistic D), each round;
- G: the dose path: every dose the search tried and the chosen dose with its 90% interval;
- H: the filter's verdicts per round (keep and each drop reason);

then the headline numbers with CIs, the metrics table (with CIs), the control band (matched doses and
KLs, where the steered model falls in it, controls that missed their KL match in red), a steered
completion next to the healed model's own answers (04's Q1), the outputs-over-loop table (the
healed model's greedy answer to each held-out prompt, per round), wall time per stage (the step
records), links to each round's executed notebooks and the config. The title is the run's name.
``steerheal report DIR [--out OUT]`` writes them for any run folder (into OUT for a read-only one);
``steerheal compare A B ...`` overlays runs and tabulates their final-round deltas with CIs.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from . import axis as axes_
from . import contract, report_modes
from .markers import rounds_that_hold
from .runfolder import atomic_write_bytes, atomic_write_text, read_json, read_jsonl

NATS = ("care_nats", "fairness_nats", "loyalty_nats", "auth_nats", "sanctity_nats", "liberty_nats", "social_nats")
COLUMNS = ("round", "condition", "care_nats", "auth_nats", "coherence", "axis_logodds", *NATS[1:3], *NATS[4:],
           "on_diag_authority", "on_diag_care", "agreement", "axis_care_rate", "axis_mass", "kl_to_base",
           "vector_cosine_to_round0", "dose", "dose_flag", "n_generated", "n_kept", "n_rows", "unscorable", "seconds",
           "stop_reason")
# Uncertainty and the control band (issue 12). ``<m>_lo`` / ``<m>_hi``: the paired-bootstrap interval of
# metric m (eval.json ``ci``); ``delta_<m>`` (+ ``_lo``/``_hi``): the condition minus base with its paired
# interval. The ``random`` row summarises the band ``random_00``...: the mean over controls, and its
# ``_lo``/``_hi`` are the band's min and max, not a CI (column ``interval`` says which). On the steered
# row, ``<m>_band_z`` / ``<m>_band_rank``: where the persona falls in the band (stats.band_position).
# ``tag_kl``: next-token KL at the assistant tag (steered: the persona's; controls: their own at
# their matched dose); ``kl_matched`` 0 flags a control whose KL missed the persona's.
CI_METRICS = ("coherence", *NATS, "on_diag_authority", "on_diag_care", "agreement", "axis_logodds", "axis_care_rate")
HEADLINE = ("axis_logodds", "care_nats", "auth_nats", "coherence")
CI_COLUMNS = ("interval", *[f"{m}_{e}" for m in CI_METRICS for e in ("lo", "hi")],
              *[f"delta_{m}{e}" for m in HEADLINE for e in ("", "_lo", "_hi")],
              *[f"{m}_band_{e}" for m in HEADLINE for e in ("z", "rank")],
              "tag_kl", "persona_tag_kl", "kl_matched", "n_controls")
CSV_COLUMNS = (*COLUMNS, *CI_COLUMNS)  # what metrics.csv holds (the default axis; see csv_columns)


def run_axis(run_dir: Path | str) -> "axes_.Axis":
    """The axis a run's last evaluated round measured (:data:`axis.DEFAULT` for a run without one)."""
    evs = load_evals(run_dir)
    return axes_.from_eval(evs[-1]) if evs else axes_.DEFAULT


def csv_columns(ax: "axes_.Axis" = axes_.DEFAULT) -> tuple[str, ...]:
    """metrics.csv's columns for a run on axis ``ax``: :data:`CSV_COLUMNS` for the default axis; a
    custom axis adds ``axis_name``, ``axis_pos``, ``axis_neg`` (what ``axis_logodds`` measures:
    log p(pos) - log p(neg) on the axis's probe; ``axis_care_rate`` is the pos side's win rate)
    and the delta and band columns of its map's foundations."""
    if ax.is_default:
        return CSV_COLUMNS
    extra = [m for m in ax.headline if m not in HEADLINE]
    return (*CSV_COLUMNS, "axis_name", "axis_pos", "axis_neg",
            *[f"delta_{m}{e}" for m in extra for e in ("", "_lo", "_hi")],
            *[f"{m}_band_{e}" for m in extra for e in ("z", "rank")])
COLORS = {"base": "black", "steered": "#d62728", "healed": "#2ca02c", "prompted": "#1f77b4", "random": "#7f7f7f"}
CONDITION_ORDER = ("base", "prompted", "random", "steered", "healed")
ROUND_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _family(condition: str) -> str:
    """``random_03`` -> ``random`` (a band member sorts and colours with its band)."""
    return "random" if condition.startswith("random_") else condition


# ------------------------------------------------------------------ reading the run
def load_evals(run_dir: Path | str) -> list[dict]:
    """``round_NN/eval.json`` of every round whose step records hold, in round order."""
    out = []
    for rnd in rounds_that_hold(run_dir):  # a round whose records do not hold is left out (`run` says why)
        ev = contract.read_eval(run_dir, rnd)
        ev.setdefault("round", rnd)
        out.append(ev)
    return out


def _kept_counts(run_dir: Path, rnd: int) -> tuple[int | None, int | None]:
    p = contract.path(run_dir, rnd, "completions")
    if not p.exists():
        return None, None
    rows = read_jsonl(p, "completions")
    return len(rows), sum(1 for r in rows if r.get("keep"))


def _generate_record(run_dir: Path, rnd: int) -> dict:
    p = contract.path(run_dir, rnd, "generate_summary")
    return read_json(p, "02_generate record") if p.exists() else {}


def dose_warnings(run_dir: Path | str) -> list[str]:
    """Every round's dose warning line (02's generate.json: a bound, below target, diverged...)."""
    return [w for ev in load_evals(run_dir) if (w := _generate_record(Path(run_dir), ev["round"]).get("dose_warning"))]


def _condition_key(condition: str) -> tuple:
    fam = _family(condition)
    return (CONDITION_ORDER.index(fam) if fam in CONDITION_ORDER else 99, condition != fam, condition)


def _evidence(s: dict, cols: tuple[str, ...] = CSV_COLUMNS) -> dict:
    """The CI, delta and control-match columns of one condition summary (those among ``cols``)."""
    row: dict = {"interval": "bootstrap" if s.get("ci") else None}
    for m, (lo, hi) in (s.get("ci") or {}).items():
        row[f"{m}_lo"], row[f"{m}_hi"] = lo, hi
    for m, d in (s.get("delta_vs_base") or {}).items():
        row[f"delta_{m}"], row[f"delta_{m}_lo"], row[f"delta_{m}_hi"] = d.get("delta"), d.get("lo"), d.get("hi")
    if "kl_matched" in s:
        row["kl_matched"] = int(bool(s["kl_matched"]))
    row["tag_kl"], row["persona_tag_kl"] = s.get("tag_kl"), s.get("persona_tag_kl")
    return {k: v for k, v in row.items() if k in cols}


def _band_row(ev: dict, members: list[dict], headline: tuple[str, ...] = HEADLINE) -> dict:
    """The ``random`` row: the band's mean per metric, ``_lo``/``_hi`` its min/max over controls."""
    band = ev.get("control_band") or {}
    row: dict = {"condition": "random", "interval": "band_min_max", "n_controls": len(members)}
    ranged = (*CI_METRICS, *[f"delta_{h}" for h in dict.fromkeys((*HEADLINE, *headline))])
    for m in (*ranged, "axis_mass", "tag_kl", "dose", "n_rows"):
        vals = [r[m] for r in members if _num(r.get(m))]
        if vals:
            row[m] = sum(vals) / len(vals)
            if m in ranged:
                row[f"{m}_lo"], row[f"{m}_hi"] = min(vals), max(vals)
    row["persona_tag_kl"] = band.get("persona_tag_kl")
    row["kl_matched"] = int(not band.get("unmatched")) if band else None
    return row


def metric_rows(run_dir: Path | str) -> list[dict]:
    """One dict per (round, condition) with the :data:`CSV_COLUMNS` (missing values are None).

    A round with a control band gets a ``random`` row summarising it (see :data:`CI_COLUMNS`)
    next to the members' own ``random_NN`` rows.
    """
    run_dir = Path(run_dir)
    rows = []
    for ev in load_evals(run_dir):
        ax = axes_.from_eval(ev)
        cols = csv_columns(ax)
        n_gen, n_kept = _kept_counts(run_dir, ev["round"])
        gen = _generate_record(run_dir, ev["round"])
        conditions = ev.get("conditions", {})
        common = dict(round=ev["round"], n_generated=n_gen, n_kept=n_kept,
                      vector_cosine_to_round0=ev.get("vector_cosine_to_round0"))
        if not ax.is_default:
            common.update(axis_name=ax.name, axis_pos=ax.pos, axis_neg=ax.neg)
        out = []
        for name in sorted(conditions, key=_condition_key):
            s = conditions[name]
            row = {c: s.get(c) for c in cols}
            row.update(_evidence(s, cols))
            row.update(common, condition=name,
                       dose_flag=gen.get("dose_flag") if _family(name) in ("steered", "healed", "random") else None,
                       kl_to_base=s.get("kl_to_base", ev.get("kl_to_base") if name == "healed" else None),
                       stop_reason=(ev.get("stop") or {}).get("reason") if name == "healed" else None)
            out.append(row)
        members = [r for r in out if r["condition"].startswith("random_")]
        if members:
            band = {c: None for c in cols}
            band.update(common, **{k: v for k, v in _band_row(ev, members, ax.headline).items() if k in cols})
            out.append(band)
            out.sort(key=lambda r: _condition_key(r["condition"]))
        for r in out:
            if r["condition"] == "steered":
                band_ev = ev.get("control_band") or {}
                r["tag_kl"] = band_ev.get("persona_tag_kl", r.get("tag_kl"))
                for m, pos in (band_ev.get("position") or {}).items():
                    r[f"{m}_band_z"], r[f"{m}_band_rank"] = pos.get("z"), pos.get("rank")
        rows += out
    return rows


def write_metrics(run_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """Rebuild ``DIR/metrics.csv`` (or ``out_dir/metrics.csv``) from every round's eval.json
    (atomically); return its path."""
    rows = metric_rows(run_dir)
    # every round's columns (a run whose axis changed mid-way has both rounds' extras)
    cols = dict.fromkeys(CSV_COLUMNS)
    cols.update(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    path = contract.run_path(run_dir, "metrics")
    if out_dir is not None:
        path = Path(out_dir) / path.name
    atomic_write_text(path, buf.getvalue())
    return path


# ------------------------------------------------------------------ figures (plotly)
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _interval(rows: list[dict], condition: str, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """``(rounds, values, lows, highs)`` of one condition's metric; a missing bound is the value itself."""
    pts = [r for r in rows if r["condition"] == condition and _num(r.get(key))]
    lo = [r[f"{key}_lo"] if _num(r.get(f"{key}_lo")) else r[key] for r in pts]
    hi = [r[f"{key}_hi"] if _num(r.get(f"{key}_hi")) else r[key] for r in pts]
    return [r["round"] for r in pts], [r[key] for r in pts], lo, hi


def _error_y(y, lo, hi, flip: bool = False) -> dict:
    """Plotly asymmetric error bars from absolute bounds (``flip``: for a plotted ``1 - value``)."""
    up, down = ([v - a for v, a in zip(y, lo)], [b - v for v, b in zip(y, hi)]) if flip else \
        ([b - v for v, b in zip(y, hi)], [v - a for v, a in zip(y, lo)])
    return dict(type="data", symmetric=False, array=up, arrayminus=down, thickness=1.2, width=4)


def figures(run_dir: Path | str) -> list:
    """Plotly figures A-D for the rounds so far (used by the report and the 05 notebook).

    Error bars are the paired-bootstrap intervals (``_lo``/``_hi`` in metrics.csv); the grey band
    is the random-control band (min to max over the controls, dotted line its mean).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = metric_rows(run_dir)
    rounds = sorted({r["round"] for r in rows}) or [0]
    x_span = [min(rounds) - 0.3, max(rounds) + 0.3]
    ax = run_axis(run_dir)

    # A: on-target scores
    keys = tuple((k, axes_.metric_label(ax, k)) for k in (ax.x_key, ax.y_key, "axis_logodds"))
    a = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, 1):
        x, y, lo, hi = _interval(rows, "random", key)
        if x:  # the band: min..max over the controls; measured once, it spans every round
            xs, ys, los, his = (x_span, [y[0]] * 2, [lo[0]] * 2, [hi[0]] * 2) if len(x) == 1 else (x, y, lo, hi)
            a.add_scatter(x=list(xs) + list(xs)[::-1], y=list(his) + list(los)[::-1], fill="toself", mode="lines",
                          line=dict(width=0), fillcolor="rgba(127,127,127,0.25)", name="random band (min-max)",
                          legendgroup="random", showlegend=col == 1, hoverinfo="skip", row=1, col=col)
            a.add_scatter(x=xs, y=ys, mode="lines", name="random band mean", legendgroup="random", showlegend=col == 1,
                          line=dict(color=COLORS["random"], dash="dot"), row=1, col=col)
        for condition in ("steered", "healed"):
            x, y, lo, hi = _interval(rows, condition, key)
            if x:
                a.add_scatter(x=x, y=y, error_y=_error_y(y, lo, hi), mode="lines+markers", name=condition,
                              legendgroup=condition, showlegend=col == 1, line=dict(color=COLORS[condition]), row=1, col=col)
        x, y, lo, hi = _interval(rows, "base", key)
        if x:
            a.add_scatter(x=x, y=y, error_y=_error_y(y, lo, hi), mode="markers", name="base", legendgroup="base",
                          showlegend=col == 1, marker=dict(symbol="star", size=14, color=COLORS["base"]), row=1, col=col)
        x, y, lo, hi = _interval(rows, "prompted", key)
        if x:  # a control measured once is drawn across every round as a reference line, its CI as a band
            xs, ys, los, his = (x_span, [y[0]] * 2, [lo[0]] * 2, [hi[0]] * 2) if len(x) == 1 else (x, y, lo, hi)
            a.add_scatter(x=xs, y=ys, mode="lines", name="prompted", legendgroup="prompted", showlegend=col == 1,
                          line=dict(color=COLORS["prompted"], dash="dash"), row=1, col=col)
            a.add_scatter(x=list(xs) + list(xs)[::-1], y=list(his) + list(los)[::-1], fill="toself", mode="lines",
                          line=dict(width=0), fillcolor="rgba(31,119,180,0.12)", legendgroup="prompted",
                          showlegend=False, hoverinfo="skip", row=1, col=col)
    a.update_xaxes(title_text="round", dtick=1)
    for col, ylab in enumerate((f"{ax.x_key} (nats)", f"{ax.y_key} (nats)", f"log-odds {ax.pos} vs {ax.neg}"), 1):
        a.update_yaxes(title_text=ylab, row=1, col=col)
    a.update_layout(title="A · on-target score per condition over rounds (bars: 95% bootstrap CI; grey: random-control band)",
                    height=380)

    # B: log-incoherence
    b = go.Figure()
    for condition in ("base", "prompted", "random", "steered", "healed"):
        x, c, lo, hi = _interval(rows, condition, "coherence")
        if x:
            y = [max(1 - v, 1e-6) for v in c]
            b.add_scatter(x=x, y=y, error_y=_error_y(c, lo, hi, flip=True),
                          name="random band (mean, min-max)" if condition == "random" else condition, line=dict(color=COLORS[condition]),
                          mode="lines+markers" if condition in ("steered", "healed") else "markers",
                          marker=dict(symbol="star" if condition == "base" else "circle", size=11 if condition == "base" else 8))
    b.update_yaxes(type="log", title="1 - coherence (log; down = coherent)")
    b.update_xaxes(title="round", dtick=1)
    b.update_layout(title="B · log-incoherence: mass off the 7 answer labels", height=360)

    # C: the axis's map (care vs authority by default)
    xk, yk = ax.x_key, ax.y_key
    c = go.Figure()
    members = [r for r in rows if r["condition"].startswith("random_") and _num(r.get(yk)) and _num(r.get(xk))]
    if members:
        c.add_scatter(x=[r[xk] for r in members], y=[r[yk] for r in members], mode="markers",
                      name="random controls", marker=dict(color=COLORS["random"], size=5, opacity=0.6),
                      text=[f"{r['condition']} r{r['round']}" for r in members], hoverinfo="text+x+y")
    for condition in CONDITION_ORDER:
        pts = [r for r in rows if r["condition"] == condition and _num(r.get(yk)) and _num(r.get(xk))]
        if pts:
            ax_, ay_ = [r[xk] for r in pts], [r[yk] for r in pts]
            err = condition != "random"  # the band row's _lo/_hi are its min/max, drawn by the member points
            c.add_scatter(x=ax_, y=ay_, name="random band mean" if condition == "random" else condition,
                          mode="lines+markers+text" if condition in ("steered", "healed") else "markers+text",
                          text=[f"r{r['round']}" for r in pts], textposition="top center",
                          error_x=_error_y(*_interval(pts, condition, xk)[1:]) if err else None,
                          error_y=_error_y(*_interval(pts, condition, yk)[1:]) if err else None,
                          line=dict(color=COLORS[condition]),
                          marker=dict(color=COLORS[condition], size=13 if condition == "base" else 8,
                                      symbol="star" if condition == "base" else "circle"))
    x_title, y_title = axes_.map_axis_titles(ax)
    c.update_layout(title=f"C · {axes_.map_title(ax)}", height=420, xaxis_title=x_title, yaxis_title=y_title)

    # D: drift
    d = make_subplots(rows=1, cols=2, subplot_titles=("cosine of round r's vector to round 0's",
                                                       "KL(healed || base) per answer token, held-out prompts"))
    evs = load_evals(run_dir)
    cx = [e["round"] for e in evs if _num(e.get("vector_cosine_to_round0"))]
    d.add_scatter(x=cx, y=[e["vector_cosine_to_round0"] for e in evs if _num(e.get("vector_cosine_to_round0"))],
                  mode="lines+markers", name="vector cosine", line=dict(color="#9467bd"), row=1, col=1)
    kx = [e["round"] for e in evs if _num(e.get("kl_to_base"))]
    d.add_scatter(x=kx, y=[e["kl_to_base"] for e in evs if _num(e.get("kl_to_base"))], mode="lines+markers",
                  name="KL to base", line=dict(color=COLORS["healed"]), row=1, col=2)
    d.update_yaxes(range=[-1.05, 1.05], title_text="cosine to round 0", row=1, col=1)
    d.update_yaxes(title_text="KL (nats per token)", row=1, col=2)
    d.update_xaxes(title_text="round", dtick=1)
    d.update_layout(title="D · drift (Q3: does the axis move, how far does the model go?)", height=360)
    return [a, b, c, d]


# ------------------------------------------------------------------ outputs over the loop
def heldout_table(run_dir: Path | str) -> tuple[list[int], list[dict]]:
    """``(rounds, [{"id", "prompt", "answers": {round: text}}])`` from the eval records."""
    evs = [e for e in load_evals(run_dir) if e.get("heldout")]
    table: dict[str, dict] = {}
    for e in evs:
        for h in e["heldout"]:
            t = table.setdefault(h["id"], {"id": h["id"], "prompt": h.get("prompt", ""), "answers": {}})
            t["answers"][e["round"]] = h.get("answer", "")
    return [e["round"] for e in evs], list(table.values())


def heldout_html(run_dir: Path | str, max_chars: int = 400) -> str:
    rounds, items = heldout_table(run_dir)
    if not items:
        return "<p>No held-out answers yet (they come from the healed model after 04_heal).</p>"
    head = "".join(f"<th>round {r}</th>" for r in rounds)
    body = []
    for it in items:
        cells = []
        for r in rounds:
            ans = it["answers"].get(r)
            txt = "" if ans is None else ans if len(ans) <= max_chars else ans[:max_chars] + "…"
            cells.append(f"<td><q>{html.escape(txt)}</q></td>" if ans is not None else "<td></td>")
        body.append(f"<tr><th title='{html.escape(it['id'])}'>{html.escape(it['prompt'])}</th>{''.join(cells)}</tr>")
    return f"<table class='heldout'><tr><th>held-out prompt</th>{head}</tr>{''.join(body)}</table>"


# ------------------------------------------------------------------ the report
def _metrics_html(rows: list[dict], ax: "axes_.Axis" = axes_.DEFAULT) -> str:
    cols = ("round", "condition", ax.x_key, ax.y_key, "coherence", "axis_logodds", "agreement", "kl_to_base", "dose",
            "tag_kl", "n_kept")
    head = "".join(f"<th>{c}</th>" for c in cols)

    def fmt(r, c):
        v = r.get(c)
        if v is None:
            return ""
        if not isinstance(v, float):
            return html.escape(str(v))
        lo, hi = r.get(f"{c}_lo"), r.get(f"{c}_hi")
        rng = f" <small>[{lo:.3g}, {hi:.3g}]</small>" if _num(lo) and _num(hi) else ""
        return f"{v:.4g}{rng}"
    body = "".join("<tr" + (" class='stop'" if r.get("kl_matched") == 0 else "") + ">"
                   + "".join(f"<td>{fmt(r, c)}</td>" for c in cols) + "</tr>" for r in rows)
    return (f"<p>[lo, hi]: 95% paired-bootstrap interval over vignettes / probe items; on the <code>random</code> "
            f"row: min and max over the control band. Red rows: a control whose KL missed the persona's.</p>"
            f"<table><tr>{head}</tr>{body}</table>")


def _band_cells(metric: str, p: dict) -> str:
    z = "" if p.get("z") is None else f"{p['z']:+.2f}"
    return (f"<tr><td>{metric}</td><td>{p['value']:.4g}</td><td>{p['mean']:.4g}</td><td>{p['min']:.4g}</td>"
            f"<td>{p['max']:.4g}</td><td>{z}</td><td>{p['rank']:.2f}</td></tr>")


def _band_html(run_dir: Path) -> str:
    """Per round with a control band: the matched doses and KLs, and where the persona falls in the band."""
    parts = []
    for ev in load_evals(run_dir):
        band = ev.get("control_band")
        if not band:
            continue
        kl = band.get("persona_tag_kl")
        head = (f"<p>round {ev['round']}: persona dose {band.get('persona_dose') or 0:.4g}, tag KL "
                f"{kl if kl is not None else float('nan'):.4g}; {len(band['members'])} controls, doses "
                + ", ".join(f"{m['dose']:.4g} (KL {m['tag_kl']:.3g})" for m in band["members"] if _num(m.get("dose"))
                            and _num(m.get("tag_kl"))) + "</p>")
        if band.get("unmatched"):
            head += (f"<p class='stop'><b>Not matched in effect:</b> {html.escape(', '.join(band['unmatched']))} "
                     "(their KL at the dose bound stayed off the persona's; see the notes)</p>")
        cells = "".join(_band_cells(m, p) for m, p in (band.get("position") or {}).items() if p.get("mean") is not None)
        parts.append(head + "<table><tr><th>metric</th><th>steered</th><th>band mean</th><th>min</th><th>max</th>"
                     f"<th>z</th><th>rank (fraction below)</th></tr>{cells}</table>")
    return "".join(parts) or "<p>No random-control band in these rounds.</p>"


# ------------------------------------------------------------------ more of the run (report only)
def _round_json(run_dir: Path, rnd: int, name: str) -> dict:
    p = contract.path(run_dir, rnd, name)
    try:
        return read_json(p, name) if p.exists() else {}
    except Exception:  # a damaged side record must not cost the report: its panel is just empty
        return {}


def _heal_steps(run_dir: Path, rnd: int) -> list[dict]:
    p = contract.path(run_dir, rnd, "heal_steps")
    if not p.exists():
        return []
    out = []
    for r in csv.DictReader(p.open()):
        out.append({k: float(v) if v not in ("", None) and k != "epoch" else v for k, v in r.items()})
    return out


def _rounds(run_dir: Path) -> list[int]:
    return [ev["round"] for ev in load_evals(run_dir)]


def foundations_figure(rows: list[dict]):
    """E: the seven foundations (ln profile score) per condition over rounds, with 95% CIs."""
    from plotly.subplots import make_subplots

    f = make_subplots(rows=2, cols=4, subplot_titles=list(NATS), horizontal_spacing=0.07, vertical_spacing=0.24)
    for i, key in enumerate(NATS):
        r_, c_ = divmod(i, 4)
        for condition in ("base", "prompted", "steered", "healed"):
            x, y, lo, hi = _interval(rows, condition, key)
            if x:
                f.add_scatter(x=x, y=y, error_y=_error_y(y, lo, hi), name=condition, legendgroup=condition, showlegend=i == 0,
                              mode="markers" if condition in ("base", "prompted") else "lines+markers",
                              marker=dict(color=COLORS[condition], symbol="star" if condition == "base" else "circle",
                                          size=12 if condition == "base" else 7),
                              line=dict(color=COLORS[condition]), row=r_ + 1, col=c_ + 1)
        f.update_yaxes(title_text="nats", row=r_ + 1, col=c_ + 1)
        f.update_xaxes(title_text="round", dtick=1, row=r_ + 1, col=c_ + 1)
    f.update_layout(title="E · all seven foundations: ln profile score per condition (bars: 95% bootstrap CI)", height=620)
    return f


def loop_figures(run_dir: Path | str) -> list:
    """F: heal loss per step (each round a line), G: the dose path (every dose-search call and the
    chosen dose with its 90% interval), H: the filter's verdicts per round (stacked counts)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    run_dir = Path(run_dir)
    rounds = _rounds(run_dir)
    heal = make_subplots(rows=1, cols=2, subplot_titles=("completion NLL", "barrier statistic D (dashed: tau)"))
    for k, r in enumerate(rounds):
        st = _heal_steps(run_dir, r)
        if not st:
            continue
        x, color = [s.get("step") for s in st], ROUND_COLORS[k % len(ROUND_COLORS)]  # one colour per round, both panels
        heal.add_scatter(x=x, y=[s.get("nll") for s in st], mode="lines+markers", name=f"round {r:02d}",
                         legendgroup=str(r), line=dict(color=color), row=1, col=1)
        heal.add_scatter(x=x, y=[s.get("D") for s in st], mode="lines+markers", name=f"round {r:02d}",
                         legendgroup=str(r), showlegend=False, line=dict(color=color), row=1, col=2)
        taus = [s.get("tau") for s in st if _num(s.get("tau"))]
        if taus:
            heal.add_scatter(x=[x[0], x[-1]], y=[taus[-1]] * 2, mode="lines", line=dict(dash="dash", width=1, color=color),
                             legendgroup=str(r), showlegend=False, name=f"tau r{r:02d}", row=1, col=2)
    heal.update_xaxes(title_text="heal step")
    heal.update_yaxes(title_text="NLL (nats per token)", row=1, col=1)
    heal.update_yaxes(title_text="D", row=1, col=2)
    heal.update_layout(title="F · heal: loss per step, each round", height=340)

    dose = go.Figure()
    chosen = []
    for r in rounds:
        g = _generate_record(run_dir, r)
        path = [p for p in g.get("calibration_path") or [] if _num(p.get("dose")) and p["dose"] > 0]
        if path:
            dose.add_scatter(x=[r + (i - len(path) / 2) * 0.04 for i in range(len(path))], y=[p["dose"] for p in path],
                             mode="markers", marker=dict(size=6, color="#aaa"), name="dose tried (search)",
                             legendgroup="tried", showlegend=not chosen,
                             text=[f"call {p.get('step')} ({p.get('phase')}): kept {p.get('kept')}/{p.get('n')}" for p in path],
                             hoverinfo="text+y")
        if _num(g.get("dose")):
            ci = (g.get("calibration") or {}).get("crossing_ci") or [g["dose"], g["dose"]]
            chosen.append((r, g["dose"], ci, g.get("dose_flag") or ""))
    if chosen:
        dose.add_scatter(x=[c[0] for c in chosen], y=[c[1] for c in chosen], mode="lines+markers", name="chosen dose",
                         marker=dict(size=10, color=COLORS["steered"]), line=dict(color=COLORS["steered"]),
                         error_y=_error_y([c[1] for c in chosen], [min(c[2]) for c in chosen], [max(c[2]) for c in chosen]),
                         text=[c[3] for c in chosen], hoverinfo="text+y")
    dose.update_yaxes(type="log", title="dose (x median residual norm)")
    dose.update_xaxes(title="round", dtick=1)
    dose.update_layout(title="G · dose path: doses the search tried (grey) and the chosen dose (bars: its 90% interval)",
                       height=340)

    drops = go.Figure()
    counts = {r: (_round_json(run_dir, r, "filter_summary").get("reasons") or {}) for r in rounds}
    reasons = sorted({k for c in counts.values() for k in c}, key=lambda k: (k != "keep", k))
    for k in reasons:
        drops.add_bar(x=[f"round {r:02d}" for r in rounds], y=[counts[r].get(k, 0) for r in rounds], name=k,
                      marker_color=COLORS["healed"] if k == "keep" else None)
    drops.update_layout(barmode="stack", height=340, title="H · filter verdicts per round (keep and each drop reason)",
                        xaxis_title="round", yaxis_title="completions")
    return [heal, dose, drops]


def stage_times_html(run_dir: Path | str) -> str:
    """Wall time per stage and round, from the step records (seconds the driver measured)."""
    run_dir = Path(run_dir)
    rounds = _rounds(run_dir)
    cells, total = [], 0.0
    # the steps this run ran (01-05, or 01, 06_online and 05 with loop=online)
    steps = [st for st in contract.STEPS if any(contract.marker_path(run_dir, r, st).exists() for r in rounds)]
    for r in rounds:
        secs = []
        for st in steps:
            try:
                v = json.loads(contract.marker_path(run_dir, r, st).read_text()).get("seconds")
            except (OSError, ValueError):
                v = None
            secs.append(v if _num(v) else None)
        total += sum(v for v in secs if v)
        cells.append(f"<tr><th>round {r:02d}</th>" + "".join(f"<td>{_mmss(v)}</td>" for v in secs)
                     + f"<td><b>{_mmss(sum(v for v in secs if v))}</b></td></tr>")
    if not cells:
        return "<p>No timed steps.</p>"
    head = "".join(f"<th>{html.escape(st)}</th>" for st in steps)
    return (f"<table><tr><th></th>{head}<th>round total</th></tr>{''.join(cells)}</table>"
            f"<p>Total {_mmss(total)} of stage time (notebook execution, kernel start included).</p>")


def _mmss(v) -> str:
    if not _num(v):
        return ""
    m, sec = divmod(int(round(v)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def notebook_links_html(run_dir: Path | str, out_dir: Path | str) -> str:
    """Links to each round's executed notebooks (the lab journal), relative to the report's folder."""
    import os

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    items = []
    for r in _rounds(run_dir):
        links = []
        for st in contract.STEPS:  # the steps of either loop that ran
            nb = contract.journal_path(run_dir, r, st)
            if nb.exists():
                rel = os.path.relpath(nb.resolve(), out_dir.resolve())
                links.append(f"<a href='{html.escape(rel)}'>{html.escape(st)}</a>")
        if links:
            items.append(f"<li>round {r:02d}: {' · '.join(links)}</li>")
    return (f"<ul>{''.join(items)}</ul><p><small>Executed notebooks: each figure has a static copy, so GitHub, nbviewer "
            "and <code>jupyter nbconvert --to html</code> show them without a kernel.</small></p>") if items \
        else "<p>No executed notebooks.</p>"


def side_by_side_html(run_dir: Path | str, max_chars: int = 300) -> str:
    """Per round: a steered completion (what heal trained on) next to the healed model's own greedy
    and sampled answers to the same prompt, unsteered (04's Q1 record)."""
    run_dir = Path(run_dir)
    parts = []
    for r in _rounds(run_dir):
        sets = _round_json(run_dir, r, "heal_q1").get("sets") or {}
        cols = [k for k in ("steered", "healed_greedy", "healed_sampled") if sets.get(k, {}).get("examples")]
        if "steered" not in cols or len(cols) < 2:
            continue
        prompts = _q1_prompts(run_dir, r, sets["steered"]["examples"])
        n = min(len(sets[k]["examples"]) for k in cols)
        rows = []
        for i in range(n):
            cells = "".join(f"<td><q>{html.escape(_clip_text(sets[k]['examples'][i], max_chars))}</q></td>" for k in cols)
            rows.append(f"<tr><th>{html.escape(prompts[i] if i < len(prompts) else '')}</th>{cells}</tr>")
        head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in cols)
        parts.append(f"<h3>round {r:02d}</h3><table class='heldout'><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(parts) or "<p>No Q1 record yet (04_heal writes it).</p>"


def _clip_text(t: str, n: int) -> str:
    return t if len(t) <= n else t[:n] + "…"


def _q1_prompts(run_dir: Path, rnd: int, examples: list[str]) -> list[str]:
    """The prompt of each steered Q1 example: the kept completion it was cut from (Q1 stores the text)."""
    p = contract.path(run_dir, rnd, "completions")
    if not p.exists():
        return []
    rows = [r for r in read_jsonl(p, "completions") if r.get("keep")]
    out = []
    for ex in examples:
        hit = next((r for r in rows if (r.get("completion") or "")[:len(ex)] == ex), None)
        out.append(hit.get("prompt", "") if hit else "")
    return out


def headline_lines(run_dir: Path | str) -> list[str]:
    """The last evaluated round's headline numbers with their 95% intervals, one line per condition
    (steered, healed): value [lo, hi] and the paired change from base."""
    rows = metric_rows(run_dir)
    if not rows:
        return []
    last = max(r["round"] for r in rows)
    ax = run_axis(run_dir)
    out = [f"round {last:02d} (the last evaluated): value [95% CI], change from base [95% CI]"]
    if not ax.is_default:
        out[0] += f"; axis {ax.name}: axis_logodds = log p({ax.pos}) - log p({ax.neg}) on {ax.probe or 'the shipped probe'}"
    for r in rows:
        if r["round"] != last or r["condition"] not in ("base", "steered", "healed"):
            continue
        for m in ax.headline:
            if not _num(r.get(m)):
                continue
            d = f"Δ {_ci_text(r, f'delta_{m}', signed=True)}" if _num(r.get(f"delta_{m}")) else ""
            out.append(f"  {r['condition']:<8}{m:<14}{_ci_text(r, m):<36}{d}".rstrip())
    return out


def _ci_text(r: dict, m: str, signed: bool = False) -> str:
    f = "{:+.3g}" if signed else "{:.3g}"
    v, lo, hi = r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")
    s = f.format(v)
    return s + (f" [{f.format(lo)}, {f.format(hi)}]" if _num(lo) and _num(hi) else "")


def run_name(run_dir: Path | str) -> str:
    """The run's name: its folder's name (an absolute path says where it was, not what it is)."""
    return Path(run_dir).resolve().name


def write_report(run_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """Write ``report.html`` (opens offline: plotly.js embedded once) and ``trajectory.png`` into
    ``out_dir`` (default: the run folder; another folder re-plots a read-only run)."""
    import plotly.io as pio

    run_dir = Path(run_dir)
    out_dir = run_dir if out_dir is None else Path(out_dir)
    rows = metric_rows(run_dir)
    figs = [*figures(run_dir), foundations_figure(rows), *loop_figures(run_dir)]
    # plotly.js is embedded once, with the first figure; the others reuse it (the file opens offline).
    # Each figure carries its own title: no heading repeats it.
    parts = [pio.to_html(f, include_plotlyjs=(i == 0), full_html=False, config={"displaylogo": False})
             for i, f in enumerate(figs)]
    cfg_path = contract.run_path(run_dir, "config")
    cfg_text = cfg_path.read_text() if cfg_path.exists() else "(no config.yaml)"
    evs = load_evals(run_dir)
    stops = [f"round {e['round']}: {e['stop'].get('reason')}" for e in evs if e.get("stop")]
    notes = [f"round {e['round']}: {n}" for e in evs for n in e.get("notes", [])]
    stop_html = ("<p class='stop'><b>The loop stopped.</b> " + "; ".join(html.escape(s) for s in stops) + "</p>") if stops \
        else "<p>No stop condition was hit.</p>"
    stop_html += "".join(f"<p class='stop'><b>Dose flagged.</b> {html.escape(w)}</p>" for w in dose_warnings(run_dir))
    name = run_name(run_dir)
    heads = headline_lines(run_dir)
    ax = run_axis(run_dir)
    head_html = f"<pre class='headline'>{html.escape(chr(10).join(heads))}</pre>" if heads else ""
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>steerheal: {html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}} .heldout td{{max-width:320px}}
.stop{{color:#b00}} pre{{background:#f6f6f6;padding:8px;font-size:12px;max-height:400px;overflow:auto}}
pre.headline{{font-size:13px}}</style></head>
<body><h1>steerheal run <code>{html.escape(name)}</code></h1>
<p><small>{len(evs)} evaluated round(s). Figures are interactive (hover, zoom); the static summary is
trajectory.png next to this file.</small></p>
<p>Axis: <b>{html.escape(ax.name)}</b> (probe log-odds {html.escape(ax.pos)} vs {html.escape(ax.neg)}; map
{html.escape(ax.map_y)} vs {html.escape(ax.map_x)}).</p>
{head_html}
{stop_html}
<h2>Trajectory</h2>{''.join(parts)}
<h2>Metrics</h2>{_metrics_html(rows, ax)}
<h2>Steering mode</h2>{report_modes.modes_html(run_dir, _rounds(run_dir))}
<h2>Control band</h2><p>Random rotations of the persona vector (same per-layer norms and cross-layer cosines),
each at the dose where its next-token KL at the assistant tag matches the persona's. The persona's effect is
specific to its direction only where it lies outside this band.</p>{_band_html(run_dir)}
<h2>Steered vs healed</h2><p>What heal trained on (a kept steered completion) next to what the healed model
says to the same prompt on its own, unsteered (04's Q1: greedy and sampled).</p>{side_by_side_html(run_dir)}
<h2>Outputs over the loop</h2><p>The healed model's greedy answer to each held-out prompt, per round
(round 0 before heal shows the base).</p>{heldout_html(run_dir)}
<h2>Wall time per stage</h2>{stage_times_html(run_dir)}
<h2>Lab journal</h2>{notebook_links_html(run_dir, out_dir)}
<h2>Notes</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes) or '<li>none</li>'}</ul>
<h2>Config</h2><pre>{html.escape(cfg_text)}</pre>
</body></html>
"""
    path = out_dir / contract.run_path(run_dir, "report").name
    atomic_write_text(path, doc)
    write_png(run_dir, rows, out_dir=out_dir)
    return path


def write_png(run_dir: Path | str, rows: list[dict] | None = None, out_dir: Path | str | None = None) -> Path:
    """``trajectory.png``: panels A (three), B, C and D as a static matplotlib figure, 2 x 3 panels,
    1650 x 1000 px (no browser needed, unlike plotly's export)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    rows = metric_rows(run_dir) if rows is None else rows
    axis = run_axis(run_dir)
    xk, yk = axis.x_key, axis.y_key
    fig, grid = plt.subplots(2, 3, figsize=(16.5, 10))
    axes = grid.ravel()
    for ax, key in zip(axes[:3], (xk, yk, "axis_logodds")):
        for condition in CONDITION_ORDER:
            x, y, lo, hi = _interval(rows, condition, key)
            if not x:
                continue
            if condition == "random":  # the band: min..max over the controls (not a CI), dotted: its mean
                if len(x) == 1:
                    ax.axhspan(lo[0], hi[0], color=COLORS[condition], alpha=0.2, lw=0, label="random band (min-max)")
                    ax.axhline(y[0], ls=":", color=COLORS[condition], label="random band mean")
                else:
                    ax.fill_between(x, lo, hi, color=COLORS[condition], alpha=0.2, lw=0, label="random band (min-max)")
                    ax.plot(x, y, ":", color=COLORS[condition], label="random band mean")
                continue
            yerr = [[max(v - a, 0) for v, a in zip(y, lo)], [max(b - v, 0) for v, b in zip(y, hi)]]
            if condition == "base":
                ax.errorbar(x, y, yerr=yerr, fmt="*", ms=14, color=COLORS[condition], label=condition, capsize=3)
            elif condition == "prompted" and len(x) == 1:
                ax.axhline(y[0], ls="--", color=COLORS[condition], label=condition)
                ax.axhspan(lo[0], hi[0], color=COLORS[condition], alpha=0.1, lw=0)
            else:
                ax.errorbar(x, y, yerr=yerr, fmt="o-", color=COLORS[condition], label=condition, capsize=3)
        ax.set_title(f"A: {key} per condition (bars: 95% CI)")
        ax.set_xlabel("round")
        ax.set_ylabel(axes_.metric_label(axis, key))
    if axes[0].get_legend_handles_labels()[0]:  # an empty run folder has nothing to label
        axes[0].legend(fontsize=9)
    ax = axes[3]
    for condition in ("base", "random", "steered", "healed"):
        x, c, lo, hi = _interval(rows, condition, "coherence")
        if x:
            y = [max(1 - v, 1e-6) for v in c]
            yerr = [[max(v - a, 0) for v, a in zip(c, lo)], [max(b - v, 0) for v, b in zip(c, hi)]]  # 1 - c flips the bounds
            ax.errorbar(x, y, yerr=[[max(min(e, v - 1e-6), 0) for e, v in zip(yerr[1], y)], yerr[0]],
                        fmt="*" if condition == "base" else "s:" if condition == "random" else "o-",
                        ms=14 if condition == "base" else 6, mfc="none" if condition == "random" else None, color=COLORS[condition],
                        label="random band (mean, min-max)" if condition == "random" else condition, capsize=3)
    ax.set_yscale("log")
    # readable on any span: 1-2-5 ticks, plain numbers (a tiny run spans less than a decade)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title("B: incoherence (bars: 95% CI)")
    ax.set_xlabel("round")
    ax.set_ylabel("1 - coherence (log; down = coherent)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)
    ax = axes[4]
    for condition in CONDITION_ORDER:
        pts = [r for r in rows if r["condition"] == condition and _num(r.get(yk)) and _num(r.get(xk))]
        if pts:
            ax.plot([r[xk] for r in pts], [r[yk] for r in pts], "*" if condition == "base" else "o-",
                    color=COLORS[condition], label=condition, ms=12 if condition == "base" else 6)
            if condition in ("steered", "healed"):
                for r in pts:
                    ax.annotate(f"r{r['round']}", (r[xk], r[yk]), fontsize=8,
                                xytext=(3, 3), textcoords="offset points")
    members = [r for r in rows if r["condition"].startswith("random_") and _num(r.get(yk)) and _num(r.get(xk))]
    if members:
        ax.plot([r[xk] for r in members], [r[yk] for r in members], ".", color=COLORS["random"],
                alpha=0.6, label="random controls")
    x_title, y_title = axes_.map_axis_titles(axis)
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.set_title(f"C: {axes_.map_title(axis)}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[5]
    healed = [r for r in rows if r["condition"] == "healed" and _num(r.get("kl_to_base"))]
    ax.plot([r["round"] for r in healed], [r["kl_to_base"] for r in healed], "o-", color=COLORS["healed"],
            label="KL(healed || base)")
    ax.set_ylabel("KL per answer token (nats)")
    ax.set_xlabel("round")
    cos = [r for r in rows if r["condition"] == "healed" and _num(r.get("vector_cosine_to_round0"))]
    if cos:
        ax2 = ax.twinx()
        ax2.plot([r["round"] for r in cos], [r["vector_cosine_to_round0"] for r in cos], "s--", color="#9467bd",
                 label="vector cosine to round 0")
        ax2.set_ylabel("cosine of the round's vector to round 0's", color="#9467bd")
        ax2.set_ylim(-1.05, 1.05)
    ax.set_title("D: drift")
    rounds = sorted({r["round"] for r in rows}) or [0]
    for a in (*axes[:4], axes[5]):
        a.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        a.set_xlim(rounds[0] - 0.5, rounds[-1] + 0.5)  # a band spans the rounds, not matplotlib's +-0.05
    fig.suptitle(f"steerheal run {run_name(run_dir)}: {len(rounds)} round(s)", fontsize=14)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out_dir = Path(run_dir) if out_dir is None else Path(out_dir)
    path = out_dir / contract.run_path(run_dir, "trajectory").name
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------ compare runs
def compare_rows(run_dirs: list[Path | str]) -> list[dict]:
    """Per run: the last evaluated round's steered and healed rows (with their deltas from base)."""
    out = []
    for d in run_dirs:
        rows = metric_rows(d)
        if not rows:
            continue
        last = max(r["round"] for r in rows)
        out += [{"run": run_name(d), **r} for r in rows if r["round"] == last and r["condition"] in ("steered", "healed")]
    return out


def compare_figure(run_dirs: list[Path | str]):
    """The headline panels of several runs overlaid: one colour per run, healed solid, steered
    dotted, base a star; bars are 95% CIs."""
    from plotly.subplots import make_subplots

    ax = run_axis(run_dirs[0]) if run_dirs else axes_.DEFAULT  # the runs' axis: its headline metrics
    keys = ("auth_nats", "care_nats", "axis_logodds", "coherence") if ax.is_default else ax.headline
    f = make_subplots(rows=1, cols=4, subplot_titles=keys)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    names = [run_name(d) for d in run_dirs]
    if len(set(names)) < len(names):  # two runs of the same name: the parent folder tells them apart
        names = [f"{Path(d).resolve().parent.name}/{n}" for d, n in zip(run_dirs, names)]
    for k, (d, name) in enumerate(zip(run_dirs, names)):
        rows, color = metric_rows(d), palette[k % len(palette)]
        for col, key in enumerate(keys, 1):
            for condition, dash in (("healed", "solid"), ("steered", "dot"), ("base", None)):
                x, y, lo, hi = _interval(rows, condition, key)
                if not x:
                    continue
                f.add_scatter(x=x, y=y, error_y=_error_y(y, lo, hi), name=f"{name} {condition}", legendgroup=f"{name}{condition}",
                              showlegend=col == 1, mode="markers" if condition == "base" else "lines+markers",
                              line=dict(color=color, dash=dash or "solid"),
                              marker=dict(color=color, symbol="star" if condition == "base" else "circle",
                                          size=12 if condition == "base" else 7), row=1, col=col)
            f.update_yaxes(title_text=axes_.metric_label(ax, key) if key != "coherence" else key, row=1, col=col)
    f.update_xaxes(title_text="round", dtick=1)
    f.update_layout(title="runs overlaid: healed solid, steered dotted, base star (bars: 95% bootstrap CI)", height=420)
    return f


def write_compare(run_dirs: list[Path | str], out_dir: Path | str) -> Path:
    """``out_dir/compare.html``: the overlaid panels and a table of final-round deltas from base with CIs."""
    import plotly.io as pio

    out_dir = Path(out_dir)
    rows = compare_rows(run_dirs)
    head = "".join(f"<th>Δ {m}</th>" for m in HEADLINE)
    body = "".join(f"<tr><td>{html.escape(r['run'])}</td><td>{r['round']:02d}</td><td>{r['condition']}</td>"
                   + "".join(f"<td>{_ci_text(r, f'delta_{m}', signed=True) if _num(r.get(f'delta_{m}')) else ''}</td>"
                             for m in HEADLINE) + "</tr>" for r in rows)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>steerheal compare: {html.escape(', '.join(run_name(d) for d in run_dirs))}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px;text-align:left}}</style></head>
<body><h1>steerheal: {len(run_dirs)} runs compared</h1>
<p>Final evaluated round of each run: change from its own base model, paired over the same vignettes / probe
items, with the 95% bootstrap interval. Runs are comparable only where they share the eval set and protocol
(see each run's config).</p>
<table><tr><th>run</th><th>round</th><th>condition</th>{head}</tr>{body}</table>
{pio.to_html(compare_figure(run_dirs), include_plotlyjs=True, full_html=False, config={"displaylogo": False})}
<h2>Runs</h2><ul>{''.join(f"<li><code>{html.escape(str(Path(d).resolve()))}</code></li>" for d in run_dirs)}</ul>
</body></html>
"""
    path = out_dir / "compare.html"
    atomic_write_text(path, doc)
    return path


def add_compare_cli(p) -> None:
    """``steerheal compare A B ... [--out DIR]``."""
    p.add_argument("run_dirs", nargs="+", help="two or more run folders")
    p.add_argument("--out", default=".", help="folder for compare.html (default: the current folder)")
    p.set_defaults(func=_cli_compare)


def _cli_compare(args) -> int:
    import sys

    dirs = [Path(d) for d in args.run_dirs]
    bad = [str(d) for d in dirs if not d.is_dir() or not load_evals(d)]
    if bad:
        print(f"error: not a run folder with an evaluated round: {', '.join(bad)}", file=sys.stderr)
        return 1
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = write_compare(dirs, args.out)
    for r in compare_rows(dirs):
        print(f"{r['run']} round {r['round']:02d} {r['condition']}: " + "; ".join(
            f"Δ{m} {_ci_text(r, f'delta_{m}', signed=True)}" for m in HEADLINE if _num(r.get(f"delta_{m}"))),
            file=sys.stderr)
    print(json.dumps({"compare": str(path)}))
    return 0


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal report DIR [--out OUT]``: rebuild metrics.csv, report.html and trajectory.png."""
    p.add_argument("run_dir", help="a run folder (with round_NN/eval.json files)")
    p.add_argument("--out", default=None, help="write the three files into this folder instead of the run folder "
                   "(for a read-only or shared run)")
    p.set_defaults(func=_cli_report)


def _cli_report(args) -> int:
    import sys

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: {run_dir} is not a folder", file=sys.stderr)
        return 1
    if not load_evals(run_dir):
        print(f"error: {run_dir} has no round_NN/eval.json yet: run 05_eval first", file=sys.stderr)
        return 1
    out = Path(args.out) if getattr(args, "out", None) else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    metrics = write_metrics(run_dir, out)
    path = write_report(run_dir, out)
    for line in headline_lines(run_dir):
        print(line, file=sys.stderr)
    print(json.dumps({"report": str(path), "metrics": str(metrics),
                      "png": str(path.parent / contract.run_path(run_dir, "trajectory").name)}))
    return 0
