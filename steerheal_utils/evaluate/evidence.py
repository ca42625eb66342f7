"""Uncertainty and the control band of a round's eval record: paired bootstrap CIs, deltas vs
the base, where the steered model falls among the random controls."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .. import contract, controls, stats
from ..runfolder import read_jsonl
from .maths import human_majority


def _round0_base(run_dir: Path) -> tuple[dict, list[dict]] | None:
    """Round 0's base summary and per-row records (eval.json + eval_rows.jsonl), or None if absent."""
    ev, ev_rows = contract.path(run_dir, 0, "eval"), contract.path(run_dir, 0, "eval_rows")
    if not ev.exists() or not ev_rows.exists():
        return None
    base = contract.read_eval(run_dir, 0)["conditions"].get("base")
    rows = [r for r in read_jsonl(ev_rows, "round 0 eval rows") if r.get("condition") == "base"]
    return (base, rows) if base and rows else None


def add_evidence(out: dict, condition_rows: dict[str, list[dict]], rows: Sequence[dict], *, run_dir: Path, seed: int,
                 n_boot: int = 2000, level: float = 0.95, headline: Sequence[str] | None = None) -> None:
    """Uncertainty and the control band, written into a round's eval record ``out`` in place.

    Per condition: ``ci`` (metric -> [lo, hi]) and, except for base, ``delta_vs_base`` (metric ->
    {delta, lo, hi}) from a paired bootstrap (:mod:`steerheal_utils.stats`): one ``[n_boot, n]``
    index matrix over the vignettes and one over the probe items, seeded by ``seed``, shared
    by every condition; rounds after 0 pair with round 0's base by vignette id. Then
    ``out["control_band"]`` when the round has random controls (``random_NN``) and a steered
    condition: the controls' doses and KLs, which ones missed their KL match (also a WARNING note),
    and where the steered model falls in the band for each headline metric and its delta vs base
    (:func:`steerheal_utils.stats.band_position`); ``headline``: those metrics (default
    :data:`steerheal_utils.stats.HEADLINE`; the run's axis names its own, :attr:`axis.Axis.headline`).
    """
    conditions, notes = out["conditions"], out["notes"]
    human = human_majority(rows)
    ids = [r["id"] for r in rows]
    vig_idx = stats.bootstrap_indices(len(ids), n_boot, seed)
    n_probe = int(out.get("n_probe") or 0)
    probe_idx = stats.bootstrap_indices(n_probe, n_boot, seed + 1) if n_probe else None

    def samples(summary: dict, recs: list[dict]) -> dict:
        arr = stats.align(stats.vignette_arrays(recs, human), ids) if recs else None
        items = summary.get("axis_items")
        return stats.condition_samples(arr, items if items is not None and len(items) == n_probe else None, vig_idx, probe_idx)

    base = (conditions["base"], condition_rows["base"]) if "base" in conditions else _round0_base(run_dir)
    if base is None:
        notes.append("no base eval (this round or round 0) to pair with: deltas vs base skipped")
    base_smp = samples(*base) if base is not None else None
    for name, s in conditions.items():
        u = stats.uncertainty(samples(s, condition_rows.get(name, [])), s, None if name == "base" else base_smp,
                              base[0] if base is not None else None, level)
        s["ci"] = u["ci"]
        if "delta_vs_base" in u:
            s["delta_vs_base"] = u["delta_vs_base"]
    out["ci_method"] = (f"paired percentile bootstrap, {n_boot} resamples, level {level}: vignettes and probe items "
                        f"resampled separately, the same draws for every condition (seed {seed}); deltas are condition - base "
                        f"({'this round' if 'base' in conditions else 'round 0'}'s base, paired by vignette id)")

    members = [n for n in conditions if controls.is_control_name(n)]
    if not members or "steered" not in conditions:
        return
    band = controls.band_summary(conditions["steered"], {n: conditions[n] for n in members},
                                 base[0] if base is not None else None, metrics=headline)
    out["control_band"] = band
    for n in band["unmatched"]:
        msg = (f"WARNING: control {n} is NOT matched in effect to the persona vector: {conditions[n].get('match_reason')} "
               f"(its row in metrics.csv has kl_matched=0)")
        notes.append(msg)
        print(msg)
