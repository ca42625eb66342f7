"""Heal's training data: kept rows as token ids, batches with their loss masks.

The prompt is rendered and tokenised exactly as :func:`steerheal_utils.generate.sampling.sample`
did for it; the completion is the ids that were sampled. The target after the last completion
token is the end-of-turn id when the completion ended naturally.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..batching import left_pad
from ..chat import render_prompt
from ..runfolder import read_jsonl


def end_of_turn_id(tok) -> int:
    """The token the chat template puts right after an assistant message (``<|im_end|>``,
    ``<end_of_turn>``...): the target a naturally ended completion must learn to emit."""
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "XQZ"}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
        after = text[text.rindex("XQZ") + 3:]
        ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(tok.all_special_ids)
        for i in ids:
            if i in special:
                return int(i)
    except Exception:  # a template without an assistant role: fall back to EOS
        pass
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn marker in its chat template and no eos_token_id")
    return int(tok.eos_token_id)


@dataclass
class Example:
    ids: list[int]        # prompt + completion (+ end-of-turn)
    n_prompt: int         # the first target to learn is ids[n_prompt]
    has_eot: bool


def completion_token_ids(tok, row: dict, where: str = "row") -> list[int]:
    """The completion's token ids: the ids that were sampled (``completion_ids``, as 02 saves
    them) when the row has them, else the tokenised ``completion`` text.

    Sampled ids are the truth: decoding and re-tokenising can split a word differently
    (``contract|ual``) and drops special tokens sampled mid-completion, so training or scoring
    on re-tokenised text would use a sequence the model never produced. The text fallback is
    only for rows that were never sampled here (the shipped labelled set, hand-written rows).
    """
    ids = row.get("completion_ids")
    if ids is None:
        if not isinstance(row.get("completion"), str):
            raise ValueError(f"{where} (prompt_id {row.get('prompt_id')!r}): 'completion' must be a string")
        return list(tok(row["completion"], add_special_tokens=False)["input_ids"])
    vocab = len(tok)
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
        raise ValueError(f"{where} (prompt_id {row.get('prompt_id')!r}): 'completion_ids' must be a list of token ids "
                         f"in [0, {vocab})")
    return list(ids)


def encode_rows(tok, rows: Sequence[dict], max_seq_len: int) -> tuple[list[Example], int]:
    """Token ids of kept rows: the rendered prompt (no persona), then the completion's sampled
    ids (:func:`completion_token_ids`; the text only for rows without ``completion_ids``).

    The prompt is rendered and tokenised exactly as :func:`generate.sample` did for it. The
    end-of-turn id is appended only when the row is not ``truncated`` and the completion is not
    cut by ``max_seq_len``. Returns ``(examples, n_skipped)``; a row is skipped when its prompt
    leaves no room for a completion token.
    """
    eot = end_of_turn_id(tok)
    out, skipped = [], 0
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str):
            raise ValueError(f"completions row {i} (prompt_id {r.get('prompt_id')!r}): 'prompt' must be a string")
        p = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        c = completion_token_ids(tok, r, f"completions row {i}")
        natural = not r.get("truncated", False)
        if natural:
            c = c + [eot]
        room = max_seq_len - len(p)
        if room < 1 or not c:
            skipped += 1
            continue
        cut = len(c) > room
        c = c[:room]
        out.append(Example(list(p) + list(c), len(p), natural and not cut))
    return out, skipped


def collate(examples: Sequence[Example], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Left-padded batch; ``targets[b, t]`` is the token after position t and ``loss_mask``
    is True where that target is a completion token (prompt and padding masked)."""
    ids, attn, pos = left_pad([e.ids for e in examples], pad_id)
    B, S = ids.shape
    targets = torch.full_like(ids, pad_id)
    targets[:, :-1] = ids[:, 1:]
    t = torch.arange(S)[None, :]
    start = torch.tensor([S - len(e.ids) + e.n_prompt - 1 for e in examples])[:, None]  # predicts ids[n_prompt]
    loss_mask = (t >= start) & (t < S - 1)
    batch = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "targets": targets, "loss_mask": loss_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def kept_rows(path: Path | str) -> list[dict]:
    """Rows of ``completions.jsonl`` with ``"keep": true``."""
    return [r for r in read_jsonl(path, "completions (02_generate/03_filter output)") if r.get("keep") is True]
