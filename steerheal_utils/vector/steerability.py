"""Steerability: does the persona vector move the trait at all, at which dose, and at what cost?

The maths and figures of the sweep; the command (``python -m steerheal_utils steerability
RUN_OR_CONFIG``, :mod:`steerheal_utils.tools.steerability`) loads the model and writes the files.
It sweeps the dose of round 0's vector on
the base model, before any loop, and at each dose evaluates

- the persona vector, and
- a band of random controls with the loop's geometry (:meth:`SteeringVector.rotated`: one Haar
  rotation for every layer, so per-layer norms and cross-layer cosines are the persona's), each
  at the dose that matches the persona's next-token KL *at that dose*
  (:class:`steerheal_utils.controls.KLMatcher`, on the dilemma pool, as 05's band),

on the vignettes and the axis probe (``axis_logodds``, ``care_nats``, ``auth_nats``,
``coherence``, 05's :func:`evaluate_model`), plus the KL to the unsteered model at the assistant
tag of the *held-out* prompts (never used for matching). Every point carries its paired
bootstrap CI and its delta vs the unsteered base (:func:`evaluate.evidence.add_evidence`: one
resample matrix shared by every point). "Trait per nat" is the axis delta divided by the
held-out KL; its interval is the delta's interval divided by that KL (the KL is measured on
fixed prompts and has no resampling interval here).

The recommended dose (:func:`recommend`) is the largest sweep dose at which the persona's axis
delta leaves the band (its CI's lower end above every control's delta) and coherence stays at
or above ``coh_floor``; the doses that qualify give the recommended range. When none does, the
record says so ("the vector does not leave the null band at any dose"), loudly.

Outputs, in the run folder (``contract.run_path``): ``steerability.json`` (the whole record),
``steerability.csv`` (one row per dose and vector). :func:`figure` is the notebook's plotly
figure, :func:`figure_png` a static copy for docs.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .. import config as C
from .. import contract, controls, datafiles

METRICS = ("axis_logodds", "care_nats", "auth_nats", "coherence")
PERSONA = "persona"
CSV_COLS = ("dose_index", "vector", "dose", "persona_dose", "kl_matched", "tag_kl", "heldout_kl",
            *(f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")),
            *(f"delta_{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")),
            "axis_per_nat", "axis_per_nat_lo", "axis_per_nat_hi")


class SteerabilityError(C.ConfigError):
    """A sweep setting that cannot work (a bad dose range, nothing to sweep)."""


# ------------------------------------------------------------------ pure parts
def dose_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced doses from ``lo`` to ``hi`` (both included), strictly increasing.

    Example:
        >>> [round(d, 3) for d in dose_grid(0.01, 1.0, 3)]
        [0.01, 0.1, 1.0]
    """
    if not (0 < lo < hi and math.isfinite(hi)) or n < 2:
        raise SteerabilityError(f"steerability doses: need 0 < lo < hi and n >= 2, got lo={lo}, hi={hi}, n={n}")
    a, b = math.log(lo), math.log(hi)
    return [lo] + [math.exp(a + (b - a) * k / (n - 1)) for k in range(1, n - 1)] + [hi]


def per_nat(delta: float | None, lo: float | None, hi: float | None, kl: float | None) -> tuple:
    """``(delta, lo, hi) / kl``: the trait moved per nat of KL; None where undefined (KL <= 0 or missing).

    Example:
        >>> per_nat(0.5, 0.1, 0.9, 2.0)
        (0.25, 0.05, 0.45)
    """
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (delta, lo, hi, kl)) or kl <= 0:
        return None, None, None
    return delta / kl, lo / kl, hi / kl


def recommend(table: Sequence[dict], coh_floor: float, metric: str = "axis_logodds") -> dict:
    """The recommended dose and range read off a sweep table (rows as :data:`CSV_COLS`).

    A dose qualifies when the persona's delta of ``metric`` has a CI whose lower end is above the
    largest control delta at that dose (it leaves the band, upward: the persona is the positive
    pole) and its coherence is at least ``coh_floor``. The recommendation is the largest
    qualifying dose (the strongest push that stays coherent and beyond the null); ``breaks_at``
    is the smallest dose whose persona coherence is below the floor.

    Example:
        >>> t = [{"vector": "persona", "dose": d, "delta_axis_logodds": x, "delta_axis_logodds_lo": x - .1,
        ...       "coherence": c} for d, x, c in ((0.1, .05, .9), (0.2, .5, .8), (0.4, .9, .2))]
        >>> t += [{"vector": "random_00", "dose": d, "delta_axis_logodds": 0.1} for d in (0.1, 0.2, 0.4)]
        >>> r = recommend(t, coh_floor=0.5)
        >>> r["dose"], r["range"], r["breaks_at"]
        (0.2, [0.2, 0.2], 0.4)
    """
    persona = sorted((r for r in table if r["vector"] == PERSONA), key=lambda r: r["dose"])
    ok, breaks = [], None
    for r in persona:
        band = [c.get(f"delta_{metric}") for c in table if c["vector"] != PERSONA
                and c.get("dose_index", r.get("dose_index")) == r.get("dose_index")
                and (c.get("persona_dose", r["dose"]) == r["dose"])]
        band = [b for b in band if isinstance(b, (int, float)) and math.isfinite(b)]
        lo = r.get(f"delta_{metric}_lo")
        coh = r.get("coherence")
        coherent = isinstance(coh, (int, float)) and coh >= coh_floor
        if not coherent and breaks is None:
            breaks = r["dose"]
        if coherent and isinstance(lo, (int, float)) and lo > max(band, default=0.0) and lo > 0:
            ok.append(r["dose"])
    if not ok:
        return {"dose": None, "range": None, "breaks_at": breaks, "metric": metric, "coh_floor": coh_floor,
                "reason": (f"NO DOSE: the persona's {metric} delta does not leave the random band (CI above every "
                           f"control and above 0) at any swept dose with coherence >= {coh_floor}: no evidence the "
                           "vector steers the trait on this model")}
    return {"dose": max(ok), "range": [min(ok), max(ok)], "breaks_at": breaks, "metric": metric, "coh_floor": coh_floor,
            "reason": f"largest dose whose {metric} delta CI is above the band and 0 with coherence >= {coh_floor}"}


# ------------------------------------------------------------------ the sweep
def sweep(model, tok, sv, doses: Sequence[float], *, rows: Sequence[dict], probe: Sequence[dict], seed: int,
          n_controls: int, kl_prompts: int = 16, tol: float = 0.1, max_ratio: float = 10.0,
          positions: str = "all", halflife: int = 0, layout: str = "prefix", batch_size: int = 16,
          n_boot: int = 2000, level: float = 0.95, coh_floor: float = 0.0, log=print) -> dict:
    """Evaluate ``sv`` and ``n_controls`` KL-matched rotations of it at every dose; see the module doc.

    Returns ``{"doses", "table" (rows of CSV_COLS), "bands" (per dose: controls.band_summary),
    "recommended" (:func:`recommend`), "base" (the unsteered summary with CIs), "ci_method", "seconds"}``.
    """
    from ..chat import prompt_ids
    from ..evaluate.evidence import add_evidence
    from ..evaluate.model_eval import evaluate_model
    from .steering import Steering

    doses = [float(d) for d in doses]
    if any(b <= a for a, b in zip(doses, doses[1:])) or not doses or doses[0] <= 0:
        raise SteerabilityError(f"steerability doses must be positive and increasing, got {doses}")
    t0 = time.time()
    kw = dict(probe=probe, layout=layout, batch_size=batch_size)
    match_prompts = controls.kl_prompts(tok, kl_prompts)
    held = [prompt_ids(tok, p["text"])[0] for p in datafiles.prompts("heldout")]
    held_ref = controls.tag_logprobs(model, tok, held, batch_size)
    band = [(controls.control_name(i), sv.rotated(s)) for i, s in enumerate(controls.control_seeds(seed, n_controls))]

    conditions: dict[str, dict] = {}
    condition_rows: dict[str, list[dict]] = {}
    info: dict[str, dict] = {}  # condition -> dose_index, vector, dose, kl fields

    def run(name: str, vec, dose: float | None, extra: dict) -> None:
        spec = Steering(vec, dose, positions, halflife) if vec is not None else None
        res = evaluate_model(model, tok, rows, steering=spec, **kw)
        conditions[name], condition_rows[name] = res["summary"], res["rows"]
        hk = controls.tag_kl(model, tok, held, vec, dose, ref=held_ref, positions=positions, halflife=halflife,
                             batch_size=batch_size) if vec is not None else 0.0
        info[name] = {**extra, "dose": dose or 0.0, "heldout_kl": hk}
        s = res["summary"]
        log(f"steerability: {name:>16} dose {dose or 0:.4g}  axis {s.get('axis_logodds', float('nan')):+.3f}  "
            f"care {s['care_nats']:.3f}  auth {s['auth_nats']:.3f}  coh {s['coherence']:.3f}  held-out KL {hk:.3g}")

    run("base", None, None, {"dose_index": -1, "vector": "base"})
    for k, d in enumerate(doses):
        matcher = controls.KLMatcher(model, tok, sv, d, match_prompts, tol=tol, max_ratio=max_ratio,
                                     positions=positions, halflife=halflife, batch_size=batch_size)
        run(f"{PERSONA}@{k}", sv, d, {"dose_index": k, "vector": PERSONA, "persona_dose": d,
                                      "tag_kl": matcher.target, "kl_matched": True})
        for name, vec in band:
            m = matcher.match(vec)
            run(f"{name}@{k}", vec, m["dose"], {"dose_index": k, "vector": name, "persona_dose": d, "tag_kl": m["kl"],
                                                 "kl_matched": m["matched"], "match": controls.match_record(m, vec)})
            conditions[f"{name}@{k}"].update(controls.match_record(m, vec))

    out: dict[str, Any] = {"conditions": conditions, "notes": [], "n_probe": len(probe)}
    add_evidence(out, condition_rows, rows, run_dir=Path("."), seed=seed, n_boot=n_boot, level=level)
    table = []
    for name, s in conditions.items():
        if name == "base":
            continue
        i = info[name]
        row = {c: None for c in CSV_COLS}
        row.update({k: i.get(k) for k in ("dose_index", "vector", "dose", "persona_dose", "kl_matched", "tag_kl",
                                          "heldout_kl")})
        for m in METRICS:
            row[m] = s.get(m)
            row[f"{m}_lo"], row[f"{m}_hi"] = (s.get("ci") or {}).get(m, (None, None))
            dv = (s.get("delta_vs_base") or {}).get(m) or {}
            row[f"delta_{m}"], row[f"delta_{m}_lo"], row[f"delta_{m}_hi"] = dv.get("delta"), dv.get("lo"), dv.get("hi")
        row["axis_per_nat"], row["axis_per_nat_lo"], row["axis_per_nat_hi"] = per_nat(
            row["delta_axis_logodds"], row["delta_axis_logodds_lo"], row["delta_axis_logodds_hi"], row["heldout_kl"])
        table.append(row)
    bands = []
    for k, d in enumerate(doses):
        members = {n: conditions[f"{n}@{k}"] for n, _ in band}
        bands.append({"dose_index": k, "dose": d, **controls.band_summary(conditions[f"{PERSONA}@{k}"], members, conditions["base"])})
    unmatched = [f"{n}@{b['dose']:.4g}" for b in bands for n in b["unmatched"]]
    notes = out["notes"] + ([f"WARNING: controls NOT KL-matched to the persona: {', '.join(unmatched)}"] if unmatched else [])
    return {"doses": doses, "table": table, "bands": bands, "recommended": recommend(table, coh_floor),
            "base": {m: conditions["base"].get(m) for m in METRICS} | {"ci": conditions["base"].get("ci")},
            "n_vignettes": len(rows), "n_probe": len(probe), "n_controls": n_controls, "heldout_prompts": len(held),
            "ci_method": out.get("ci_method"), "notes": notes, "seconds": round(time.time() - t0, 1)}


def table_csv(table: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    return buf.getvalue()


def load(run_dir: Path | str) -> dict | None:
    """A run folder's ``steerability.json``, or None when the sweep has not run there."""
    from ..runfolder import read_json

    p = contract.run_path(run_dir, "steerability")
    return read_json(p, "steerability sweep") if p.exists() else None


# ------------------------------------------------------------------ figures
def _series(rec: dict, vector: str, key: str) -> tuple[list, list, list, list]:
    rows = sorted((r for r in rec["table"] if r["vector"] == vector), key=lambda r: r["dose_index"])
    return ([r["persona_dose"] for r in rows], [r.get(key) for r in rows], [r.get(f"{key}_lo") for r in rows],
            [r.get(f"{key}_hi") for r in rows])


PANELS = (("delta_axis_logodds", "axis probe log-odds - base (up = persona)"),
          ("delta_care_nats", "care_nats - base"), ("delta_auth_nats", "auth_nats - base"),
          ("coherence", "coherence"), ("heldout_kl", "KL to unsteered, held-out prompts (nats)"),
          ("axis_per_nat", "axis delta per nat of held-out KL"))


def figure(rec: dict):
    """Plotly: per panel, the persona curve with its 95% CI over the random band (each control's
    curve, thin grey; x = the persona's dose, the controls at their KL-matched doses); the
    recommended dose as a vertical line (or NO DOSE in red in the title)."""
    from plotly.subplots import make_subplots

    vectors = sorted({r["vector"] for r in rec["table"]} - {PERSONA})
    fig = make_subplots(rows=2, cols=3, subplot_titles=[t for _, t in PANELS])
    for p, (key, _) in enumerate(PANELS):
        rr, cc = p // 3 + 1, p % 3 + 1
        for v in vectors:
            x, y, _, _ = _series(rec, v, key)
            fig.add_scatter(x=x, y=y, mode="lines", line=dict(color="rgba(120,120,120,0.45)", width=1),
                            name="random band (KL-matched)", legendgroup="band", showlegend=(p == 0 and v == vectors[0]),
                            row=rr, col=cc)
        x, y, lo, hi = _series(rec, PERSONA, key)
        err = {} if lo[0] is None else dict(error_y=dict(type="data", symmetric=False,
                                                         array=[h - m if None not in (h, m) else 0 for h, m in zip(hi, y)],
                                                         arrayminus=[m - l if None not in (l, m) else 0 for l, m in zip(lo, y)]))
        fig.add_scatter(x=x, y=y, mode="lines+markers", line=dict(color="#d62728"), name="persona vector (95% CI)",
                        legendgroup="persona", showlegend=p == 0, row=rr, col=cc, **err)
        fig.update_xaxes(type="log", title="dose (fraction of r_L)", row=rr, col=cc)
        if key.startswith("delta") or key == "axis_per_nat":
            fig.add_hline(y=0, line_dash="dot", line_color="black", row=rr, col=cc)
    r = rec["recommended"]
    if r["dose"] is not None:
        for p in range(len(PANELS)):
            fig.add_vline(x=r["dose"], line_dash="dash", line_color="royalblue", row=p // 3 + 1, col=p % 3 + 1)
        head = f"recommended dose {r['dose']:.3g} (range {r['range'][0]:.3g}-{r['range'][1]:.3g})"
    else:
        head = "<span style='color:#c00'><b>NO DOSE leaves the random band</b></span>"
    brk = f"; coherence < {r['coh_floor']} from {r['breaks_at']:.3g}" if r["breaks_at"] is not None else ""
    fig.update_layout(height=650, title=f"steerability: {head}{brk} ({rec['n_vignettes']} vignettes, "
                                        f"{rec['n_probe']} probe items, {rec['n_controls']} controls)")
    return fig


def figure_png(rec: dict) -> bytes:
    """A static matplotlib copy of :func:`figure` (docs)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    vectors = sorted({r["vector"] for r in rec["table"]} - {PERSONA})
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    r = rec["recommended"]
    for ax, (key, title) in zip(axes.ravel(), PANELS):
        for i, v in enumerate(vectors):
            x, y, _, _ = _series(rec, v, key)
            ax.plot(x, [float("nan") if t is None else t for t in y], color="0.55", lw=1, alpha=0.7,
                    label="random band (KL-matched)" if i == 0 else None)
        x, y, lo, hi = _series(rec, PERSONA, key)
        f = [float("nan") if t is None else t for t in y]
        ax.plot(x, f, "o-", color="#d62728", label="persona (95% CI)")
        if lo[0] is not None:
            ax.fill_between(x, [float("nan") if t is None else t for t in lo],
                            [float("nan") if t is None else t for t in hi], color="#d62728", alpha=0.18, lw=0)
        if key.startswith("delta") or key == "axis_per_nat":
            ax.axhline(0, color="black", ls=":", lw=1)
        if r["dose"] is not None:
            ax.axvline(r["dose"], color="royalblue", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("dose (fraction of r_L)")
    axes[0, 0].legend(fontsize=8)
    head = (f"recommended dose {r['dose']:.3g}" if r["dose"] is not None else "NO DOSE leaves the random band")
    fig.suptitle(f"steerability ({rec.get('model')}): {head}; {rec['n_vignettes']} vignettes, {rec['n_probe']} probe "
                 f"items, {rec['n_controls']} controls", color="black" if r["dose"] is not None else "#c00")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


