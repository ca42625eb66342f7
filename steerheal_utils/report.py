"""The run report: ``metrics.csv``, ``report.html`` (self-contained) and ``trajectory.png``.

Everything is rebuilt from the ``round_*/eval.json`` files, so the report of a crashed or
resumed run is always consistent with what the rounds wrote. Panels:

- A: on-target scores per stage over rounds (auth_nats, care_nats, axis probe): base as a
  star, steered red, healed green, the prompted and random controls as references;
- B: log-incoherence ``1 - coherence`` on a log axis (down = coherent), steered vs healed;
- C: the care-vs-authority map of the trajectory;
- D: drift: cosine of each round's vector to round 0's, KL of the healed model to base;

then the outputs-over-loop table (the healed model's greedy answer to each held-out prompt,
per round) and the config. ``steerheal report DIR`` writes them for any run folder.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from . import contract
from .markers import rounds_that_hold
from .runfolder import atomic_write_bytes, atomic_write_text, read_json, read_jsonl

NATS = ("care_nats", "fairness_nats", "loyalty_nats", "auth_nats", "sanctity_nats", "liberty_nats", "social_nats")
COLUMNS = ("round", "stage", "care_nats", "auth_nats", "coherence", "axis_logodds", *NATS[1:3], *NATS[4:],
           "on_diag_authority", "on_diag_care", "agreement", "axis_care_rate", "axis_mass", "kl_to_base",
           "vector_cosine_to_round0", "dose", "n_generated", "n_kept", "n_rows", "seconds", "stop_reason")
COLORS = {"base": "black", "steered": "#d62728", "healed": "#2ca02c", "prompted": "#1f77b4", "random": "#7f7f7f"}
STAGE_ORDER = ("base", "prompted", "random", "steered", "healed")


# ------------------------------------------------------------------ reading the run
def load_evals(run_dir: Path | str) -> list[dict]:
    """``round_NN/eval.json`` of every round whose step records hold, in round order."""
    out = []
    for rnd in rounds_that_hold(run_dir):  # a round whose records do not hold is left out (`run` says why)
        ev = read_json(contract.path(run_dir, rnd, "eval"), "eval record")
        ev.setdefault("round", rnd)
        out.append(ev)
    return out


def _kept_counts(run_dir: Path, rnd: int) -> tuple[int | None, int | None]:
    p = contract.path(run_dir, rnd, "completions")
    if not p.exists():
        return None, None
    rows = read_jsonl(p, "completions")
    return len(rows), sum(1 for r in rows if r.get("keep"))


def metric_rows(run_dir: Path | str) -> list[dict]:
    """One dict per (round, stage) with the :data:`COLUMNS` (missing values are None)."""
    run_dir = Path(run_dir)
    rows = []
    for ev in load_evals(run_dir):
        n_gen, n_kept = _kept_counts(run_dir, ev["round"])
        stages = ev.get("stages", {})
        for name in sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
            s = stages[name]
            row = {c: s.get(c) for c in COLUMNS}
            row.update(round=ev["round"], stage=name, n_generated=n_gen, n_kept=n_kept,
                       vector_cosine_to_round0=ev.get("vector_cosine_to_round0"),
                       kl_to_base=s.get("kl_to_base", ev.get("kl_to_base") if name == "healed" else None),
                       stop_reason=(ev.get("stop") or {}).get("reason") if name == "healed" else None)
            rows.append(row)
    return rows


def write_metrics(run_dir: Path | str) -> Path:
    """Rebuild ``DIR/metrics.csv`` from every round's eval.json (atomically); return its path."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in metric_rows(run_dir):
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()})
    path = contract.run_path(run_dir, "metrics")
    atomic_write_text(path, buf.getvalue())
    return path


# ------------------------------------------------------------------ figures (plotly)
def _series(rows: list[dict], stage: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r["stage"] == stage and _num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def figures(run_dir: Path | str) -> list:
    """Plotly figures A-D for the rounds so far (used by the report and the 05 notebook)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = metric_rows(run_dir)
    rounds = sorted({r["round"] for r in rows}) or [0]
    x_span = [min(rounds) - 0.3, max(rounds) + 0.3]

    # A: on-target scores
    keys = (("auth_nats", "auth_nats (down = less authority)"), ("care_nats", "care_nats (up = more care)"),
            ("axis_logodds", "axis probe log-odds care vs authority"))
    a = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, 1):
        for stage in ("steered", "healed"):
            x, y = _series(rows, stage, key)
            if x:
                a.add_scatter(x=x, y=y, mode="lines+markers", name=stage, legendgroup=stage, showlegend=col == 1,
                              line=dict(color=COLORS[stage]), row=1, col=col)
        x, y = _series(rows, "base", key)
        if x:
            a.add_scatter(x=x, y=y, mode="markers", name="base", legendgroup="base", showlegend=col == 1,
                          marker=dict(symbol="star", size=14, color=COLORS["base"]), row=1, col=col)
        for stage, dash in (("prompted", "dash"), ("random", "dot")):
            x, y = _series(rows, stage, key)
            if x:  # a control measured once is drawn across every round as a reference line
                xs, ys = (x_span, [y[0]] * 2) if len(x) == 1 else (x, y)
                a.add_scatter(x=xs, y=ys, mode="lines", name=stage, legendgroup=stage, showlegend=col == 1,
                              line=dict(color=COLORS[stage], dash=dash), row=1, col=col)
    a.update_xaxes(title_text="round", dtick=1)
    a.update_layout(title="A · on-target score per stage over rounds", height=380)

    # B: log-incoherence
    b = go.Figure()
    for stage in ("base", "prompted", "random", "steered", "healed"):
        x, c = _series(rows, stage, "coherence")
        if x:
            b.add_scatter(x=x, y=[max(1 - v, 1e-6) for v in c], name=stage, line=dict(color=COLORS[stage]),
                          mode="lines+markers" if stage in ("steered", "healed") else "markers",
                          marker=dict(symbol="star" if stage == "base" else "circle", size=11 if stage == "base" else 8))
    b.update_yaxes(type="log", title="1 - coherence (log; down = coherent)")
    b.update_xaxes(title="round", dtick=1)
    b.update_layout(title="B · log-incoherence: mass off the 7 answer labels", height=360)

    # C: care vs authority map
    c = go.Figure()
    for stage in STAGE_ORDER:
        pts = [r for r in rows if r["stage"] == stage and _num(r.get("care_nats")) and _num(r.get("auth_nats"))]
        if pts:
            c.add_scatter(x=[r["auth_nats"] for r in pts], y=[r["care_nats"] for r in pts], name=stage,
                          mode="lines+markers+text" if stage in ("steered", "healed") else "markers+text",
                          text=[f"r{r['round']}" for r in pts], textposition="top center",
                          line=dict(color=COLORS[stage]),
                          marker=dict(color=COLORS[stage], size=13 if stage == "base" else 8,
                                      symbol="star" if stage == "base" else "circle"))
    c.update_layout(title="C · care vs authority (goal: up and to the left)", height=420,
                    xaxis_title="auth_nats = ln profile[Authority]", yaxis_title="care_nats = ln profile[Care]")

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
    d.update_yaxes(range=[-1.05, 1.05], row=1, col=1)
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
def _metrics_html(rows: list[dict]) -> str:
    cols = ("round", "stage", "auth_nats", "care_nats", "coherence", "axis_logodds", "agreement", "kl_to_base", "dose", "n_kept")
    head = "".join(f"<th>{c}</th>" for c in cols)
    def fmt(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: Path | str) -> Path:
    """Write ``DIR/report.html`` (opens offline: plotly.js embedded once) and ``DIR/trajectory.png``."""
    import plotly.io as pio

    run_dir = Path(run_dir)
    figs = figures(run_dir)
    # plotly.js is embedded once, with the first figure; the others reuse it (the file opens offline)
    parts = [f"<h3>{html.escape(f.layout.title.text or '')}</h3>" + pio.to_html(f, include_plotlyjs=(i == 0), full_html=False)
             for i, f in enumerate(figs)]
    rows = metric_rows(run_dir)
    cfg_path = contract.run_path(run_dir, "config")
    cfg_text = cfg_path.read_text() if cfg_path.exists() else "(no config.yaml)"
    stops = [f"round {e['round']}: {e['stop'].get('reason')}" for e in load_evals(run_dir) if e.get("stop")]
    notes = [f"round {e['round']}: {n}" for e in load_evals(run_dir) for n in e.get("notes", [])]
    stop_html = ("<p class='stop'><b>The loop stopped.</b> " + "; ".join(html.escape(s) for s in stops) + "</p>") if stops \
        else "<p>No stop condition was hit.</p>"
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>steerheal report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}} .heldout td{{max-width:320px}}
.stop{{color:#b00}} pre{{background:#f6f6f6;padding:8px;font-size:12px;max-height:400px;overflow:auto}}</style></head>
<body><h1>steerheal run: {html.escape(str(run_dir))}</h1>
{stop_html}
<h2>Metrics</h2>{_metrics_html(rows)}
<h2>Trajectory</h2>{''.join(parts)}
<h2>Outputs over the loop</h2><p>The healed model's greedy answer to each held-out prompt, per round
(round 0 before heal shows the base).</p>{heldout_html(run_dir)}
<h2>Notes</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes) or '<li>none</li>'}</ul>
<h2>Config</h2><pre>{html.escape(cfg_text)}</pre>
</body></html>
"""
    path = contract.run_path(run_dir, "report")
    atomic_write_text(path, doc)
    write_png(run_dir, rows)
    return path


def write_png(run_dir: Path | str, rows: list[dict] | None = None) -> Path:
    """``trajectory.png``: panels A-C as a static matplotlib figure (no browser needed, unlike plotly's export)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = metric_rows(run_dir) if rows is None else rows
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    for ax, key in zip(axes[:3], ("auth_nats", "care_nats", "axis_logodds")):
        for stage in STAGE_ORDER:
            x, y = _series(rows, stage, key)
            if not x:
                continue
            if stage == "base":
                ax.plot(x, y, "*", ms=14, color=COLORS[stage], label=stage)
            elif stage in ("prompted", "random") and len(x) == 1:
                ax.axhline(y[0], ls="--" if stage == "prompted" else ":", color=COLORS[stage], label=stage)
            else:
                ax.plot(x, y, "o-", color=COLORS[stage], label=stage)
        ax.set_title(f"A: {key}")
        ax.set_xlabel("round")
    if axes[0].get_legend_handles_labels()[0]:  # an empty run folder has nothing to label
        axes[0].legend(fontsize=8)
    ax = axes[3]
    for stage in ("steered", "healed"):
        x, c = _series(rows, stage, "coherence")
        if x:
            ax.plot(x, [max(1 - v, 1e-6) for v in c], "o-", color=COLORS[stage], label=stage)
    ax.set_yscale("log")
    ax.set_title("B: 1 - coherence (down = coherent)")
    ax.set_xlabel("round")
    ax = axes[4]
    for stage in STAGE_ORDER:
        pts = [r for r in rows if r["stage"] == stage and _num(r.get("care_nats")) and _num(r.get("auth_nats"))]
        if pts:
            ax.plot([r["auth_nats"] for r in pts], [r["care_nats"] for r in pts], "*" if stage == "base" else "o-",
                    color=COLORS[stage], label=stage, ms=12 if stage == "base" else 6)
    from matplotlib.ticker import MaxNLocator

    for a in axes[:4]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("auth_nats")
    ax.set_ylabel("care_nats")
    ax.set_title("C: care vs authority")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path = contract.run_path(run_dir, "trajectory")
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal report DIR``: rebuild metrics.csv, report.html and trajectory.png."""
    p.add_argument("run_dir", help="a run folder (with round_NN/eval.json files)")
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
    write_metrics(run_dir)
    path = write_report(run_dir)
    print(json.dumps({"report": str(path), "metrics": str(contract.run_path(run_dir, "metrics")),
                      "png": str(contract.run_path(run_dir, "trajectory"))}))
    return 0
