"""Chat prompts: what a model is shown, rendered by its own chat template.

Every step renders prompts here, so 01's vector, 02's samples, 03's scores, 04's training rows
and 05's eval all see the same text for the same user message.
"""

from __future__ import annotations


def persona_system(persona: str) -> str:
    """The system prompt that puts a model in a persona."""
    return f"You are {persona}."


def chat_messages(tok, user: str, system: str | None = None) -> list[dict]:
    """Messages for one user turn; the system text is folded into the user turn when the
    template has no system role (it raises, or silently drops the system text)."""
    if system is None:
        return [{"role": "user", "content": user}]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if system in text:
            return msgs
    except Exception:  # jinja raises TemplateError("System role not supported") for some models
        pass
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def render_prompt(tok, user: str, system: str | None = None) -> str:
    """The chat prompt text up to and including the assistant header."""
    return tok.apply_chat_template(chat_messages(tok, user, system), tokenize=False, add_generation_prompt=True)


def encode(tok, text: str) -> list[int]:
    """Token ids of already-rendered text (special tokens come from the template, not added twice)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def assistant_header(tok) -> str:
    """The text the template appends for ``add_generation_prompt`` (e.g. ``<|im_start|>assistant\\n``)."""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    if not with_gen.startswith(without) or with_gen == without:
        raise ValueError("cannot find the assistant header: the chat template renders no generation prompt")
    return with_gen[len(without):]


def prompt_ids(tok, user: str, system: str | None = None) -> tuple[list[int], int]:
    """Prompt token ids and the index of the assistant-tag token (the last header token).

    The position is checked against the rendered template rather than assumed, so a
    template that appends something after the header fails loudly.
    """
    text = render_prompt(tok, user, system)
    header = assistant_header(tok)
    if not text.endswith(header):
        raise ValueError(f"rendered prompt does not end with the assistant header {header!r}")
    ids = encode(tok, text)
    n_head = len(encode(tok, text[: len(text) - len(header)]))
    if n_head >= len(ids):
        raise ValueError("assistant header tokenised to nothing")
    return ids, len(ids) - 1
