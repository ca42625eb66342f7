"""The kept-data loop rate: a stricter copy of the filter's loop gates and the rate it flags.

Kept-data loop rate: the fraction of a round's *kept* completions (the rows 04_heal trained on)
that a stricter copy of the filter's loop detectors (``heal.LOOP_REASONS``: degenerate_loop,
affect_loop, token_soup, drift, repetition, entropy_collapse) would drop. Each loop gate is
moved halfway from its 03 threshold toward the median score of the shipped coherent labelled
rows (data/filter_labelled.jsonl); narration, refusal, word-count and perplexity gates are off.
Kept rows passed the 03 gates, so this measures how close to looping the training data was.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from .arms import StudyError


def strict_loop_thresholds(th=None, labelled: Iterable[dict] | None = None):
    """03's thresholds with every loop gate moved halfway toward the median clean-text score.

    Args:
        th: the run's ``FilterThresholds`` (default: the config defaults).
        labelled: rows with ``completion`` and ``label``; default the shipped labelled set. Rows whose
            label starts with ``coherent`` give the clean reference (text scores only, so
            entropy_collapse's reference is 0).

    Returns:
        ``(strict FilterThresholds, {gate field: (03 value, clean median, strict value)})``.
    """
    import dataclasses

    from ... import filter as F

    th = th or F.FilterThresholds()
    rows = list(labelled) if labelled is not None else F.labelled_rows()
    clean = [F.text_scores(r["completion"]) for r in rows if str(r.get("label", "")).startswith("coherent")]
    if not clean:
        raise StudyError("no coherent labelled rows to take the clean reference from")
    gates = {g[1]: g[0] for g in F.GATES if g[0] != "tail_ppl"}  # perplexity is not a loop detector
    gates.update(max_exclaim_rate="exclaim_rate", max_script_mix="script_mix", max_char_repeat="char_repeat")
    new, table = {}, {}
    for field, key in gates.items():
        ref = statistics.median(s[key] for s in clean) if key in clean[0] else 0.0
        old = getattr(th, field)
        new[field] = (old + ref) / 2
        table[field] = (old, ref, new[field])
    return dataclasses.replace(th, strict=True, **new), table


def loop_reason(scores: dict, strict) -> str | None:
    """The loop reason a strict gate gives a scored row, or None (narration, refusal, length and
    perplexity gates switched off: only the loop detectors of ``filter.LOOP_REASONS`` count)."""
    from ...filter.gates import loop_reason as gate_loop_reason

    return gate_loop_reason(scores, strict, perplexity_gate=False)


def kept_loop_rate(rows: Sequence[dict], strict) -> float | None:
    """Fraction of ``keep`` rows flagged by :func:`loop_reason`; None when nothing was kept."""
    kept = [r for r in rows if r.get("keep") is True]
    if not kept:
        return None
    return sum(loop_reason(r, strict) is not None for r in kept) / len(kept)


def labelled_flag_rates(strict) -> dict:
    """How often the strict loop gate flags the shipped labelled rows (text scores only), per label group."""
    from ... import filter as F

    groups: dict[str, list[bool]] = {}
    for r in F.labelled_rows():
        label = str(r.get("label", "?"))
        g = "coherent" if label.startswith("coherent") else "degenerate" if label.startswith("degenerate") else label
        groups.setdefault(g, []).append(loop_reason(F.text_scores(r["completion"]), strict) is not None)
    return {g: {"n": len(v), "flagged": sum(v) / len(v)} for g, v in sorted(groups.items())}
