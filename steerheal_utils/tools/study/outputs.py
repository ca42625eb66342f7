"""Writing the study's outputs: runs.csv, summary.csv, pipeline.csv, trajectory.png,
ceo_outputs.json, study.json and results.md (:func:`write_outputs`), with the markdown tables,
the matplotlib figure and the CEO-prompt answers they hold.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from ... import config as C
from ...runfolder import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from .arms import ARMS, COMMON, SCALES, StudyError, arm_config, check_run_configs, run_name
from .collect import (CONTROL_CONDITIONS, DELTA_KEYS, METRICS, PIPELINE_KEYS, SUMMARY_KEYS, _run_commits, _wall_span,
                      collect_runs, control_mismatch, item_cis, pipeline_rows, run_timings, summarize, summarize_pipeline)
from .loops import labelled_flag_rates, strict_loop_thresholds

CEO_ID = "heldout-ceo-logs"


def ceo_outputs(study_dir: Path | str, arms: Sequence[str], seed: int) -> dict:
    """Per arm: the healed model's greedy answer to the CEO/logs held-out prompt, per round (eval.json)."""
    from ...report import load_evals

    out: dict[str, Any] = {"prompt_id": CEO_ID, "seed": seed, "prompt": None, "arms": {}}
    for arm in arms:
        run = Path(study_dir) / run_name(arm, seed)
        answers = {}
        for ev in load_evals(run) if run.exists() else []:
            for h in ev.get("heldout") or []:
                if h.get("id") == CEO_ID:
                    out["prompt"] = h.get("prompt")
                    answers[str(ev["round"])] = h.get("answer")
        out["arms"][arm] = answers
    return out


def base_ceo_answer(study_dir: Path, cfg: C.Config) -> str | None:
    """The base model's greedy answer to the CEO prompt, computed once and cached in the study folder."""
    path = Path(study_dir) / "base_heldout.json"
    if path.exists():
        return read_json(path).get("answers", {}).get(CEO_ID)
    from ...evaluate import heldout_answers, load_heldout
    from ...models import load_base

    model, tok = load_base(cfg)
    model.eval()
    recs = heldout_answers(model, tok, load_heldout(), cfg.heldout_max_new_tokens, cfg.batch_size)[0]
    atomic_write_json(path, {"model": cfg.model, "max_new_tokens": cfg.heldout_max_new_tokens,
                             "answers": {r["id"]: r["answer"] for r in recs}})
    return next((r["answer"] for r in recs if r["id"] == CEO_ID), None)


def _csv(rows: Sequence[dict], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k]) for k in cols})
    return buf.getvalue()


def _fmt(s: dict, k: str, digits: int = 3, bold_if_nonzero: bool = False) -> str:
    """``mean [min, max] (CI lo, hi)``: spread over seeds, then the item-bootstrap CI of the mean (when known).

    ``bold_if_nonzero``: bold when the CI excludes 0 (a difference one may call a difference).
    """
    from ...stats import excludes_zero

    m, lo, hi = s.get(f"{k}_mean"), s.get(f"{k}_min"), s.get(f"{k}_max")
    if m is None:
        return "–"
    out = f"{m:.{digits}f}"
    if s.get("n_seeds", 1) > 1 and lo is not None and hi is not None and hi > lo:
        out += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    clo, chi = s.get(f"{k}_ci_lo"), s.get(f"{k}_ci_hi")
    if clo is not None and chi is not None and math.isfinite(clo) and math.isfinite(chi):
        out += f" (CI {clo:.{digits}f}, {chi:.{digits}f})"
        if bold_if_nonzero and excludes_zero(clo, chi):
            out = f"**{out}**"
    return out


def results_markdown(summary: Sequence[dict], ceo: dict, meta: dict, pipeline: Sequence[dict] = ()) -> str:
    """The README tables (eval at the first and last round, healed per arm, plus the controls; what
    02-04 did per round) and the CEO appendix."""
    rounds = sorted({r["round"] for r in summary if r["condition"] == "healed"})
    first, last = (rounds[0], rounds[-1]) if rounds else (0, 0)
    lines = [f"Scale `{meta['scale']}`, preset `{meta['preset']}`, {meta['rounds']} rounds, seeds "
             f"{', '.join(map(str, meta['seeds']))}; every cell is the mean over seeds [min, max] (CI: the "
             f"item-bootstrap interval of that mean, defined in `study.json`, `uncertainty`). `random` is the mean "
             f"of the control band (random rotations of the persona vector at KL-matched doses). "
             f"`kept loop` is the fraction of the round's kept (trained-on) rows that a stricter loop gate flags "
             f"(defined in `study.json`, `loop_rate_definition`); `KL to base` is the healed model's mean per-token "
             f"KL(healed || base) on its own greedy answers to the held-out prompts. Produced by `{meta['command']}`.", "",
             "| arm | condition | round | axis probe (log-odds care vs auth) | auth_nats | care_nats | coherence | kept loop | KL to base |",
             "|---|---|---|---|---|---|---|---|---|"]
    pick = [r for r in summary if r["condition"] in CONTROL_CONDITIONS]
    pick += [r for r in summary if r["condition"] == "steered" and r["round"] == first]
    pick += [r for r in summary if r["condition"] == "healed" and r["round"] in (first, last)]
    for r in pick:
        lines.append(f"| {r['arm']} | {r['condition']} | {r['round']} | {_fmt(r, 'axis_logodds')} | {_fmt(r, 'auth_nats')} | "
                     f"{_fmt(r, 'care_nats')} | {_fmt(r, 'coherence', 4)} | {_fmt(r, 'kept_loop_rate', 2)} | "
                     f"{_fmt(r, 'kl_to_base', 2)} |")
    deltas = [r for r in pick if r["condition"] != "base" and any(r.get(f"{k}_mean") is not None for k in DELTA_KEYS)]
    if deltas:
        lines += ["", "Difference from base (each run's condition minus its own base, paired on the same items; mean over "
                  "seeds [min, max] (CI)); **bold**: the CI excludes 0.", "",
                  "| arm | condition | round | Δ axis probe | Δ auth_nats | Δ care_nats | Δ coherence |", "|---|---|---|---|---|---|---|"]
        for r in deltas:
            lines.append(f"| {r['arm']} | {r['condition']} | {r['round']} | "
                         + " | ".join(_fmt(r, f"delta_{k}", 4 if k == "coherence" else 3, bold_if_nonzero=True)
                                      for k in ("axis_logodds", "auth_nats", "care_nats", "coherence")) + " |")
    if pipeline:
        lines += ["", "What 02-04 did per round (mean over seeds [min, max]; drop reasons summed over seeds). `keep` is "
                  "03's keep rate over every generated row; `Q1 loop` is the loop rate (heal.LOOP_REASONS at 03's "
                  "thresholds) of the steered samples vs the healed model's own sampled answers to the same prompts, "
                  "`Q1 tail ppl` their median tail perplexity under the base; `barrier` is the mean fraction of rows "
                  "per step whose KL aggregate was above tau.", "",
                  "| arm | round | dose | generated | keep | drop reasons | Q1 loop: steered -> healed | "
                  "Q1 tail ppl: steered -> healed | NLL first -> last | barrier |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(pipeline, key=lambda r: (list(meta["arms"]).index(r["arm"]) if r["arm"] in meta["arms"] else 9,
                                                 r["round"])):
            flagged = f" **{r['dose_flags']}**" if r.get("dose_flags") else ""
            lines.append(f"| {r['arm']} | {r['round']} | {_fmt(r, 'dose')}{flagged} | {_fmt(r, 'n_generated', 0)} | "
                         f"{_fmt(r, 'keep_rate', 2)} | {r['drop_reasons'] or '-'} | {_fmt(r, 'q1_loop_steered', 2)} -> "
                         f"{_fmt(r, 'q1_loop_healed_sampled', 2)} | {_fmt(r, 'q1_ppl_steered', 1)} -> "
                         f"{_fmt(r, 'q1_ppl_healed_sampled', 1)} | {_fmt(r, 'heal_nll_first', 2)} -> "
                         f"{_fmt(r, 'heal_nll_last', 2)} | {_fmt(r, 'heal_hinge_frac', 2)} |")
    lines += ["", f"Outputs over the loop: the healed model's greedy answer to the held-out prompt "
              f"`{ceo['prompt_id']}` (seed {ceo['seed']}), per round.", "", f"> **Prompt:** {ceo.get('prompt') or ''}", ""]
    if ceo.get("base") is not None:
        lines += ["**base model**", "", "> " + _quote(ceo["base"]), ""]
    for arm, answers in ceo["arms"].items():
        for rnd, ans in sorted(answers.items(), key=lambda kv: int(kv[0])):
            lines += [f"**{arm}, round {rnd}**", "", "> " + _quote(ans), ""]
    return "\n".join(lines)


def _quote(text: str | None) -> str:
    return " ".join((text or "(empty)").split()).replace("|", "\\|")


def trajectory_png(summary: Sequence[dict], arms: Sequence[str]) -> bytes:
    """Per arm, healed mean over seeds with a min-max band, over rounds; controls as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colors = {"rmse": "#2ca02c", "mean": "#d62728", "nll": "#9467bd", "prompt": "#ff7f0e"}
    ref_style = {"base": ("black", "-"), "prompted": ("#1f77b4", "--"), "random": ("#7f7f7f", ":")}
    panels = (("axis_logodds", "axis probe log-odds (up = care)", False, False),
              ("care_nats", "care_nats (up = more care)", False, False),
              ("auth_nats", "auth_nats (down = less authority)", False, False),
              ("coherence", "1 - coherence (log; down = coherent)", True, True),
              ("kept_loop_rate", "kept-data loop rate (strict gate)", False, False),
              ("kl_to_base", "KL to base on held-out answers (nats/token)", False, False))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    rounds = sorted({r["round"] for r in summary if r["condition"] == "healed"}) or [0]
    for ax, (key, title, inv, logy) in zip(axes, panels):
        def tr(v):
            return None if v is None else max(1 - v, 1e-6) if inv else v
        for arm in arms:
            rs = sorted((r for r in summary if r["arm"] == arm and r["condition"] == "healed"), key=lambda r: r["round"])
            pts = [(r["round"], tr(r[f"{key}_mean"]), tr(r[f"{key}_min"]), tr(r[f"{key}_max"])) for r in rs
                   if r.get(f"{key}_mean") is not None]
            if pts:
                x, m, lo, hi = zip(*pts)
                ax.plot(x, m, "o-", color=colors.get(arm), label=f"{arm} (healed)")
                ax.fill_between(x, lo, hi, color=colors.get(arm), alpha=0.18, linewidth=0)
                ci = [(r["round"], tr(r[f"{key}_mean"]), tr(r.get(f"{key}_ci_lo")), tr(r.get(f"{key}_ci_hi"))) for r in rs
                      if r.get(f"{key}_mean") is not None and r.get(f"{key}_ci_lo") is not None]
                if ci:  # the item-bootstrap CI of the seed mean (1 - coherence swaps its bounds)
                    cx, cm, a, b = zip(*ci)
                    low, high = [min(u, v) for u, v in zip(a, b)], [max(u, v) for u, v in zip(a, b)]
                    ax.errorbar(cx, cm, yerr=[[max(mm - l, 0) for mm, l in zip(cm, low)],
                                              [max(h - mm, 0) for mm, h in zip(cm, high)]],
                                fmt="none", ecolor=colors.get(arm), capsize=3, lw=1)
        for condition, (c, ls) in ref_style.items():
            r = next((r for r in summary if r["condition"] == condition and r.get(f"{key}_mean") is not None), None)
            if r is not None:
                ax.axhline(tr(r[f"{key}_mean"]), color=c, ls=ls, lw=1.2, label=condition)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks(rounds)  # integer rounds, also when there is only one
    axes[0].legend(fontsize=8)
    fig.suptitle("healed model per arm: mean over seeds, band = min-max over seeds, bars = item-bootstrap CI of the mean",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(study_dir: Path | str, out: Path | str, arms: Sequence[str], seeds: Sequence[int], *,
                  rounds: int, scale: str, preset: str = "default", extra: dict[str, Any] | None = None,
                  command: str = "", errors: dict | None = None) -> dict:
    """Write runs.csv, summary.csv, trajectory.png, ceo_outputs.json, study.json and results.md into ``out``."""
    from ... import filter as F
    from ...driver import provenance
    from ...report import CSV_COLUMNS

    study_dir, out = Path(study_dir), Path(out)
    check_run_configs(study_dir, arms, seeds, scale, preset, extra)
    rows = collect_runs(study_dir, arms, seeds)
    if not rows:
        raise StudyError(f"no finished rounds under {study_dir} for arms {list(arms)} and seeds {list(seeds)}: "
                         "run the study first (without --report-only)")
    summary = summarize(rows, (*SUMMARY_KEYS, *DELTA_KEYS))
    cfg0 = arm_config(arms[0], seeds[0], scale, preset, extra)
    item_cis(study_dir, arms, seeds, summary, n_boot=cfg0.n_boot, level=cfg0.ci_level)
    atomic_write_text(out / "runs.csv", _csv(rows, ("arm", "seed", *CSV_COLUMNS, "kept_loop_rate")))
    cols = ["arm", "condition", "round", "n_seeds", *[f"{k}_{m}" for k in (*SUMMARY_KEYS, *DELTA_KEYS)
                                                  for m in ("mean", "sd", "min", "max")],
            *[f"{p}{k}_ci_{e}" for p in ("", "delta_") for k in METRICS for e in ("lo", "hi")]]
    atomic_write_text(out / "summary.csv", _csv(summary, cols))
    atomic_write_bytes(out / "trajectory.png", trajectory_png(summary, arms))

    ceo = ceo_outputs(study_dir, arms, seeds[0])
    ceo["base"] = base_ceo_answer(study_dir, cfg0)
    atomic_write_json(out / "ceo_outputs.json", ceo)

    strict, table = strict_loop_thresholds(F.FilterThresholds.from_config(cfg0))
    timings = run_timings(study_dir, arms, seeds)
    meta = {
        "scale": scale, "preset": preset, "rounds": rounds, "seeds": list(seeds), "arms": list(arms),
        "command": command or f"python -m steerheal_utils study --scale {scale}",
        "overrides": {"common": {**SCALES[scale], **COMMON, **(extra or {})}, "per_arm": {a: ARMS[a] for a in arms}, "seed": "seed=<seed>"},
        "spread": "summary.csv: sd is the sample standard deviation (ddof=1) over seeds; min/max over seeds. "
                  "results.md: mean [min, max].",
        "uncertainty": f"summary.csv <k>_ci_lo/_ci_hi (results.md: 'CI'): {cfg0.ci_level:.0%} percentile interval of "
                       f"the mean over seeds under an item bootstrap ({cfg0.n_boot} resamples of vignettes and, "
                       "separately, probe items, the same draws for every seed and model when they share items); "
                       "delta_<k>: condition - base of the same run, paired on the same draws (study.item_cis)",
        "controls": "base, prompted and random are arm-independent; summarised as arm 'all' from the first arm's run "
                    "of each seed",
        "control_max_abs_diff_between_arms": control_mismatch(rows),
        "loop_rate_definition": {
            "text": "fraction of a round's kept completions (keep=true, what 04_heal trained on) that a stricter copy "
                    "of the filter's loop detectors (heal.LOOP_REASONS) drops; each loop gate moved halfway from its "
                    "03 threshold toward the median score of the shipped coherent labelled rows; narration, refusal, "
                    "word-count and perplexity gates off",
            "gates": {k: {"filter": v[0], "clean_median": v[1], "strict": v[2]} for k, v in table.items()},
            "labelled_flag_rates_text_only": labelled_flag_rates(strict),
        },
        "runs": timings,
        "compute_seconds_total": round(sum(t["seconds_own"] for t in timings.values()), 1),
        "wall_seconds": _wall_span([sp for t in timings.values() for sp in t.pop("stage_spans")]),
        "timing_note": "compute_seconds_total sums every stage's own seconds (runs in parallel processes overlap); "
                       "wall_seconds is from the first stage's start to the last stage's end, pauses between "
                       "sittings included",
        "errors": errors or {n: t["error"] for n, t in timings.items() if t["error"]},
        "provenance": provenance(),  # of this report; the runs' own code is in run_git_commits
        "run_git_commits": _run_commits(study_dir, arms, seeds),
    }
    pipe = summarize_pipeline(pipeline_rows(study_dir, arms, seeds))
    atomic_write_text(out / "pipeline.csv", _csv(pipe, ["arm", "round", "n_seeds", *[f"{k}_{m}" for k in PIPELINE_KEYS
                                                                                      for m in ("mean", "min", "max")],
                                                        "drop_reasons", "dose_flags"]))
    atomic_write_json(out / "study.json", meta)
    atomic_write_text(out / "results.md", results_markdown(summary, ceo, meta, pipe) + "\n")
    return meta
