"""Online loop vs round loop: one table row per run folder, and the paired difference of their
healed models on the same vignettes. Used for docs/online/ (``python -m steerheal_utils.online.compare``).

Every number carries an interval: the eval's paired bootstrap CIs (metrics.csv ``delta_*``), Wilson
intervals for rates over completions, and a paired bootstrap over vignettes for the difference of
two runs' healed models. ``kl_to_base`` (05's mean KL of the healed model's held-out answers) and the
wall time are single measurements per run: they have no interval and say so.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

from .. import contract, stats
from ..config import load_config
from ..filter.gates import FilterThresholds
from ..generate.keepcurve import wilson
from ..markers import rounds_that_hold
from ..report import metric_rows
from ..runfolder import atomic_write_json, atomic_write_text, read_json, read_jsonl
from ..tools.study import loop_reason, strict_loop_thresholds

HEADLINE = ("axis_logodds", "care_nats", "auth_nats", "coherence")
PAIRED = ("care_nats", "auth_nats", "coherence")


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n) if n else (None, None)
    return {"k": k, "n": n, "rate": k / n if n else None, "lo": lo, "hi": hi}


def arm_summary(run_dir: Path | str) -> dict:
    """The last evaluated round of a run: healed and steered deltas vs base with their paired CIs,
    KL to base, what the run generated and trained on, and its wall time (sum of its step records)."""
    run_dir = Path(run_dir)
    cfg = load_config(contract.run_path(run_dir, "config"))
    held = rounds_that_hold(run_dir)
    if not held:
        raise ValueError(f"{run_dir}: no evaluated round")
    last = held[-1]
    out: dict = {"run": run_dir.name, "loop": cfg.loop, "rounds": len(held)}
    for row in metric_rows(run_dir):
        if row["round"] == last and row["condition"] in ("steered", "healed"):
            for m in HEADLINE:
                out[f"{row['condition']}_delta_{m}"] = [row.get(f"delta_{m}"), row.get(f"delta_{m}_lo"), row.get(f"delta_{m}_hi")]
            if row["condition"] == "healed":
                out["kl_to_base"] = row.get("kl_to_base")
    strict, _ = strict_loop_thresholds(FilterThresholds.from_config(cfg))
    rows, tokens, steps, seconds = [], 0, 0, 0.0
    for r in held:
        rows += read_jsonl(contract.path(run_dir, r, "completions"), "completions")
        gen = read_json(contract.path(run_dir, r, "generate_summary"))
        tokens += sum((gen.get("tokens") or {}).values())
        steps += read_json(contract.path(run_dir, r, "heal_summary"))["summary"]["steps"]
        for st in contract.loop_stages(cfg.loop):
            seconds += read_json(contract.marker_path(run_dir, r, st)).get("seconds") or 0.0
    kept = [x for x in rows if x.get("keep") is True]
    loops = sum(loop_reason(x, strict) is not None for x in kept)
    out.update(generated=len(rows), generated_tokens=tokens, optimizer_steps=steps, keep=_rate(len(kept), len(rows)),
               kept_loop=_rate(loops, len(kept)), wall_s=round(seconds, 1))
    return out


def healed_difference(run_a: Path | str, run_b: Path | str, n_boot: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """``healed(b) - healed(a)`` on the vignettes both evaluated (paired bootstrap over vignettes),
    for :data:`PAIRED`; ``{metric: {"delta", "lo", "hi"}}``, or ``{}`` when the vignette sets differ."""
    arrs = []
    for run in (run_a, run_b):
        last = rounds_that_hold(run)[-1]
        rows = [r for r in read_jsonl(contract.path(run, last, "eval_rows")) if r.get("condition") == "healed"]
        arrs.append(stats.vignette_arrays(rows))
    b = stats.align(arrs[1], arrs[0]["ids"])
    if b is None:
        return {}
    import torch

    n = len(arrs[0]["ids"])
    point = torch.arange(n)[None]
    pa, pb = stats.vignette_stats(arrs[0], point), stats.vignette_stats(b, point)
    idx = stats.bootstrap_indices(n, n_boot, seed)
    sa, sb = stats.vignette_stats(arrs[0], idx), stats.vignette_stats(b, idx)
    out = {}
    for m in PAIRED:
        lo, hi = stats.percentile_ci(sb[m] - sa[m], level)
        out[m] = {"delta": float(pb[m][0] - pa[m][0]), "lo": lo, "hi": hi}
    return out


def table(arms: Sequence[dict]) -> str:
    """The arms as CSV, intervals as ``_lo``/``_hi`` columns."""
    cols = ["run", "loop", "rounds", "generated", "generated_tokens", "optimizer_steps"]
    for key in ("keep", "kept_loop"):
        cols += [f"{key}_rate", f"{key}_lo", f"{key}_hi"]
    for st in ("steered", "healed"):
        for m in HEADLINE:
            cols += [f"{st}_delta_{m}", f"{st}_delta_{m}_lo", f"{st}_delta_{m}_hi"]
    cols += ["kl_to_base", "wall_s"]
    lines = [",".join(cols)]
    for a in arms:
        flat = dict(a)
        for key in ("keep", "kept_loop"):
            flat.update({f"{key}_rate": a[key]["rate"], f"{key}_lo": a[key]["lo"], f"{key}_hi": a[key]["hi"]})
        for st in ("steered", "healed"):
            for m in HEADLINE:
                v = a.get(f"{st}_delta_{m}") or [None] * 3
                flat.update({f"{st}_delta_{m}": v[0], f"{st}_delta_{m}_lo": v[1], f"{st}_delta_{m}_hi": v[2]})
        lines.append(",".join("" if flat.get(c) is None else (f"{flat[c]:.4g}" if isinstance(flat[c], float) else str(flat[c]))
                              for c in cols))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rounds_run", help="the round loop's run folder")
    ap.add_argument("online_run", help="the online loop's run folder")
    ap.add_argument("--out", required=True, help="folder for arms.csv and compare.json")
    a = ap.parse_args(argv)
    arms = [arm_summary(a.rounds_run), arm_summary(a.online_run)]
    out = Path(a.out)
    atomic_write_text(out / "arms.csv", table(arms))
    doc = {"arms": arms, "healed_online_minus_rounds": healed_difference(a.rounds_run, a.online_run)}
    atomic_write_json(out / "compare.json", doc)
    print(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
