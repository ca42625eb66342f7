"""The control band's records: a control's match fields, the band summary, its display table."""

from __future__ import annotations

from typing import Sequence

from ..vector.value import SteeringVector


def match_record(match: dict, control: SteeringVector) -> dict:
    """The fields a control condition's summary carries about its dose match (flat, for eval.json and metrics.csv)."""
    return {"control_seed": control.meta.get("control_seed"), "tag_kl": match["kl"], "persona_tag_kl": match["target_kl"],
            "persona_dose": match["start"], "dose_ratio": match["ratio"],
            "kl_matched": bool(match["matched"]), "match_steps": match["steps"], "match_trace": match["trace"],
            "match_reason": match["reason"]}


def band_summary(persona: dict, members: dict[str, dict], base: dict | None = None,
                 metrics: Sequence[str] | None = None) -> dict:
    """The control band of one round: its members' doses and KLs, and where the persona falls in it.

    Args:
        persona: the steered condition's summary.
        members: control condition name -> summary (with :func:`match_record` fields).
        base: the base summary the deltas are taken against (None: no deltas).

    Returns ``{"members": [{name, seed, dose, dose_ratio, tag_kl, kl_matched}], "persona_dose",
    "persona_tag_kl", "unmatched": [names], "position": {metric: band_position},
    "delta_position": {metric: band_position of (condition - base)}}`` for the headline metrics.
    The z-score and rank of a delta equal those of the raw value (the same base is subtracted
    from every member); both are listed so a reader need not know that.
    """
    from ..stats import HEADLINE, band_position

    metrics = tuple(metrics or HEADLINE)  # the run's axis may name its own (axis.Axis.headline)

    names = sorted(members)
    first = members[names[0]] if names else {}
    out: dict = {
        "members": [{"name": n, "seed": members[n].get("control_seed"), "dose": members[n].get("dose"),
                     "dose_ratio": members[n].get("dose_ratio"), "tag_kl": members[n].get("tag_kl"),
                     "kl_matched": members[n].get("kl_matched")} for n in names],
        "persona_dose": first.get("persona_dose"), "persona_tag_kl": first.get("persona_tag_kl"),
        "unmatched": [n for n in names if members[n].get("kl_matched") is False],
        "position": {m: band_position(persona.get(m), [members[n].get(m) for n in names]) for m in metrics},
    }
    if base is not None:
        def d(s, m):
            a, b = s.get(m), base.get(m)
            return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        out["delta_position"] = {m: band_position(d(persona, m), [d(members[n], m) for n in names]) for m in metrics}
    return out


def band_table(result: dict) -> list[dict]:
    """One row per headline metric: the persona's value, the band's mean / min / max, z and rank (for display)."""
    band = result.get("control_band") or {}
    rows = []
    for m, pos in band.get("position", {}).items():
        rows.append({"metric": m, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in pos.items()}})
    return rows
