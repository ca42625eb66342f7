"""Signals from the base model: perplexity and entropy of a completion under the untouched model.

Tail perplexity and entropy collapse (a confident loop: low entropy on a repeated 3-gram). The
filter scores with the BASE model, unsteered: how natural the text is to the model we started from.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..batching import left_pad
from ..models import model_device

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


def empty_model_scores(n_tokens: int = 0) -> dict[str, Any]:
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
            results[i] = empty_model_scores(0)
        elif not p_ids:
            # The first completion token has no context to be predicted from; score the rest.
            if len(c_ids) < 2:
                results[i] = empty_model_scores(len(c_ids))
            else:
                todo.append(i)
        else:
            todo.append(i)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    device = model_device(model)

    # Length-sorted batches waste less compute on padding; results go back by index.
    todo.sort(key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    with torch.inference_mode():
        for b0 in range(0, len(todo), batch_size):
            idx = todo[b0 : b0 + batch_size]
            seqs = [encoded[i][0] + encoded[i][1] for i in idx]
            # positions of the completion tokens that are actually predicted (needs a left token)
            n_pred = [len(encoded[i][1]) if encoded[i][0] else len(encoded[i][1]) - 1 for i in idx]
            input_ids, attn, position_ids = left_pad(seqs, pad_id)
            width = input_ids.shape[1]
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
    return [r if r is not None else empty_model_scores() for r in results]
