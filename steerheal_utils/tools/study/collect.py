"""Collecting the study's runs and summarising them: the metric rows of every run, the pipeline
rows (what 02-04 did), the spread over seeds, the item-bootstrap intervals, the stage timings.
Pure maths apart from reading the run folders.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from ... import config as C
from ... import contract
from ...runfolder import read_json, read_jsonl
from .arms import run_name
from .loops import kept_loop_rate, strict_loop_thresholds

METRICS = ("axis_logodds", "auth_nats", "care_nats", "coherence")
CONTROL_CONDITIONS = ("base", "prompted", "random")  # arm-independent, round 0 ("random": the control band's summary)
DELTA_KEYS = tuple(f"delta_{m}" for m in METRICS)  # condition - base, paired (report.CI_COLUMNS)
SUMMARY_KEYS = (*METRICS, "kept_loop_rate", "kl_to_base")  # kl_to_base: healed, on the held-out answers


def is_control(condition: str) -> bool:
    """Arm-independent conditions: base, prompted, the band summary ``random`` and its members ``random_NN``."""
    from ...controls import is_control_name

    return condition in CONTROL_CONDITIONS or is_control_name(condition)


def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect_runs(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Every metrics row of every run (report.metric_rows), with arm, seed and the kept-data loop rate."""
    from ... import filter as F
    from ...report import metric_rows

    out = []
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            if not (run / "config.yaml").exists():
                continue
            strict, _ = strict_loop_thresholds(F.FilterThresholds.from_config(C.load_config(run / "config.yaml")))
            rates: dict[int, float | None] = {}
            for row in metric_rows(run):
                rnd = row["round"]
                if rnd not in rates:
                    p = contract.path(run, rnd, "completions")
                    rates[rnd] = kept_loop_rate(read_jsonl(p, "completions"), strict) if p.exists() else None
                lr = rates[rnd] if row["condition"] in ("steered", "healed") else None
                out.append({"arm": arm, "seed": seed, **row, "kept_loop_rate": lr})
    return out


PIPELINE_KEYS = ("dose", "n_generated", "keep_rate", "labelled_precision", "labelled_degenerate_recall",
                 "q1_loop_steered", "q1_loop_healed_sampled", "q1_loop_healed_greedy",
                 "q1_ppl_steered", "q1_ppl_healed_sampled", "heal_nll_first", "heal_nll_last", "heal_hinge_frac")


def pipeline_rows(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Per arm, seed and round: what 02-04 did (the evidence for Q0 and Q1).

    From ``generate.json`` the dose and its flags (a bound, below target, diverged...); from
    ``filter.json`` the rows generated, the keep rate and the drop reasons, and the filter's
    precision / degenerate recall on the labelled set; from ``heal_q1.json`` the loop rate and median tail perplexity (under the base) of the steered
    samples vs the healed model's own sampled and greedy answers to the same prompts; from
    ``heal.json`` the NLL at the first and last step and the fraction of rows the barrier bit on.
    """
    out = []
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            for d in sorted(run.glob("round_[0-9][0-9]")):
                rnd = int(d.name[-2:])
                row: dict[str, Any] = {"arm": arm, "seed": seed, "round": rnd}
                gen, filt = contract.path(run, rnd, "generate_summary"), contract.path(run, rnd, "filter_summary")
                q1, healj = contract.path(run, rnd, "heal_q1"), contract.path(run, rnd, "heal_summary")
                if gen.exists():
                    g = read_json(gen)
                    row.update(dose=g.get("dose"), dose_flag=g.get("dose_flag") or "")
                if filt.exists():
                    f = read_json(filt)
                    row.update(n_generated=f.get("n"), keep_rate=(f["n_kept"] / f["n"]) if f.get("n") else None,
                               reasons=f.get("reasons") or {})
                    lab = f.get("labelled") or {}
                    row.update(labelled_precision=lab.get("precision"), labelled_degenerate_recall=lab.get("degenerate_recall"))
                if q1.exists():
                    sets = read_json(q1).get("sets", {})
                    for name, key in (("steered", "steered"), ("healed_sampled", "healed_sampled"), ("healed_greedy", "healed_greedy")):
                        row[f"q1_loop_{key}"] = sets.get(name, {}).get("loop_rate")
                    row["q1_ppl_steered"] = sets.get("steered", {}).get("tail_ppl_median")
                    row["q1_ppl_healed_sampled"] = sets.get("healed_sampled", {}).get("tail_ppl_median")
                if healj.exists():
                    h = read_json(healj).get("summary", {})
                    row.update(heal_nll_first=h.get("nll_first"), heal_nll_last=h.get("nll_last"),
                               heal_hinge_frac=h.get("hinge_frac_mean"))
                if len(row) > 3:
                    out.append(row)
    return out


def summarize_pipeline(rows: Sequence[dict]) -> list[dict]:
    """One row per (arm, round): mean / min / max over seeds of :data:`PIPELINE_KEYS`, drop reasons summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["round"]), []).append(r)
    out = []
    for (arm, rnd), rs in groups.items():
        row: dict[str, Any] = {"arm": arm, "round": rnd, "n_seeds": len(rs)}
        for k in PIPELINE_KEYS:
            sp = spread([r.get(k) for r in rs])
            row.update({f"{k}_{m}": sp[m] for m in ("mean", "min", "max")})
        reasons: dict[str, int] = {}
        for r in rs:
            for why, n in (r.get("reasons") or {}).items():
                reasons[why] = reasons.get(why, 0) + n
        row["drop_reasons"] = "; ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]) if k != "keep")
        row["dose_flags"] = "; ".join(f"s{r['seed']}: {r['dose_flag']}" for r in rs if r.get("dose_flag"))
        out.append(row)
    return out


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample sd (ddof=1; None for one value), min, max and n of the finite values."""
    v = [x for x in (_num(x) for x in values) if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v), "n": len(v)}


def summarize(rows: Sequence[dict], keys: Sequence[str] = SUMMARY_KEYS) -> list[dict]:
    """One row per (arm, condition, round): mean / sd / min / max over seeds of ``keys``.

    The controls (base, prompted, random) do not depend on the arm: they are summarised once,
    as arm ``all``, from the first arm's run of each seed. The band's members (``random_NN``)
    are summarised through their band row ``random`` only (runs.csv keeps them).
    """
    first_arm = rows[0]["arm"] if rows else None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if is_control(r["condition"]) and r["condition"] not in CONTROL_CONDITIONS:
            continue
        if r["condition"] in CONTROL_CONDITIONS:
            if r["arm"] != first_arm:
                continue
            key = ("all", r["condition"], r["round"])
        else:
            key = (r["arm"], r["condition"], r["round"])
        groups.setdefault(key, []).append(r)
    order = {s: i for i, s in enumerate((*CONTROL_CONDITIONS, "steered", "healed"))}
    out = []
    for (arm, condition, rnd), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0],
                                                                       order.get(kv[0][1], 9), kv[0][2])):
        row: dict[str, Any] = {"arm": arm, "condition": condition, "round": rnd, "n_seeds": len({r["seed"] for r in rs})}
        for k in keys:
            s = spread([r.get(k) for r in rs])
            row.update({f"{k}_{m}": s[m] for m in ("mean", "sd", "min", "max")})
        out.append(row)
    return out


def control_mismatch(rows: Sequence[dict]) -> float | None:
    """Largest |difference| of a control metric between arms of the same seed (0 when identical)."""
    ref: dict[tuple, float] = {}
    worst = None
    for r in rows:
        if not is_control(r["condition"]):
            continue
        for k in METRICS:
            v = _num(r.get(k))
            if v is None:
                continue
            key = (r["seed"], r["condition"], r["round"], k)
            if key in ref:
                worst = max(worst or 0.0, abs(ref[key] - v))
            else:
                ref[key] = v
    return worst


def _round_eval(run: Path, rnd: int, cache: dict) -> tuple[dict, dict[str, list[dict]]] | None:
    """A run's round: eval.json and its eval_rows.jsonl grouped by condition (cached per call of item_cis)."""
    key = (str(run), rnd)
    if key not in cache:
        ev, ev_rows = contract.path(run, rnd, "eval"), contract.path(run, rnd, "eval_rows")
        if ev.exists() and ev_rows.exists():
            record = contract.read_eval(run, rnd)  # refuses a record made by an older version
            by: dict[str, list[dict]] = {}
            for r in read_jsonl(ev_rows, "eval rows"):
                by.setdefault(r["condition"], []).append(r)
            cache[key] = (record, by)
        else:
            cache[key] = None
    return cache[key]


def item_cis(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int], summary: Sequence[dict], *, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> None:
    """Add the within-seed uncertainty to the summary rows: ``<k>_ci_lo`` / ``<k>_ci_hi`` for the
    :data:`METRICS` and their :data:`DELTA_KEYS` (condition - base), in place.

    The interval is an item bootstrap of the *mean over seeds*: every resample draws vignettes
    (and, separately, probe items) with replacement, recomputes each seed's metric on them, and
    averages over seeds; the percentile interval of those averages says how much the seed mean
    would move with other items of the same kind. When the seeds were scored on the same items
    (the usual case), one draw serves every seed and every model (paired); otherwise each seed
    gets its own draw. Deltas pair each model with its own run's base (round 0's for later
    rounds) on the same draws. The ``random`` row is the band mean (mean over its controls).
    The spread over seeds (sd, min, max) is what summarize() gives; the two answer different
    questions (other items vs another seed) and the tables show both.
    """
    from ... import evaluate as E
    from ... import stats

    cache: dict = {}
    humans: dict[str, dict[str, int]] = {}
    for row in summary:
        arm = arms[0] if row["arm"] == "all" else row["arm"]
        per_seed = []  # (ids, condition arrays/items, base arrays/items)
        for sd in seeds:
            run = Path(study_dir) / run_name(arm, sd)
            got = _round_eval(run, row["round"], cache)
            if got is None:
                continue
            ev, by = got
            names = sorted(n for n in by if n.startswith("random_")) if row["condition"] == "random" else [row["condition"]]
            if not names or any(n not in by for n in names):
                continue
            base = (ev["conditions"].get("base"), by.get("base")) if "base" in by else None
            if base is None:
                got0 = _round_eval(run, 0, cache)
                base = (got0[0]["conditions"].get("base"), got0[1].get("base")) if got0 and "base" in got0[1] else None
            vfile = C.load_config(run / "config.yaml").vignettes or ""
            if vfile not in humans:
                humans[vfile] = E.human_majority(E.load_vignettes(vfile or None))
            per_seed.append((ev, by, names, base, humans[vfile]))
        if not per_seed:
            continue
        ids0 = [r["id"] for r in per_seed[0][1][per_seed[0][2][0]]]
        joint = all([r["id"] for r in by[names[0]]] == ids0 for _, by, names, _, _ in per_seed)
        n_items = {len(ev["conditions"][names[0]].get("axis_items") or []) for ev, _, names, _, _ in per_seed}
        smp, dsmp = [], []
        for i, (ev, by, names, base, human) in enumerate(per_seed):
            ids = [r["id"] for r in by[names[0]]]
            vidx = stats.bootstrap_indices(len(ids), n_boot, seed if joint else seed + 7919 * (i + 1))
            n_p = len(ev["conditions"][names[0]].get("axis_items") or [])
            pidx = stats.bootstrap_indices(n_p, n_boot, (seed if len(n_items) == 1 else seed + 7919 * (i + 1)) + 1) \
                if n_p else None

            def samples(summ, recs):
                arr = stats.align(stats.vignette_arrays(recs, human), ids) if recs else None
                items = (summ or {}).get("axis_items")
                return stats.condition_samples(arr, items if items is not None and len(items) == n_p else None, vidx, pidx)

            s = stats.mean_over_seeds([samples(ev["conditions"][n], by[n]) for n in names])  # a band: mean over members
            smp.append(s)
            if base is not None and base[1] and row["condition"] != "base":
                b = samples(*base)
                dsmp.append({m: s[m] - b[m] for m in s if m in b})
        for key, group in (("", smp), ("delta_", dsmp)):
            if len(group) != len(per_seed):
                continue  # a seed without a base: no delta interval rather than one over fewer seeds
            mean = stats.mean_over_seeds(group)
            for m in METRICS:
                if m in mean:
                    row[f"{key}{m}_ci_lo"], row[f"{key}{m}_ci_hi"] = stats.percentile_ci(mean[m], level)


def run_timings(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """Stage seconds per run and round from the done markers; copied (shared) markers are listed apart."""
    runs = {}
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            if not run.exists():
                continue
            shared_path = contract.run_path(run, "shared_from")
            shared = read_json(shared_path)["stages"] if shared_path.exists() else []
            per_round, own, span = {}, 0.0, []
            for d in sorted(run.glob("round_[0-9][0-9]")):
                r = int(d.name[-2:])
                secs = {}
                for m in sorted((d / contract.MARKER_DIR).glob("*.json")):
                    rec = read_json(m)
                    s = rec.get("seconds")
                    secs[m.stem] = s
                    if s is not None and not (r == 0 and m.stem in shared):
                        own += s
                        if rec.get("finished") is not None:
                            span.append((rec["finished"] - s, rec["finished"]))
                per_round[str(r)] = secs
            err = run / "study_error.json"
            runs[run.name] = {"stage_seconds": per_round, "shared_round0_stages": shared, "seconds_own": round(own, 1),
                              "stage_spans": span,
                              "error": read_json(err).get("error") if err.exists() else None,
                              "stop": read_json(contract.run_path(run, "stop"))
                              if contract.run_path(run, "stop").exists() else None}
    return runs


def _wall_span(spans: Sequence[tuple[float, float]]) -> float | None:
    return round(max(e for _, e in spans) - min(b for b, _ in spans), 1) if spans else None


def _run_commits(study_dir: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, list[str]]:
    """git commit -> the runs whose config.yaml records it (the code that computed them)."""
    import yaml

    out: dict[str, list[str]] = {}
    for arm in arms:
        for seed in seeds:
            path = Path(study_dir) / run_name(arm, seed) / "config.yaml"
            if path.exists():
                commit = (yaml.safe_load(path.read_text()).get("_meta") or {}).get("git_commit") or "unknown"
                out.setdefault(commit, []).append(run_name(arm, seed))
    return out
