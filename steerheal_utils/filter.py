"""Stage 3 of steer -> generate -> filter -> heal -> eval: decide which steered completions are
fit to train on.

The precursor kept a completion iff tail perplexity under the base model < 50, max n-gram repeat
fraction < 0.3, and no narration / refusal regex hit. That leaked: token soup and affect loops
("oh my sweet darling oh GOD oh please...") passed at perplexity 2-17 and repeat fraction
0.04-0.27, because a *low-perplexity* loop is exactly what a steered model produces confidently.
So this module leans on model-free shape signals that do not care how confident the model was:
windowed lexical diversity, longest repeated substring, compression, tail-local repetition,
function-word and script statistics, an affect lexicon, and clause-skeleton similarity. The base
model's scores (tail perplexity, entropy collapse) are an extra gate, never the only one.

Public API (pure functions first):
    text_scores(completion, ...)          -> dict of model-free signals
    model_scores(model, tok, prompts, completions, ...) -> list of dicts (base-LM signals)
    decide(scores, thresholds)            -> "keep" or one reason from DROP_REASONS
    filter_rows(rows, thresholds, model=None, tokenizer=None, prompts=None) -> rows + scores
    precision_recall(rows)                -> metrics of the keep decision against gold labels
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "DEFAULT_PERSONA_POS",
    "DEFAULT_PERSONA_NEG",
    "DROP_REASONS",
    "MODEL_SCORE_KEYS",
    "FilterThresholds",
    "text_scores",
    "model_scores",
    "decide",
    "filter_rows",
    "precision_recall",
    "format_report",
    # 03_filter stage glue (section 6)
    "GATES",
    "TooFewKept",
    "labelled_rows",
    "reason_counts",
    "run_stage",
    "require_min_train",
    "figures",
    "browser",
]

DEFAULT_PERSONA_POS = "someone who looks after others' wellbeing even when it means defying authority"
DEFAULT_PERSONA_NEG = "someone who defers to authority even when others' wellbeing suffers for it"

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

MODEL_SCORE_KEYS: tuple[str, ...] = (
    "n_completion_tokens",
    "mean_nll",
    "tail_nll",
    "ppl",
    "tail_ppl",
    "mean_entropy",
    "tail_entropy",
    "entropy_collapse",
)


@dataclass
class FilterThresholds:
    """Gates of `decide`. A completion is dropped when a score crosses its gate."""

    strict: bool = True  # all gates; False = only the precursor's (ablation, random-init models)
    min_words: int = 8  # fewer words than this is "empty" (strict mode; otherwise 1)
    max_ngram_repeat: float = 0.3  # word 3-gram repeat fraction (the precursor's gate)
    max_bigram_repeat: float = 0.45  # word 2-gram repeat fraction (drifting loops keep bigrams)
    max_char_repeat: float = 0.5  # character 12-gram repeat fraction
    max_compression_ratio: float = 3.0  # raw bytes / zlib bytes; loops compress well
    max_lrs_frac: float = 0.2  # longest repeated substring as a fraction of the text
    min_window_distinct: float = 0.5  # min distinct-1 over any 40-word window
    max_tail_repeat: float = 0.5  # 3-gram repeat fraction within the last 40% of words
    max_affect: float = 0.22  # max fraction of affect words (oh, darling, please...) in a window
    max_exclaim_rate: float = 0.12  # exclamation marks per word
    max_nonword_frac: float = 0.2  # fraction of whitespace tokens that are not clean words
    max_script_mix: float = 0.05  # fraction of letters outside the dominant script
    min_function_frac: float = 0.18  # min fraction of function words in any 40-word window
    max_drift: float = 0.5  # fraction of clauses whose skeleton closely matches an earlier one
    narration_overlap: float = 0.6  # persona word overlap of a self-describing sentence
    narration_paraphrase: float = 0.8  # persona word overlap of any sentence (a near paraphrase)
    max_boilerplate_hits: int = 2  # this many boilerplate phrases or more is "boilerplate"
    min_prompt_overlap: float = 0.1  # fraction of the prompt's content words the completion uses
    max_tail_ppl: float = 50.0  # base-model perplexity over the completion's tail
    max_entropy_collapse: float = 0.15  # fraction of positions both low-entropy and repeated
    tail_frac: float = 0.25  # fraction of completion tokens that counts as the tail
    entropy_floor: float = 2.0  # entropy (nats) under which the base model counts as certain

    @classmethod
    def from_config(cls, cfg: Any) -> "FilterThresholds":
        """Build from any object carrying attributes of the same names; missing ones default.

        The central config can then hold these keys flat (no "filter_" prefix) and any subset.
        """
        kwargs = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            kwargs[f.name] = getattr(cfg, f.name, default)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# lexicons and patterns
# --------------------------------------------------------------------------------------------

# English function words: natural prose is ~40-55% of these; token soup and word salad are not.
_FUNCTION_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves i'm i'd i'll i've it's don't won't can't isn't wasn't doesn't didn't couldn't
    wouldn't shouldn't that's there's they're we're you're let's let also even still may might
    must shall yet though although whether either neither one something someone anyone
    anything nothing everyone everything ever never always""".split()
)

# Interjections and endearments: the vocabulary of the precursor's affect loops. "my" and "no"
# are deliberately absent: they are ordinary words whose density says little on its own.
_AFFECT_WORDS = frozenset(
    """oh ohh ohhh ah ahh ahhh aah god gods goodness gosh please darling darlings sweet sweetie
    sweetheart love lovely beloved baby babe honey dear dearest precious angel heaven heavens
    yes yess yesss wow omg jesus lord mercy sob sobs cry crying tears heart hug hugs kiss
    kisses xoxo mmm hmm aww awww whoa noo nooo sweetest""".split()
)

_NARRATION_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        # "As someone who looks after..." but not "As someone who has worked nights..."
        r"\bas (?:someone|somebody|a person|an? (?:\w+ ){1,3}(?:person|individual|soul|being))"
        r" (?:who|that)\b(?! (?:has|had|was|were|used|once|worked|grew|spent)\b)",
        r"\bI(?:'m| am) (?:just |simply |truly |really |fundamentally |basically )?"
        r"(?:someone|somebody|a person|an? (?:\w+ ){1,2}(?:person|individual|soul|being)"
        r"|the (?:kind|sort|type) of (?:person|individual|soul|being))"
        r" (?:who|that)\b",
        r"\b(?:kind|sort|type) of (?:person|individual|soul) (?:who|that)\b",
        r"\bmy (?:core |deepest |guiding )?(?:values|principles|nature|character|personality"
        r"|identity|persona) as\b",
        r"\b(?:it is|it's) (?:simply |just )?(?:in )?my (?:very )?nature\b",
        r"\bpeople like me\b",
        r"\bmy (?:whole |entire |very )?(?:identity|character|personality|persona|being|"
        r"existence) (?:is|revolves|centers|centres|rests)\b",
        r"\bthat(?:'s| is) (?:just |simply )?(?:who|what) I am\b",
        r"\bI(?:'m| am) (?:defined|driven|guided|characterized|characterised) by\b",
        r"\bas an? (?:caring|compassionate|deferential|obedient|rebellious|principled) "
        r"(?:person|individual|soul|being)\b",
        r"\b(?:this|which) is (?:the|a) (?:core )?(?:part|essence) of who I am\b",
        r"\bmy (?:persona|role as)\b",
    )
)

# Self-description cues: with a moderate persona overlap they turn a sentence into narration.
_SELF_DESCRIPTION = re.compile(
    r"\b(?:i am|i'm|i have always|i've always|i always|i never|my (?:values?|nature|principles?"
    r"|priority|priorities|character|instinct)|who i am|defines? me|define me|person|kind of|"
    r"sort of|type of)\b",
    re.IGNORECASE,
)

_REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bI(?:'m| am) sorry,? but I(?:'m| am)? ?(?:can(?:no|')?t|cannot|unable|not able|"
        r"won't)\b",
        r"\bI (?:can(?:'|no)?t|cannot|won't|am unable to) (?:help|assist)(?: you)? with (?:that|this)"
        r"(?: request| question)?\s*[.!]",
        r"\bas an? (?:AI|artificial intelligence)(?: language model| assistant| model)?,? I "
        r"(?:can(?:'|no)?t|cannot|do not|don't|am not able|am unable|'m not able|must not)\b",
        r"\bI(?:'m| am) (?:not able|unable) to (?:help|assist|provide|give|offer|make|answer|"
        r"advise|take sides)\b",
        r"\bI (?:can(?:'|no)?t|cannot) (?:provide|give|offer) (?:\w+ )?(?:advice|guidance|"
        r"opinions?|recommendations?)\b",
        r"\bI do(?:n't| not) have (?:personal )?(?:opinions|feelings|beliefs|experiences|"
        r"the ability)\b",
        r"\bI(?:'m| am) (?:just )?an? (?:AI|language model|virtual assistant)\b",
        r"\bI (?:must|have to) (?:respectfully )?decline\b",
    )
)

_BOILERPLATE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bI hope (?:this|that) helps\b",
        r"\blet me know if (?:you )?(?:have|need)\b",
        r"\bfeel free to\b",
        r"\bis there anything else\b",
        r"\bgreat question\b",
        r"\bcertainly!? here(?:'s| is)\b",
        r"\bas an? (?:AI|artificial intelligence)\b",
        r"\bI(?:'m| am) (?:always )?(?:here|happy|glad) to help\b",
        r"\bif you have any (?:other |more |further )?questions\b",
        r"\bultimately, the (?:decision|choice) is (?:yours|up to you)\b",
        r"\bit(?:'s| is) (?:always )?important to (?:remember|note|consider) that\b",
        r"\bin (?:summary|conclusion),",
    )
)

_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE_SPLIT_RE = re.compile(r"[.!?;:,\n\u2014]+|\s+-\s+")
# A "clean" whitespace token: a plain word with optional punctuation around it, a number, or a
# list marker. Sub-word debris (camelCase joins, byte-level markers, code tokens) is not.
_CLEAN_TOKEN_RE = re.compile(
    r"^[\"'(\[\u201c\u2018*]*(?:"
    r"[^\W\d_]+(?:['\u2019\-][^\W\d_]+)*['\u2019]?"  # words, contractions, hyphenations
    r"|[$\u00a3\u20ac]?\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th|s|am|pm)?"  # numbers, times, money
    r"|\d+[.)]|[-*\u2022]"  # list markers
    r")[\"')\]\u201d\u2019*]*[.,;:!?]*[\"')\]\u201d\u2019*]*$"
)
_CAMEL_RE = re.compile(r"[a-z][A-Z]")


# --------------------------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def _ngram_repeat_frac(seq: Sequence[Any], n: int) -> float:
    """Fraction of n-grams that already occurred earlier in the sequence (0 = all new)."""
    total = len(seq) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple] = set()
    repeats = 0
    for i in range(total):
        g = tuple(seq[i : i + n])
        if g in seen:
            repeats += 1
        else:
            seen.add(g)
    return repeats / total


def _distinct_n(seq: Sequence[Any], n: int) -> float:
    total = len(seq) - n + 1
    if total <= 0:
        return 1.0
    return len({tuple(seq[i : i + n]) for i in range(total)}) / total


def _windows(seq: Sequence[Any], size: int = 40, stride: int = 10) -> list[Sequence[Any]]:
    """Sliding windows; one window (the whole sequence) when it is shorter than `size`."""
    if len(seq) <= size:
        return [seq]
    starts = list(range(0, len(seq) - size + 1, stride))
    if starts[-1] != len(seq) - size:
        starts.append(len(seq) - size)
    return [seq[s : s + size] for s in starts]


def _longest_repeated_substring(s: str) -> int:
    """Length of the longest substring occurring at least twice (overlaps allowed).

    Binary search on the length is valid because a repeat of length L implies one of L - 1.
    """
    n = len(s)
    if n < 2:
        return 0

    def has_repeat(length: int) -> bool:
        seen: set[str] = set()
        for i in range(n - length + 1):
            sub = s[i : i + length]
            if sub in seen:
                return True
            seen.add(sub)
        return False

    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if has_repeat(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _compression_ratio(s: str) -> float:
    raw = s.encode("utf-8")
    if not raw:
        return 0.0
    return len(raw) / len(zlib.compress(raw, 9))


def _script(ch: str) -> str:
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "UNKNOWN"
    return name.split(" ", 1)[0]


def _stem(word: str) -> str:
    """Crude suffix stripping so "defies"/"defying"/"defy" and "others'"/"others" meet."""
    w = word.lower().strip("'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ying", "y"), ("ing", ""), ("ed", ""),
                         ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) + len(repl) >= 4:
            w = w[: len(w) - len(suffix)] + repl
            if suffix in ("ing", "ed") and len(w) >= 2 and w[-1] == w[-2] and w[-1] not in "aeiouls":
                w = w[:-1]  # "deferring" -> "defer"
            break
    return w


_PERSONA_STOP = _FUNCTION_WORDS | {"someone", "somebody", "mean", "means", "meaning", "it"}


def _content_stems(text: str) -> set[str]:
    text = re.sub(r"(\w)-(\w)", r"\1\2", text.lower())  # "well-being" == "wellbeing"
    return {_stem(w) for w in _words(text) if w not in _PERSONA_STOP and len(w) > 1}


def prompt_overlap(prompt: str, completion: str) -> float:
    """Fraction of the prompt's content-word stems that the completion uses.

    A cheap relevance check: steered small models drift into fluent prose about nothing in
    particular ("our team, our family, every moment..."), which every shape gate passes. On the
    labelled set coherent answers use 0.15-0.86 of the prompt's content words.
    """
    p = _content_stems(prompt)
    return len(p & _content_stems(completion)) / len(p) if p else 1.0


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT_RE.split(text) if s.strip()]


def _clauses(text: str) -> list[list[str]]:
    """Clauses as word lists; run-ons without punctuation are chunked so loops still split."""
    out: list[list[str]] = []
    for part in _CLAUSE_SPLIT_RE.split(text):
        w = _words(part)
        if not w:
            continue
        for i in range(0, len(w), 16):
            chunk = w[i : i + 16]
            if len(chunk) >= 3 or not out:
                out.append(chunk)
    return out


def _drift_score(text: str) -> float:
    """Fraction of clauses (of >= 3 words) whose bag of words closely matches an earlier clause.

    A drifting loop ("I would help the family because the family needs help, and I would help
    the child because the child needs...") keeps its skeleton while one or two slot words change,
    so exact n-gram repeats stay moderate but clause-to-clause Jaccard stays high.
    """
    clauses = [c for c in _clauses(text) if len(c) >= 3]
    if len(clauses) < 3:
        return 0.0
    bags = [set(c) for c in clauses]
    hits = 0
    for i in range(1, len(bags)):
        best = max(len(bags[i] & bags[j]) / len(bags[i] | bags[j]) for j in range(i))
        if best >= 0.5:
            hits += 1
    return hits / (len(bags) - 1)


def _persona_overlaps(text: str, persona_pos: str, persona_neg: str) -> tuple[float, float, float]:
    """Per-sentence share of each persona sentence's content words found in the completion.

    Returns (best overlap with pos, best with neg, best with either among sentences that
    describe the self in the first person). A word-overlap stand-in for a semantic check: a
    completion that *states* the persona ("I always look after others' wellbeing, even if it
    means defying authority") reuses its content words; one that *acts* it talks about the
    manager, the patient, the deadline.
    """
    pos, neg = _content_stems(persona_pos), _content_stems(persona_neg)
    best_pos = best_neg = best_self = 0.0
    for sent in _sentences(text):
        stems = _content_stems(sent)
        op = len(stems & pos) / max(1, len(pos))
        on = len(stems & neg) / max(1, len(neg))
        best_pos, best_neg = max(best_pos, op), max(best_neg, on)
        if re.search(r"\b(?:i|i'm|me|my|myself)\b", sent, re.IGNORECASE) and _SELF_DESCRIPTION.search(sent):
            best_self = max(best_self, op, on)
    return best_pos, best_neg, best_self


# --------------------------------------------------------------------------------------------
# 1. model-free scores
# --------------------------------------------------------------------------------------------


def text_scores(
    completion: str,
    *,
    persona_pos: str = DEFAULT_PERSONA_POS,
    persona_neg: str = DEFAULT_PERSONA_NEG,
    window: int = 40,
) -> dict[str, float | bool | int]:
    """Model-free signals of one completion.

    Returned keys (fractions are in [0, 1] unless noted):
      n_words, n_chars
      word_repeat_2/3/4: fraction of word n-grams that repeat an earlier one
      ngram_repeat: max of word_repeat_3 and word_repeat_4 (the precursor's gate)
      char_repeat: fraction of character 12-grams that repeat an earlier one
      compression_ratio: raw bytes / zlib bytes (>= ~0.8; loops score high)
      distinct_1, distinct_2: distinct word n-grams / total
      min_window_distinct: min distinct-1 over 40-word windows (a loop anywhere drags it down)
      lrs_frac: longest repeated substring (case- and space-normalised) / length
      tail_repeat: word 3-gram repeat fraction over the last 40% of words, counting repeats of
        n-grams seen anywhere earlier (catches "starts fine, then collapses")
      affect_frac: max over windows of the affect-word fraction; exclaim_rate: '!' per word
      caps_frac: fraction of words of >= 3 letters written in capitals
      nonword_frac: fraction of whitespace tokens that are not clean words / numbers / markers
      script_mix: fraction of letters outside the text's dominant script
      function_frac: function-word fraction; min_window_function: its minimum over windows
      drift: see _drift_score
      narration_regex (bool), narration_pos / narration_neg: best per-sentence fraction of the
        persona sentence's content words present; narration_self (bool): such a sentence also
        describes the self ("I am", "I always", "my values", "person"...)
      refusal (bool), boilerplate_hits (int)
    """
    text = completion or ""
    words = _words(text)
    n = len(words)
    norm = re.sub(r"\s+", " ", text.lower()).strip()

    word_rep = {k: _ngram_repeat_frac(words, k) for k in (2, 3, 4)}
    wins = _windows(words, window)

    tail_start = int(n * 0.6)
    tail_repeat = 0.0
    if n - tail_start >= 6:
        seen = {tuple(words[i : i + 3]) for i in range(0, max(0, tail_start - 2))}
        total = reps = 0
        for i in range(tail_start, n - 2):
            g = tuple(words[i : i + 3])
            total += 1
            if g in seen:
                reps += 1
            seen.add(g)
        tail_repeat = reps / total if total else 0.0

    tokens = text.split()
    nonword = sum(
        1 for t in tokens if not _CLEAN_TOKEN_RE.match(t) or _CAMEL_RE.search(t.strip("\"'.,;:!?()"))
    )
    scripts = Counter(_script(ch) for ch in text if ch.isalpha())
    n_letters = sum(scripts.values())
    script_mix = 1.0 - scripts.most_common(1)[0][1] / n_letters if n_letters else 0.0

    def func_frac(ws: Sequence[str]) -> float:
        return sum(w in _FUNCTION_WORDS for w in ws) / len(ws) if ws else 0.0

    def affect(ws: Sequence[str]) -> float:
        return sum(w in _AFFECT_WORDS for w in ws) / len(ws) if ws else 0.0

    letters_words = [t.strip("\"'.,;:!?()") for t in tokens]
    caps = sum(1 for w in letters_words if len(w) >= 3 and w.isalpha() and w.isupper())

    narr_regex = any(p.search(text) for p in _NARRATION_PATTERNS)
    narr_pos, narr_neg, narr_self = _persona_overlaps(text, persona_pos, persona_neg)

    return {
        "n_words": n,
        "n_chars": len(text),
        "word_repeat_2": word_rep[2],
        "word_repeat_3": word_rep[3],
        "word_repeat_4": word_rep[4],
        "ngram_repeat": max(word_rep[3], word_rep[4]),
        "char_repeat": _ngram_repeat_frac(norm, 12),
        "compression_ratio": _compression_ratio(norm),
        "distinct_1": _distinct_n(words, 1),
        "distinct_2": _distinct_n(words, 2),
        "min_window_distinct": min(_distinct_n(w, 1) for w in wins) if words else 1.0,
        "lrs_frac": _longest_repeated_substring(norm) / len(norm) if norm else 0.0,
        "tail_repeat": tail_repeat,
        "affect_frac": max(affect(w) for w in wins) if words else 0.0,
        "exclaim_rate": text.count("!") / max(1, n),
        "caps_frac": caps / max(1, n),
        "nonword_frac": nonword / len(tokens) if tokens else 0.0,
        "script_mix": script_mix,
        "function_frac": func_frac(words),
        "min_window_function": min(func_frac(w) for w in wins) if words else 0.0,
        "drift": _drift_score(text),
        "narration_regex": narr_regex,
        "narration_pos": narr_pos,
        "narration_neg": narr_neg,
        "narration_self": narr_self,
        "refusal": any(p.search(text) for p in _REFUSAL_PATTERNS),
        "boilerplate_hits": sum(1 for p in _BOILERPLATE_PATTERNS if p.search(text)),
    }


# --------------------------------------------------------------------------------------------
# 2. base-model scores
# --------------------------------------------------------------------------------------------


def _repeat_mask(ids: Sequence[int], n: int = 3) -> list[bool]:
    """True at position t when the token n-gram ending at t already ended at an earlier position.

    Single-token repeats are useless ("the", ","): a repeated 3-gram is what a loop looks like.
    """
    seen: set[tuple[int, ...]] = set()
    out = []
    for t in range(len(ids)):
        if t + 1 < n:
            out.append(False)
            continue
        g = tuple(ids[t + 1 - n : t + 1])
        out.append(g in seen)
        seen.add(g)
    return out


def _empty_model_scores(n_tokens: int = 0) -> dict[str, Any]:
    d: dict[str, Any] = {k: None for k in MODEL_SCORE_KEYS}
    d["n_completion_tokens"] = n_tokens
    return d


def model_scores(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    *,
    tail_frac: float = 0.25,
    batch_size: int = 8,
    entropy_floor: float = 2.0,
    completion_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[dict[str, Any]]:
    """Score completions under a (base, unsteered) HF causal LM.

    `prompts` are already-rendered chat prompts (the caller applies the chat template). Prompt
    and completion are tokenized separately without special tokens and their ids concatenated,
    so the completion boundary is exact rather than re-inferred from a joint tokenization.
    `completion_ids` (one entry per completion, None for "tokenize the text") are the ids that
    were sampled: when given they are scored instead of the re-tokenized text, which can split
    words differently and loses special tokens sampled mid-completion.

    Per completion (None for a completion with no tokens):
      n_completion_tokens
      mean_nll, ppl: mean NLL of all completion tokens and exp of it
      tail_nll, tail_ppl: the same over the last ceil(tail_frac * n) completion tokens
      mean_entropy, tail_entropy: mean entropy (nats) of the model's next-token distribution at
        the positions predicting completion tokens (all / tail)
      entropy_collapse: fraction of completion positions where that entropy < entropy_floor AND
        the token closes a repeated token 3-gram: a confident loop, which perplexity rewards.
        The floor is not tiny because small models keep a long tail: SmolLM2-135M sits at
        1.5-1.8 nats inside a "the the the" loop while giving the next "the" p ~ 0.75. With
        2.0 nats, hand-written coherent answers and its own samples scored <= 0.08, verbatim
        loops 0.66-0.80, drifting loops 0.24-0.46 (affect loops ~0: the text gates catch those).

    Batched with left padding and position_ids = cumsum(mask) - 1 (clamped at 0), so each row
    sees the same positions as it would alone; everything after the forward is float32.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if not 0.0 < tail_frac <= 1.0:
        raise ValueError(f"tail_frac must be in (0, 1], got {tail_frac}")

    if completion_ids is not None and len(completion_ids) != len(completions):
        raise ValueError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
    encoded = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"] if p else []
        sampled = completion_ids[i] if completion_ids is not None else None
        if sampled is not None:
            c_ids = sampled
        else:
            c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] if c else []
        encoded.append((list(p_ids), list(c_ids)))

    results: list[dict[str, Any] | None] = [None] * len(encoded)
    todo = []
    for i, (p_ids, c_ids) in enumerate(encoded):
        if not c_ids:
            results[i] = _empty_model_scores(0)
        elif not p_ids:
            # The first completion token has no context to be predicted from; score the rest.
            if len(c_ids) < 2:
                results[i] = _empty_model_scores(len(c_ids))
            else:
                todo.append(i)
        else:
            todo.append(i)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    device = next(model.parameters()).device

    # Length-sorted batches waste less compute on padding; results go back by index.
    todo.sort(key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    with torch.inference_mode():
        for b0 in range(0, len(todo), batch_size):
            idx = todo[b0 : b0 + batch_size]
            seqs = [encoded[i][0] + encoded[i][1] for i in idx]
            # positions of the completion tokens that are actually predicted (needs a left token)
            n_pred = [len(encoded[i][1]) if encoded[i][0] else len(encoded[i][1]) - 1 for i in idx]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                attn[r, width - len(s) :] = 1
            position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
            # Left padding puts every completion at the right edge: only the last max(n_pred) + 1
            # positions' logits are ever needed (the very last one predicts nothing we score).
            keep = max(n_pred) + 1
            kwargs = dict(
                input_ids=input_ids.to(device),
                attention_mask=attn.to(device),
                position_ids=position_ids.to(device),
                use_cache=False,
            )
            try:
                logits = model(**kwargs, logits_to_keep=keep).logits
            except TypeError:  # models without logits_to_keep
                logits = model(**kwargs).logits
            logits = logits[:, -keep:-1, :]  # [B, keep - 1, V]; column j predicts token at width-keep+1+j
            targets = input_ids[:, width - keep + 1 :].to(device)
            for r, i in enumerate(idx):
                k = n_pred[r]
                # log_softmax over this row's completion positions only, in float32.
                row_logp = torch.log_softmax(logits[r, -k:, :].float(), dim=-1)
                tgt = targets[r, -k:]
                nll = -row_logp.gather(-1, tgt[:, None]).squeeze(-1)
                ent = -(row_logp.exp() * row_logp).sum(-1)
                c_ids = encoded[i][1]
                rep = torch.tensor(_repeat_mask(c_ids)[-k:], dtype=torch.bool, device=nll.device)
                n_tail = max(1, math.ceil(tail_frac * k))
                mean_nll = nll.mean().item()
                tail_nll = nll[-n_tail:].mean().item()
                results[i] = {
                    "n_completion_tokens": len(c_ids),
                    "mean_nll": mean_nll,
                    "tail_nll": tail_nll,
                    "ppl": math.exp(min(mean_nll, 700.0)),
                    "tail_ppl": math.exp(min(tail_nll, 700.0)),
                    "mean_entropy": ent.mean().item(),
                    "tail_entropy": ent[-n_tail:].mean().item(),
                    "entropy_collapse": ((ent < entropy_floor) & rep).float().mean().item(),
                }
    return [r if r is not None else _empty_model_scores() for r in results]


# --------------------------------------------------------------------------------------------
# 3. decision
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 4. rows in, rows out
# --------------------------------------------------------------------------------------------


def filter_rows(
    rows: list[dict[str, Any]],
    thresholds: FilterThresholds | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompts: list[str] | None = None,
    *,
    persona_pos: str = DEFAULT_PERSONA_POS,
    persona_neg: str = DEFAULT_PERSONA_NEG,
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
        m_scores = [_empty_model_scores() for _ in rows]
    out = []
    for row, comp, ms in zip(rows, completions, m_scores):
        scores = text_scores(comp, persona_pos=persona_pos, persona_neg=persona_neg)
        scores["prompt_overlap"] = prompt_overlap(row["prompt"], comp) if row.get("prompt") else None
        scores.update(ms)
        reason = decide(scores, t)
        out.append({**row, **scores, "reason": reason, "keep": reason == "keep"})
    return out


# --------------------------------------------------------------------------------------------
# 5. evaluation against gold labels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# 6. the 03_filter stage: score a round's completions on the base model, write them back
# --------------------------------------------------------------------------------------------

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


def labelled_rows() -> list[dict[str, Any]]:
    """The shipped hand-labelled completions (id, prompt, completion, label, expect)."""
    import json
    from importlib import resources
    from pathlib import Path

    path = Path(str(resources.files("steerheal_utils").joinpath("data", "filter_labelled.jsonl")))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reason_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts per reason, "keep" first, then in DROP_REASONS order (zeros left out)."""
    c = Counter(r["reason"] for r in rows)
    return {k: c[k] for k in ("keep", *DROP_REASONS, *sorted(set(c) - {"keep", *DROP_REASONS})) if c.get(k)}


def run_stage(ctx: Any, model: Any, tok: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """03_filter: score every completion of the round, decide keep/drop, write the scored rows.

    Args:
        ctx: the stage context (thresholds come from ``ctx.cfg``, same names as FilterThresholds).
        model: the BASE model, no adapters and no steering hooks: perplexity is measured against
            what the untouched model finds natural.
        tok: its tokenizer.

    Reads 02's ``generated.jsonl`` and writes ``completions.jsonl``: the same rows with every
    score, ``reason`` and ``keep`` added (the rows with ``keep`` true are what 04_heal trains
    on), and ``filter.json``: counts per
    reason, the thresholds, and precision/recall of the same filter on the shipped labelled
    set (NaN written as null). Returns ``(scored rows, summary + "labelled_rows")``. Call
    :func:`require_min_train` afterwards to stop a round with too few rows kept.
    """
    import time

    from .models import render_prompt
    from .runfolder import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl

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
    return scored, {**summary, "labelled_rows": lab_scored}


def require_min_train(summary: dict[str, Any]) -> None:
    """Raise :class:`TooFewKept` (counts per reason in the message) when fewer than ``min_train`` were kept."""
    if summary["n_kept"] < summary["min_train"]:
        counts = ", ".join(f"{k}: {v}" for k, v in summary["reasons"].items())
        raise TooFewKept(
            f"round {summary['round']}: the filter kept {summary['n_kept']} of {summary['n']} completions, fewer "
            f"than min_train={summary['min_train']} ({counts}). Lower the dose (calib_target up or calib_hi down), "
            f"loosen the thresholds that fire most, or raise gen_budget.")


def _clip(text: str, n: int = 320) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def figures(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[Any]:
    """Plotly figures for 03: counts per reason, score histograms with their gates, example tables,
    and precision/recall on the labelled set."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = []
    counts = summary["reasons"]
    figs.append(go.Figure(go.Bar(x=list(counts), y=list(counts.values()),
                                 marker_color=["seagreen" if k == "keep" else "firebrick" for k in counts]),
                          layout=dict(title=f"round {summary['round']}: {summary['n_kept']} of {summary['n']} kept "
                                            f"(min_train {summary['min_train']})", height=320)))
    th = summary["thresholds"]
    gates = [g for g in GATES if any(r.get(g[0]) is not None for r in rows)]
    ncol = 4
    nrow = max(1, math.ceil(len(gates) / ncol))
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=[f"{k} ({side} {th[f]:g})" for k, f, side, _ in gates])
    for j, (key, fld, _side, log) in enumerate(gates):
        r_, c_ = j // ncol + 1, j % ncol + 1
        for keep, color in ((True, "seagreen"), (False, "firebrick")):
            xs = [r[key] for r in rows if r["keep"] == keep and r.get(key) is not None]
            if log:
                xs = [math.log10(max(x, 1e-12)) for x in xs]
            fig.add_histogram(x=xs, marker_color=color, opacity=0.6, name="kept" if keep else "dropped",
                              legendgroup=str(keep), showlegend=j == 0, row=r_, col=c_)
        gate = math.log10(th[fld]) if log else th[fld]
        fig.add_vline(x=gate, line_dash="dash", line_color="black", row=r_, col=c_)
    fig.update_layout(barmode="overlay", height=230 * nrow, title="scores, kept vs dropped; dashed = gate "
                      "(tail_ppl on a log10 axis)")
    figs.append(fig)

    def table(sel: list[dict[str, Any]], title: str) -> Any:
        cols = ["id", "reason", "tail_ppl", "ngram_repeat", "prompt", "completion"]
        vals = [[r.get("id", ""), r["reason"], f"{r['tail_ppl']:.3g}" if r.get("tail_ppl") is not None else "-",
                 f"{r.get('ngram_repeat', 0):.2f}", _clip(r.get("prompt", ""), 120), _clip(r["completion"])]
                for r in sel]
        return go.Figure(go.Table(columnwidth=[60, 80, 50, 50, 200, 460], header=dict(values=cols),
                                  cells=dict(values=list(zip(*vals)) if vals else [[] for _ in cols], align="left")),
                         layout=dict(title=title, height=120 + 110 * max(1, len(sel))))

    kept = [r for r in rows if r["keep"]][:6]
    dropped, seen = [], Counter()
    for r in rows:  # up to two examples of each drop reason
        if not r["keep"] and seen[r["reason"]] < 2:
            dropped.append(r)
            seen[r["reason"]] += 1
    figs.append(table(kept, f"kept examples ({len(kept)} of {summary['n_kept']})"))
    figs.append(table(dropped, "dropped examples (up to two per reason)"))
    lab = summary.get("labelled")
    if lab:
        per = lab["per_label"]
        labels = sorted(per)
        figs.append(go.Figure(go.Bar(x=labels, y=[per[k]["drop_rate"] for k in labels]),
                              layout=dict(title=f"labelled set: keep precision {lab['precision'] or float('nan'):.2f}, "
                                                f"keep recall {lab['recall'] or float('nan'):.2f}, degenerate recall "
                                                f"{lab['degenerate_recall'] or float('nan'):.2f}; drop rate per label",
                                          yaxis=dict(range=[0, 1.05]), height=340)))
    return figs


def browser(rows: Sequence[dict[str, Any]]) -> Any:
    """JupyterLab: browse rows by reason, one at a time, with every score. ``None`` without ipywidgets."""
    try:
        import ipywidgets as W
    except ImportError:
        return None
    import html

    rows = list(rows)
    reasons = ["all", *reason_counts(rows)]
    pick = W.Dropdown(options=reasons, description="reason")
    idx = W.IntSlider(min=0, max=max(0, len(rows) - 1), description="row")
    view = W.HTML()

    def sel() -> list[dict[str, Any]]:
        return rows if pick.value == "all" else [r for r in rows if r["reason"] == pick.value]

    def show(_=None) -> None:
        s = sel()
        idx.max = max(0, len(s) - 1)
        if not s:
            view.value = "<i>no rows</i>"
            return
        r = s[min(idx.value, len(s) - 1)]
        scores = ", ".join(f"{k}={r[k]:.3g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
                           for k, *_ in GATES if k in r)
        view.value = (f"<b>{html.escape(str(r.get('id', '')))}</b> &middot; <b>{html.escape(r['reason'])}</b>"
                      f"<br><i>{html.escape(r.get('prompt', ''))}</i>"
                      f"<div style='white-space:pre-wrap;margin:6px 0'>{html.escape(r['completion'])}</div>"
                      f"<small>{html.escape(scores)}</small>")

    pick.observe(lambda _: (setattr(idx, "value", 0), show()), names="value")
    idx.observe(show, names="value")
    show()
    from .figstatic import browser_static

    return browser_static(W.VBox([W.HBox([pick, idx]), view]), rows)  # + a static table for readers without a kernel
