"""The filter's gates: its thresholds (the config's ``filter`` knobs), the drop reasons in the order
they are checked, and :func:`decide`. Change a gate here (and its knob in ``config.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .. import config as C

# Checked in this order; the first that fires is the reason. Unambiguous content failures
# (nothing there, a refusal, persona narration) come before shape failures, and the specific
# degeneration detectors come before the generic repetition gate so the reason says *what*
# broke. Model-based gates come last because they are optional, boilerplate last of all
# because it is the mildest fault.
DROP_REASONS: tuple[str, ...] = (
    "empty",             # fewer than min_words words
    "refusal",           # a refusal phrase ("I can't help with that", "As an AI ... I cannot")
    "narration",         # describes being the persona instead of acting it out
    "degenerate_loop",   # verbatim loop: long repeated substring, or a tail that only repeats
    "affect_loop",       # exclamation soup: interjections and endearments dominate a window
    "token_soup",        # non-words, mixed scripts, or a word salad with no function words
    "drift",             # one clause skeleton repeating with small changes
    "repetition",        # n-gram repeats (the precursor's gate), low windowed diversity, compressibility
    "off_topic",         # fluent but unrelated to the prompt (steering pushes towards generic warm prose)
    "high_perplexity",   # base model's tail perplexity too high (model scores only)
    "entropy_collapse",  # base model near-certain on repeated tokens (model scores only)
    "boilerplate",       # assistant boilerplate ("I hope this helps", "feel free to ask")
)


THRESHOLD_KEYS: tuple[str, ...] = tuple(k for k in C.section_keys("filter") if k != "min_train")
"""The gates: every knob of the config's ``filter`` section but ``min_train`` (a stop rule, not a gate)."""


def _from_config(cls, cfg: Any) -> "FilterThresholds":
    """Build from any object carrying attributes of the same names; missing ones default."""
    return cls(**{k: getattr(cfg, k, C.default(k)) for k in THRESHOLD_KEYS})


FilterThresholds = dataclasses.make_dataclass(
    "FilterThresholds",
    [(k, C.knob_field(k).type, dataclasses.field(default=C.default(k))) for k in THRESHOLD_KEYS],
    namespace={"from_config": classmethod(_from_config),
               "__doc__": "Gates of `decide`: the config's filter knobs (same names, defaults and help: "
                          "`steerheal config`). A completion is dropped when a score crosses its gate."})
FilterThresholds.__module__ = __name__


# (score key, FilterThresholds field, "max" = drop above / "min" = drop below, log-scale axis)
GATES: tuple[tuple[str, str, str, bool], ...] = (
    ("tail_ppl", "max_tail_ppl", "max", True),
    ("ngram_repeat", "max_ngram_repeat", "max", False),
    ("word_repeat_2", "max_bigram_repeat", "max", False),
    ("lrs_frac", "max_lrs_frac", "max", False),
    ("tail_repeat", "max_tail_repeat", "max", False),
    ("min_window_distinct", "min_window_distinct", "min", False),
    ("compression_ratio", "max_compression_ratio", "max", False),
    ("affect_frac", "max_affect", "max", False),
    ("nonword_frac", "max_nonword_frac", "max", False),
    ("min_window_function", "min_function_frac", "min", False),
    ("drift", "max_drift", "max", False),
    ("entropy_collapse", "max_entropy_collapse", "max", False),
)

# decide() reasons that mean "the text loops or falls apart" (the loop detector of Q1 and the study)
LOOP_REASONS = ("degenerate_loop", "affect_loop", "token_soup", "drift", "repetition", "entropy_collapse")


def _gt(scores: dict, key: str, limit: float) -> bool:
    v = scores.get(key)
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v > limit


def _lt(scores: dict, key: str, limit: float) -> bool:
    v = scores.get(key)
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v < limit


def decide(scores: dict[str, Any], thresholds: FilterThresholds | None = None) -> str:
    """Return "keep" or the first reason of DROP_REASONS whose gate fires.

    Missing or None scores skip their gate, so text-only scores give a text-only decision and
    the model gates (high_perplexity, entropy_collapse) only act when model scores are present.
    With thresholds.strict False only the precursor's gates run (no words, refusal, narration
    regex, n-gram repeat, tail perplexity): an ablation baseline, and a keep-almost-everything
    mode for random-init test models.
    """
    t = thresholds or FilterThresholds()
    s = scores
    n_words = s.get("n_words", 0) or 0
    if n_words < (t.min_words if t.strict else 1):
        return "empty"
    if s.get("refusal"):
        return "refusal"
    if s.get("narration_regex") or t.strict and (
        _gt(s, "narration_self", t.narration_overlap - 1e-9)
        or _gt(s, "narration_pos", t.narration_paraphrase - 1e-9)
        or _gt(s, "narration_neg", t.narration_paraphrase - 1e-9)
    ):
        return "narration"
    if t.strict:
        # Verbatim loops first: a long repeated substring or a tail that only repeats.
        if _gt(s, "lrs_frac", t.max_lrs_frac) or _gt(s, "tail_repeat", t.max_tail_repeat):
            return "degenerate_loop"
        if _gt(s, "affect_frac", t.max_affect) or _gt(s, "exclaim_rate", t.max_exclaim_rate):
            return "affect_loop"
        if (
            _gt(s, "nonword_frac", t.max_nonword_frac)
            or _gt(s, "script_mix", t.max_script_mix)
            or _lt(s, "min_window_function", t.min_function_frac)
        ):
            return "token_soup"
        if _gt(s, "drift", t.max_drift):
            return "drift"
    if _gt(s, "ngram_repeat", t.max_ngram_repeat) or t.strict and (
        _lt(s, "min_window_distinct", t.min_window_distinct)
        or _gt(s, "word_repeat_2", t.max_bigram_repeat)
        or _gt(s, "char_repeat", t.max_char_repeat)
        or _gt(s, "compression_ratio", t.max_compression_ratio)
    ):
        return "repetition"
    if t.strict and _lt(s, "prompt_overlap", t.min_prompt_overlap):
        return "off_topic"
    if _gt(s, "tail_ppl", t.max_tail_ppl):
        return "high_perplexity"
    if t.strict:
        if _gt(s, "entropy_collapse", t.max_entropy_collapse):
            return "entropy_collapse"
        if (s.get("boilerplate_hits") or 0) >= t.max_boilerplate_hits:
            return "boilerplate"
    return "keep"


def loop_reason(scores: dict[str, Any], thresholds: FilterThresholds, *, perplexity_gate: bool = True) -> str | None:
    """The loop detector alone: the :data:`LOOP_REASONS` reason :func:`decide` gives a scored row with
    the gates before the loop gates switched off (length, refusal, narration), else None.

    ``perplexity_gate=False`` also switches the tail-perplexity gate off (the study's strict loop
    rate); with it on (heal's Q1), a high tail perplexity is the verdict and hides a later
    ``entropy_collapse``.
    """
    shape = {**scores, "refusal": False, "narration_regex": False, "narration_self": 0.0, "narration_pos": 0.0,
             "narration_neg": 0.0, "n_words": max(scores.get("n_words") or 0, thresholds.min_words)}
    if not perplexity_gate:
        shape.update(tail_ppl=None, boilerplate_hits=0)
    r = decide(shape, thresholds)
    return r if r in LOOP_REASONS else None
