"""Model-free signals of one completion: repetition, loops, token soup, drift, narration, relevance.

The precursor kept a completion iff tail perplexity under the base model < 50, max n-gram repeat
fraction < 0.3, and no narration / refusal regex hit. That leaked: token soup and affect loops
("oh my sweet darling oh GOD oh please...") passed at perplexity 2-17 and repeat fraction
0.04-0.27, because a *low-perplexity* loop is exactly what a steered model produces confidently.
So the filter leans on these shape signals, which do not care how confident the model was:
windowed lexical diversity, longest repeated substring, compression, tail-local repetition,
function-word and script statistics, an affect lexicon, and clause-skeleton similarity. The base
model's scores (:mod:`steerheal_utils.filter.model`) are an extra gate, never the only one.

Pure functions of text; the word lists are in :mod:`steerheal_utils.filter.lexicon`.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from typing import Any, Sequence

from ..config import NEG_PERSONA, POS_PERSONA
from .lexicon import (AFFECT_WORDS, BOILERPLATE_PATTERNS, CAMEL_RE, CLAUSE_SPLIT_RE, CLEAN_TOKEN_RE, FUNCTION_WORDS,
                      NARRATION_PATTERNS, PERSONA_STOP, REFUSAL_PATTERNS, SELF_DESCRIPTION, SENT_SPLIT_RE, WORD_RE)


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower().replace("\u2019", "'"))


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


def _content_stems(text: str) -> set[str]:
    text = re.sub(r"(\w)-(\w)", r"\1\2", text.lower())  # "well-being" == "wellbeing"
    return {_stem(w) for w in _words(text) if w not in PERSONA_STOP and len(w) > 1}


def prompt_overlap(prompt: str, completion: str) -> float:
    """Fraction of the prompt's content-word stems that the completion uses.

    A cheap relevance check: steered small models drift into fluent prose about nothing in
    particular ("our team, our family, every moment..."), which every shape gate passes. On the
    labelled set coherent answers use 0.15-0.86 of the prompt's content words.
    """
    p = _content_stems(prompt)
    return len(p & _content_stems(completion)) / len(p) if p else 1.0


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in SENT_SPLIT_RE.split(text) if s.strip()]


def _clauses(text: str) -> list[list[str]]:
    """Clauses as word lists; run-ons without punctuation are chunked so loops still split."""
    out: list[list[str]] = []
    for part in CLAUSE_SPLIT_RE.split(text):
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
        if re.search(r"\b(?:i|i'm|me|my|myself)\b", sent, re.IGNORECASE) and SELF_DESCRIPTION.search(sent):
            best_self = max(best_self, op, on)
    return best_pos, best_neg, best_self


def text_scores(
    completion: str,
    *,
    persona_pos: str = POS_PERSONA,
    persona_neg: str = NEG_PERSONA,
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
        1 for t in tokens if not CLEAN_TOKEN_RE.match(t) or CAMEL_RE.search(t.strip("\"'.,;:!?()"))
    )
    scripts = Counter(_script(ch) for ch in text if ch.isalpha())
    n_letters = sum(scripts.values())
    script_mix = 1.0 - scripts.most_common(1)[0][1] / n_letters if n_letters else 0.0

    def func_frac(ws: Sequence[str]) -> float:
        return sum(w in FUNCTION_WORDS for w in ws) / len(ws) if ws else 0.0

    def affect(ws: Sequence[str]) -> float:
        return sum(w in AFFECT_WORDS for w in ws) / len(ws) if ws else 0.0

    letters_words = [t.strip("\"'.,;:!?()") for t in tokens]
    caps = sum(1 for w in letters_words if len(w) >= 3 and w.isalpha() and w.isupper())

    narr_regex = any(p.search(text) for p in NARRATION_PATTERNS)
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
        "refusal": any(p.search(text) for p in REFUSAL_PATTERNS),
        "boilerplate_hits": sum(1 for p in BOILERPLATE_PATTERNS if p.search(text)),
    }
