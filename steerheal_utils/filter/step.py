"""03_filter: score every completion of the round under the base model and decide keep or why not.

Reads 02's ``generated`` and writes ``completions`` (the same rows with every score, ``reason``
and ``keep``: the kept rows are what 04 trains on) and ``filter_summary`` (counts per reason, the
thresholds, precision/recall of the same filter on the shipped labelled set).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..chat import render_prompt
from ..runfolder import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from .gates import FilterThresholds
from .rows import filter_rows, labelled_rows, precision_recall, reason_counts


class TooFewKept(RuntimeError):
    """Fewer kept completions than ``min_train``: the round stops (message has counts per reason)."""


def _finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None, recursively, so summaries are strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


@dataclass
class FilterResult:
    """What 03 computed: the scored rows (``completions.jsonl``), the summary (``filter.json``) and
    the labelled set scored (empty when round 0's labelled-set result was reused)."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    labelled_rows: list[dict[str, Any]] = field(default_factory=list)


def run_stage(ctx) -> FilterResult:
    """03_filter: score every completion of the round with the base model (``ctx.base()``: no
    adapters, no steering hooks: perplexity is measured against what the untouched model finds
    natural), decide keep/drop, write ``completions`` and ``filter_summary`` (NaN written as null).

    Call :func:`require_min_train` afterwards to stop a round with too few rows kept.
    """
    model, tok = ctx.base()
    cfg = ctx.cfg
    t0 = time.time()
    th = FilterThresholds.from_config(cfg)
    rows = read_jsonl(ctx.artifact("generated"), "completions (run 02_generate first)")
    if not rows:
        raise TooFewKept(f"{ctx.artifact('generated')} has no rows: 02_generate produced nothing")
    kw = dict(persona_pos=cfg.pos_persona, persona_neg=cfg.neg_persona, batch_size=cfg.batch_size)
    scored = filter_rows(rows, th, model=model, tokenizer=tok, prompts=[r["prompt_text"] for r in rows], **kw)
    atomic_write_jsonl(ctx.artifact("completions"), scored)
    t1 = time.time()
    # The base model and the thresholds do not change between rounds, so neither does the
    # labelled-set result: round 0's is reused when its thresholds match.
    first = ctx.artifact("filter_summary", 0)
    cached = read_json(first, "round 0's filter summary") if ctx.round > 0 and first.exists() else None
    if cached and cached.get("thresholds") == _finite_or_none(dataclasses.asdict(th)) and cached.get("labelled"):
        pr, lab_scored = cached["labelled"], []
    else:
        lab = labelled_rows()
        lab_scored = filter_rows(lab, th, model=model, tokenizer=tok,
                                 prompts=[render_prompt(tok, r["prompt"]) for r in lab], **kw)
        pr = precision_recall(lab_scored)
    summary = {
        "round": ctx.round, "n": len(scored), "n_kept": sum(r["keep"] for r in scored),
        "reasons": reason_counts(scored), "min_train": cfg.min_train, "thresholds": dataclasses.asdict(th),
        "labelled": pr, "seconds": {"completions": round(t1 - t0, 2), "labelled": round(time.time() - t1, 2)},
    }
    atomic_write_json(ctx.artifact("filter_summary"), _finite_or_none(summary))
    return FilterResult(scored, summary, lab_scored)


def require_min_train(result: FilterResult) -> None:
    """Raise :class:`TooFewKept` (counts per reason in the message) when fewer than ``min_train`` were kept."""
    summary = result.summary
    if summary["n_kept"] < summary["min_train"]:
        counts = ", ".join(f"{k}: {v}" for k, v in summary["reasons"].items())
        raise TooFewKept(
            f"round {summary['round']}: the filter kept {summary['n_kept']} of {summary['n']} completions, fewer "
            f"than min_train={summary['min_train']} ({counts}). Lower the dose (calib_target up or calib_hi down), "
            f"loosen the thresholds that fire most, or raise gen_budget.")
