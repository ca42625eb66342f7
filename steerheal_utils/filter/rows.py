"""Rows in, rows out: score and decide every completion; measure the decision on the labelled set.

A row is a dict with ``completion`` (and ``prompt`` / ``prompt_text`` / ``completion_ids`` when
02 wrote it); :func:`filter_rows` returns it with every score, ``reason`` and ``keep`` added.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from .. import datafiles
from ..config import NEG_PERSONA, POS_PERSONA
from .gates import DROP_REASONS, FilterThresholds, decide
from .model import empty_model_scores, model_scores
from .text import prompt_overlap, text_scores


def filter_rows(
    rows: list[dict[str, Any]],
    thresholds: FilterThresholds | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompts: list[str] | None = None,
    *,
    persona_pos: str = POS_PERSONA,
    persona_neg: str = NEG_PERSONA,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Score and decide every row; returns new dicts with all scores, "reason" and "keep".

    Rows need "completion". With a model, the rendered prompt comes from `prompts` or each row's
    "prompt_text"; without one the model score keys are present and None. The model scores the
    ids that were sampled (a row's "completion_ids", as 02 writes them); only rows without them
    (the shipped labelled set) are scored on their tokenized text. The text gates read the text.
    """
    t = thresholds or FilterThresholds()
    completions = [r.get("completion") or "" for r in rows]
    if model is not None:
        if tokenizer is None:
            raise ValueError("model scoring needs the tokenizer")
        if prompts is None:
            missing = [i for i, r in enumerate(rows) if "prompt_text" not in r]
            if missing:
                raise ValueError(f"rows {missing[:5]}... lack 'prompt_text' and no prompts given")
            prompts = [r["prompt_text"] for r in rows]
        m_scores = model_scores(
            model, tokenizer, list(prompts), completions,
            tail_frac=t.tail_frac, batch_size=batch_size, entropy_floor=t.entropy_floor,
            completion_ids=[r.get("completion_ids") for r in rows],
        )
    else:
        m_scores = [empty_model_scores() for _ in rows]
    out = []
    for row, comp, ms in zip(rows, completions, m_scores):
        scores = text_scores(comp, persona_pos=persona_pos, persona_neg=persona_neg)
        scores["prompt_overlap"] = prompt_overlap(row["prompt"], comp) if row.get("prompt") else None
        scores.update(ms)
        reason = decide(scores, t)
        out.append({**row, **scores, "reason": reason, "keep": reason == "keep"})
    return out


def precision_recall(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of the keep decision on rows carrying gold "expect" ("keep"/"drop") and "label".

    keep is the positive class: precision = kept rows that should be kept / kept rows;
    recall = kept rows that should be kept / rows that should be kept. degenerate_recall is the
    fraction of rows labelled "degenerate*" that were dropped. per_label maps each label to
    n, dropped, drop_rate and a count of reasons.
    """
    rows = list(rows)
    tp = sum(1 for r in rows if r["keep"] and r["expect"] == "keep")
    fp = sum(1 for r in rows if r["keep"] and r["expect"] != "keep")
    fn = sum(1 for r in rows if not r["keep"] and r["expect"] == "keep")
    tn = sum(1 for r in rows if not r["keep"] and r["expect"] != "keep")
    degen = [r for r in rows if str(r.get("label", "")).startswith("degenerate")]
    per_label: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = per_label.setdefault(r.get("label", "?"), {"n": 0, "dropped": 0, "reasons": Counter()})
        d["n"] += 1
        d["dropped"] += int(not r["keep"])
        d["reasons"][r.get("reason", "keep" if r["keep"] else "?")] += 1
    for d in per_label.values():
        d["drop_rate"] = d["dropped"] / d["n"]
        d["reasons"] = dict(d["reasons"])
    nan = float("nan")
    return {
        "n": len(rows),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "accuracy": (tp + tn) / len(rows) if rows else nan,
        "degenerate_recall": sum(1 for r in degen if not r["keep"]) / len(degen) if degen else nan,
        "per_label": per_label,
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of precision_recall's output."""
    lines = [
        f"n={report['n']}  keep precision={report['precision']:.3f}  keep recall="
        f"{report['recall']:.3f}  degenerate recall={report['degenerate_recall']:.3f}  "
        f"accuracy={report['accuracy']:.3f}",
        f"{'label':<30}{'n':>4}{'drop':>6}{'rate':>7}  reasons",
    ]
    for label in sorted(report["per_label"]):
        d = report["per_label"][label]
        reasons = ", ".join(f"{k}:{v}" for k, v in sorted(d["reasons"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{label:<30}{d['n']:>4}{d['dropped']:>6}{d['drop_rate']:>7.2f}  {reasons}")
    return "\n".join(lines)


def reason_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts per reason, "keep" first, then in DROP_REASONS order (zeros left out)."""
    c = Counter(r["reason"] for r in rows)
    return {k: c[k] for k in ("keep", *DROP_REASONS, *sorted(set(c) - {"keep", *DROP_REASONS})) if c.get(k)}


def labelled_rows() -> list[dict[str, Any]]:
    """The shipped hand-labelled completions (id, prompt, completion, label, expect)."""
    return datafiles.rows("filter_labelled.jsonl")
