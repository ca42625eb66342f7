"""The eval's forward passes: next-token log-probs of the answer labels (with a shared-prefix KV
cache in the ``prefix`` layout), tiny-mfv's think path (T greedy tokens, then the forced suffix),
greedy answers."""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
from torch import nn
from transformers import LlamaForCausalLM
from ..progress import tqdm  # a plain final line, not a frozen widget, in the journal

from ..batching import eos_ids, left_pad, length_sorted_batches
from ..models import model_device
from ..vector.steering import Steering
from ..vector.steering import steering as steering_ctx
from .prompts import EvalError, PromptSet, ThinkProtocol, think_protocol

def _cache_kwarg() -> str:
    """transformers >= 5.2x names the KV cache ``cache``; older versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_KW = _cache_kwarg()


def find_prefill(gen_ids: Sequence[int], prefill: str, tok, pad_id: int | None = None) -> tuple[int, int] | None:
    """Where a thought wrote ``prefill`` itself: ``(first token of it, the token after it)``, or None.

    Indices are into ``gen_ids``; pad tokens are skipped. The text is matched on the decoded
    thought (special tokens kept), its first occurrence; characters are mapped back to tokens by
    decoding growing prefixes. None also when nothing follows the prefill inside the budget
    (there is no answer token to read).

    Example:
        >>> find_prefill(tok.encode('ok. {"violation": "3"}'), '{"violation": "', tok)  # doctest: +SKIP
        (2, 6)
    """
    real = [(i, t) for i, t in enumerate(gen_ids) if t != pad_id]
    ids = [t for _, t in real]
    text = tok.decode(ids, skip_special_tokens=False)
    begin = text.find(prefill)
    if begin < 0:
        return None
    end = begin + len(prefill)
    first = after = None
    for n in range(1, len(ids) + 1):
        k = len(tok.decode(ids[:n], skip_special_tokens=False))
        if first is None and k > begin:
            first = n - 1
        if k >= end:
            after = n
            break
    if first is None or after is None or after >= len(ids):
        return None
    return real[first][0], real[after][0]


def read_think_row(gen_ids: Sequence[int], step_lp: torch.Tensor, forced_lp: torch.Tensor, proto: ThinkProtocol,
                   tok, pad_id: int | None = None) -> tuple[torch.Tensor, str]:
    """The answer log-probs of one thought, and where they were read.

    ``"natural"``: the thought wrote the prefill itself: the log-probs at the token after it
    (``step_lp[answer]``, from the logits the decoder chose that token from). ``"forced"``: it
    did not, and never closed itself: the log-probs after the forced suffix. ``"unscorable"``:
    it closed itself without writing the answer; NaN (excluded from the metrics and counted).
    """
    win = find_prefill(gen_ids, proto.prefill, tok, pad_id)
    if win is not None:
        return step_lp[win[1]], "natural"
    if proto.close_id in gen_ids:
        return torch.full_like(forced_lp, float("nan")), "unscorable"
    return forced_lp, "forced"


def _cache_of(out):
    return out.cache if _CACHE_KW == "cache" else out.past_key_values


@torch.inference_mode()
def _think_batch(model: nn.Module, seqs: Sequence[list[int]], tags: Sequence[int], proto: ThinkProtocol,
                 label_ids: Sequence[int], think_tokens: int, pad_id: int, at) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Exactly ``think_tokens`` greedy tokens per prompt (suppressed ids never chosen), then the forced
    suffix over the same KV cache. Rows are left-padded, so every row's thought ends in the last column
    and the suffix is one forward for the batch.

    Returns the thoughts, the label log-probs at every think step ``[rows, T, labels]`` (log-softmax of
    the logits as the decoder used them: suppressed ids at -inf, as in HF's processed scores that
    tiny-mfv reads) and after the suffix ``[rows, labels]`` (plain full-vocabulary log-softmax).
    ``at`` receives each forward's positions relative to the rows' tags (see vector.steering).
    """
    dev = model_device(model)
    ids, mask, pos = left_pad(seqs, pad_id, dev)
    B, L = ids.shape
    lens = torch.as_tensor([len(s) for s in seqs], device=dev)[:, None]
    tag = torch.as_tensor(list(tags), device=dev)[:, None]
    want = torch.as_tensor(list(label_ids), device=dev)
    supp = torch.as_tensor(proto.suppress, device=dev, dtype=torch.long)
    at(torch.arange(L, device=dev)[None] - (L - lens) - tag)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = _cache_of(out), out.logits[:, -1]
    gen = torch.empty(B, think_tokens, dtype=torch.long, device=dev)
    step_lp = torch.empty(B, think_tokens, len(want), device=dev)
    for j in range(think_tokens):
        z = logits.to(torch.float32, copy=True)
        z[:, supp] = float("-inf")
        step_lp[:, j] = torch.log_softmax(z, -1)[:, want]
        gen[:, j] = z.argmax(-1)
        if j == think_tokens - 1:
            break  # the last token goes in with the suffix
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        p = lens + j  # sequence index of the token fed now
        at(p - tag)
        out = model(input_ids=gen[:, j:j + 1], attention_mask=mask, position_ids=p, use_cache=True, logits_to_keep=1,
                    **{_CACHE_KW: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
    inp = torch.cat([gen[:, -1:], torch.as_tensor(proto.suffix, device=dev).expand(B, -1)], 1)
    mask = torch.cat([mask, mask.new_ones(B, inp.shape[1])], 1)
    p = lens + think_tokens - 1 + torch.arange(inp.shape[1], device=dev)[None]
    at(p - tag)
    logits = model(input_ids=inp, attention_mask=mask, position_ids=p, use_cache=True, logits_to_keep=1,
                   **{_CACHE_KW: cache}).logits[:, -1]
    forced = torch.log_softmax(logits.float(), -1)[:, want]
    if not (torch.isfinite(step_lp).all() and torch.isfinite(forced).all()):
        raise FloatingPointError("non-finite log-probs in the think path: the model produced NaN/inf logits (dose too high?)")
    return gen.tolist(), step_lp.cpu(), forced.cpu()


def think_logprobs(model: nn.Module, tok, prompts: PromptSet, token_ids: Sequence[int], prefill: str,
                   think_tokens: int, *, batch_size: int = 16, steering: Steering | None = None,
                   progress: bool = False, desc: str = "think") -> tuple[torch.Tensor, list[str], list[list[int]]]:
    """tiny-mfv's think path on prompts that end with the opened thought (module docstring).

    Args:
        prompts: generation prompts + :func:`think_opener` text, with their assistant tags.
        token_ids: the answer labels' ids; ``prefill``: the text the answer follows.

    Returns ``(log-probs [rows, labels] with NaN rows where unscorable, read kind per row,
    thought token ids per row)``.
    """
    if think_tokens < 1:
        raise EvalError(f"think_logprobs needs think_tokens >= 1, got {think_tokens}")
    proto = think_protocol(model, tok, prefill)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [prompts.prefix + r for r in prompts.rests]
    lp = torch.full((len(seqs), len(token_ids)), float("nan"))
    reads, thoughts = [""] * len(seqs), [[] for _ in seqs]
    with steering_ctx(model, steering) as at:
        for b in tqdm(length_sorted_batches([len(s) for s in seqs], batch_size), desc=desc, disable=not progress, leave=False):
            gen, step_lp, forced = _think_batch(model, [seqs[i] for i in b], [prompts.tags[i] for i in b], proto,
                                                token_ids, think_tokens, pad_id, at)
            for j, i in enumerate(b):
                thoughts[i] = gen[j]
                lp[i], reads[i] = read_think_row(gen[j], step_lp[j], forced[j], proto, tok, pad_id)
    return lp, reads, thoughts


# ------------------------------------------------------------------ the scoring engine
@torch.inference_mode()
def next_token_logprobs(model: nn.Module, tok, prompts: PromptSet, token_ids: Sequence[int], *,
                        batch_size: int = 16, reuse_prefix: bool = True, progress: bool = False,
                        desc: str = "scoring", steering: Steering | None = None) -> torch.Tensor:
    """Log-probs (full-vocabulary log-softmax, float32) of ``token_ids`` after each prompt.

    Args:
        prompts: a shared prefix and per-row rests; the prompt of row i is prefix + rests[i].
        reuse_prefix: compute the prefix's key/value cache once and expand it over each batch
            (rests are right-padded after it, so no padding sits inside a row); otherwise run
            every row as one left-padded full forward.
        steering: applied to every forward with positions counted from each row's tag
            (``prompts.tags``); None leaves the model as the caller set it (hooks included).

    Returns ``[rows, len(token_ids)]`` on CPU.
    """
    dev = model_device(model)
    n = len(prompts.rests)
    want = torch.as_tensor(list(token_ids), device=dev)
    out = torch.empty(n, len(want))
    P = len(prompts.prefix)
    tags = torch.as_tensor(prompts.tags, device=dev)
    cache = None
    with steering_ctx(model, steering) as at:
        if reuse_prefix and P:
            if int(tags.min()) < P:
                raise EvalError("a row's assistant tag lies inside the shared prefix: cannot reuse the prefix")
            at(torch.arange(P, device=dev) - P)  # all before every row's tag: one multiplier for all rows
            out_ = model(input_ids=torch.as_tensor([prompts.prefix], device=dev), use_cache=True)
            cache = _cache_of(out_)
        batches = length_sorted_batches([len(r) for r in prompts.rests], batch_size)
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            bt = torch.as_tensor(b, device=dev)
            if cache is not None:
                rests = [prompts.rests[i] for i in b]
                L = max(len(r) for r in rests)
                ids = torch.full((len(b), L), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(b), P + L), dtype=torch.long)
                mask[:, :P] = 1
                for j, r in enumerate(rests):
                    ids[j, :len(r)] = torch.as_tensor(r)
                    mask[j, P:P + len(r)] = 1
                last = torch.as_tensor([len(r) - 1 for r in rests])
                keep = torch.unique(last)  # logits only at the rows' last real positions
                kv = copy.deepcopy(cache)
                kv.batch_repeat_interleave(len(b))
                pos = (P + torch.arange(L)).expand(len(b), L).to(dev)
                at(pos - tags[bt][:, None])
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos,
                               use_cache=True, logits_to_keep=keep.to(dev), **{_CACHE_KW: kv}).logits
                col = torch.searchsorted(keep, last).to(dev)
                logits = logits[torch.arange(len(b), device=dev), col]
            else:
                seqs = [prompts.prefix + prompts.rests[i] for i in b]
                ids, mask, pos = left_pad(seqs, tok.pad_token_id, dev)
                start = ids.shape[1] - torch.as_tensor([len(s) for s in seqs], device=dev)
                at(torch.arange(ids.shape[1], device=dev)[None] - start[:, None] - tags[bt][:, None])
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                               logits_to_keep=1).logits[:, -1]
            lsm = torch.log_softmax(logits.float(), dim=-1)
            out[b] = lsm[:, want].cpu()
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite log-probs: the model produced NaN/inf logits (dose too high?)")
    return out


@torch.inference_mode()
def greedy(model: nn.Module, tok, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int = 16,
           progress: bool = False, desc: str = "greedy") -> list[list[int]]:
    """Greedy continuations (token ids, cut at the first EOS) of each prompt, batched."""
    dev = model_device(model)
    eos = set(eos_ids(model, tok)) | ({tok.pad_token_id} - {None})
    out: list[list[int]] = [[] for _ in prompts]
    for b in tqdm(length_sorted_batches([len(p) for p in prompts], batch_size), desc=desc, disable=not progress, leave=False):
        ids, mask, _ = left_pad([prompts[i] for i in b], tok.pad_token_id, dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        for j, i in enumerate(b):
            seq = gen[j, ids.shape[1]:].tolist()
            cut = next((k for k, t in enumerate(seq) if t in eos), len(seq))
            out[i] = seq[:cut]
    return out
