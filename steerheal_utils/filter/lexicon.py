"""Word lists and patterns the filter's text signals count (no logic here).

Function words (natural prose is ~40-55% of them; token soup is not), the affect vocabulary of
the precursor's loops, narration / self-description / refusal / boilerplate patterns, and the
tokenising regexes of :mod:`steerheal_utils.filter.text`.
"""

from __future__ import annotations

import re

# English function words: natural prose is ~40-55% of these; token soup and word salad are not.
FUNCTION_WORDS = frozenset(
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
AFFECT_WORDS = frozenset(
    """oh ohh ohhh ah ahh ahhh aah god gods goodness gosh please darling darlings sweet sweetie
    sweetheart love lovely beloved baby babe honey dear dearest precious angel heaven heavens
    yes yess yesss wow omg jesus lord mercy sob sobs cry crying tears heart hug hugs kiss
    kisses xoxo mmm hmm aww awww whoa noo nooo sweetest""".split()
)


NARRATION_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
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
SELF_DESCRIPTION = re.compile(
    r"\b(?:i am|i'm|i have always|i've always|i always|i never|my (?:values?|nature|principles?"
    r"|priority|priorities|character|instinct)|who i am|defines? me|define me|person|kind of|"
    r"sort of|type of)\b",
    re.IGNORECASE,
)


REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
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


BOILERPLATE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
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


WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")


SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


CLAUSE_SPLIT_RE = re.compile(r"[.!?;:,\n\u2014]+|\s+-\s+")


# A "clean" whitespace token: a plain word with optional punctuation around it, a number, or a
# list marker. Sub-word debris (camelCase joins, byte-level markers, code tokens) is not.
CLEAN_TOKEN_RE = re.compile(
    r"^[\"'(\[\u201c\u2018*]*(?:"
    r"[^\W\d_]+(?:['\u2019\-][^\W\d_]+)*['\u2019]?"  # words, contractions, hyphenations
    r"|[$\u00a3\u20ac]?\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th|s|am|pm)?"  # numbers, times, money
    r"|\d+[.)]|[-*\u2022]"  # list markers
    r")[\"')\]\u201d\u2019*]*[.,;:!?]*[\"')\]\u201d\u2019*]*$"
)


CAMEL_RE = re.compile(r"[a-z][A-Z]")


PERSONA_STOP = FUNCTION_WORDS | {"someone", "somebody", "mean", "means", "meaning", "it"}
