"""The ``backtrack`` steering mode: sample with the vector, back off where the push breaks the text.

A small KV-cached decode loop (``generate`` cannot rewind). Each batch runs as ``2B`` rows: the
``B`` steered rows and an unsteered copy of each, fed the same tokens, so every step gives both
next-token distributions of the same sequence in one forward. The signal is the per-token
``KL(steered || unsteered)`` (nats) of those distributions: what the push does to the next token,
not how uncertain the model is anyway. When a row's KL exceeds ``threshold`` (and it has backed off
fewer than ``max_backoffs`` times), that row drops its last ``k`` generated tokens, multiplies its
dose by ``factor`` and re-feeds its last kept token at the smaller dose; other rows go on.

Rewinding one row of a shared KV cache: the dropped tokens' columns are masked out (attention mask
0, for the row and its copy) and the replay is appended in new columns with the position ids the
dropped tokens had, so the row's sequence is its kept tokens, as left padding already works.
Exact for full attention. A sliding-window layer (Gemma 3) counts its window in columns, so each
masked column shortens that row's window by one token: exact while the sequence fits in the window
(1024 tokens at gemma-3-4b), an approximation beyond it.

Cost: the unsteered copies double the rows of every decode forward (not the number of forwards,
and the weights are read once per step for both); ``tools``-free measurement in the README
("Steering modes"). Sampling uses the same logits processors as :func:`~.sampling.sample`'s
``generate`` (:func:`logits_processors`: :class:`~.warp.TopKTopP` for temperature, top-k and
top-p), the same seeds (batch ``b`` in length-sorted order samples with ``seed + b``) and writes the same row records as :func:`~.sampling.sample`, plus ``backoffs``,
``backoff_at`` (generated-token index where each spike was seen), ``backoff_kl``, ``final_dose``
and the row's mean and max per-token KL over the tokens it kept (``kl_mean``, ``kl_max``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn
from transformers import LogitsProcessorList

from ..batching import eos_ids, left_pad, length_sorted_batches
from ..chat import prompt_ids, render_prompt
from ..kl import reverse as kl_reverse
from ..models import model_device
from ..progress import tqdm
from ..vector.steering import Steering, steering
from ..vector.value import SteeringVector
from .warp import generate_kwargs


def logits_processors(model: nn.Module, gen_kw: dict[str, Any], prompt_len: int, device):
    """The logits processors ``generate`` applies for ``gen_kw`` (:func:`~.warp.generate_kwargs`: the
    one :class:`~.warp.TopKTopP` for temperature, top-k and top-p, plus any processor the model's
    generation config adds), built by transformers itself, so both sampling paths share them."""
    gc = copy.deepcopy(model.generation_config)
    kw = {k: v for k, v in gen_kw.items() if k not in ("max_new_tokens", "logits_processor")}
    gc.update(**kw)
    model._prepare_special_tokens(gc, True, device=device)
    return model._get_logits_processor(generation_config=gc, input_ids_seq_length=prompt_len, device=device,
                                       logits_processor=LogitsProcessorList(gen_kw.get("logits_processor", [])))


def sample_backtrack(model: nn.Module, tok, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                     sv: SteeringVector | None, dose: float, threshold: float, k: int = 4, factor: float = 0.5,
                     max_backoffs: int = 3, positions: str = "all", halflife: int = 0, temperature: float = 1.0,
                     top_p: float = 0.95, top_k: int = 64, max_new_tokens: int = 96, batch_size: int = 32,
                     seed: int = 0, progress: bool = False, **_ignored) -> list[dict]:
    """:func:`~.sampling.sample` with backing off (module docstring).

    Args:
        threshold: per-token KL(steered || unsteered) in nats above which a row backs off.
        k: generated tokens dropped per backoff (fewer if the row has fewer).
        factor: the row's dose multiplier per backoff (0.5: each replay at half the previous dose).
        max_backoffs: backoffs per row; after that the row samples on at its last dose.
        The rest as in :func:`~.sampling.sample` (``compile`` and ``min_new_tokens`` are not
        supported here and ignored).

    Example:
        >>> rows = sample_backtrack(model, tok, ["Your boss says ..."], sv=sv, dose=0.1, threshold=2.0)  # doctest: +SKIP
        >>> rows[0]["backoffs"], rows[0]["backoff_at"]  # doctest: +SKIP
        (1, [17])
    """
    if not prompts:
        return []
    if not math.isfinite(dose):
        raise ValueError(f"dose must be finite, got {dose}")
    seqs = [list(p) if not isinstance(p, str) else prompt_ids(tok, p)[0] for p in prompts]
    texts = [render_prompt(tok, p) if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in prompts]
    eos = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev = model_device(model)
    greedy = temperature <= 0
    gen_kw = generate_kwargs(temperature, top_k, top_p)  # sample()'s: the same TopKTopP
    spec = Steering(sv, dose, positions, halflife)
    out: list[dict | None] = [None] * len(seqs)
    batches = length_sorted_batches([len(s) for s in seqs], batch_size)
    fork_devices = [dev] if dev.type == "cuda" else []
    for b, idx in enumerate(tqdm(batches, desc=f"sampling, backtrack (dose {dose:.3g})", disable=not progress,
                                 leave=False)):
        ids, mask, pos = left_pad([seqs[i] for i in idx], pad_id, dev)
        procs = logits_processors(model, gen_kw, ids.shape[1], dev)
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed + b)
            recs = _decode(model, spec, ids, mask, pos, procs, set(eos), pad_id, greedy=greedy,
                           max_new_tokens=max_new_tokens, threshold=threshold, k=k, factor=factor,
                           max_backoffs=max_backoffs)
        for r, i in enumerate(idx):
            rec = recs[r]
            cids = rec.pop("ids")
            out[i] = {"prompt_index": i, "prompt_text": texts[i],
                      "completion": tok.decode(cids, skip_special_tokens=True).strip(), "completion_ids": cids,
                      "n_tokens": len(cids), "truncated": rec.pop("truncated"), "seed": seed + b, "dose": float(dose),
                      "positions": positions, "halflife": halflife, **rec}
    return out  # type: ignore[return-value]


def _decode(model, spec: Steering, ids, mask, pos, procs, eos: set[int], pad_id: int, *, greedy: bool,
            max_new_tokens: int, threshold: float, k: int, factor: float, max_backoffs: int) -> list[dict]:
    """One batch: the decode loop over ``2B`` rows (steered, then their unsteered copies)."""
    # the KV cache's keyword across transformers versions; imported here: evaluate imports generate
    from ..evaluate.engine import _CACHE_KW, _cache_of
    B, P = ids.shape
    dev = ids.device
    tag = pos[:, -1]  # position id of each row's assistant tag (its last prompt token)
    toks: list[list[int]] = [[] for _ in range(B)]  # kept generated tokens
    cols: list[list[int]] = [[] for _ in range(B)]  # their columns in the cache
    tag_col = [P - 1] * B  # the tag's column (a new one once it is re-fed)
    row_dose = torch.ones(B, device=dev)  # the row's multiplier of the dose (factor ** backoffs)
    events: list[list[tuple[int, float]]] = [[] for _ in range(B)]
    kls: list[list[float]] = [[] for _ in range(B)]  # per-token KL of each kept token, in order
    done, truncated = [False] * B, [False] * B
    attn = torch.cat([mask, mask])
    seq_ids = ids.clone()  # the steered rows' ids column by column (for processors that read them)
    inp, inp_pos = torch.cat([ids, ids]), torch.cat([pos, pos])
    cache = None
    tag2 = torch.cat([tag, tag])
    zeros = torch.zeros(B, device=dev)
    with steering(model, spec, per_row=True) as at:
        while not all(done):
            at(inp_pos - tag2[:, None], torch.cat([row_dose, zeros]))
            res = model(input_ids=inp, attention_mask=attn, position_ids=inp_pos, use_cache=True, logits_to_keep=1,
                        **{_CACHE_KW: cache})
            cache = _cache_of(res)
            z = res.logits[:, -1].float()
            kl = kl_reverse(torch.log_softmax(z[:B], -1), torch.log_softmax(z[B:], -1))
            scores = procs(seq_ids, z[:B].clone())
            nxt = scores.argmax(-1) if greedy else torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
            col = attn.shape[1]  # the column this step's inputs go into
            feed, feed_mask, feed_pos = [pad_id] * B, [0] * B, [0] * B
            for r in range(B):
                if done[r]:
                    continue
                spike = float(kl[r])
                if spike > threshold and len(events[r]) < max_backoffs and float(row_dose[r]) * spec.dose > 0:
                    n = min(k, len(toks[r]))
                    events[r].append((len(toks[r]), spike))
                    m = len(toks[r])
                    drop = cols[r][m - n:] + [cols[r][m - n - 1] if m > n else tag_col[r]]  # + the token re-fed
                    attn[r, drop] = 0
                    attn[B + r, drop] = 0
                    del toks[r][len(toks[r]) - n:], cols[r][len(cols[r]) - n:], kls[r][len(kls[r]) - n:]
                    row_dose[r] *= factor
                    # the last kept token (or the tag) goes in again, at its own position, at the smaller dose
                    feed[r] = toks[r][-1] if toks[r] else int(ids[r, -1])
                    feed_mask[r], feed_pos[r] = 1, int(tag[r]) + len(toks[r])
                    if toks[r]:
                        cols[r][-1] = col
                    else:
                        tag_col[r] = col
                    continue
                t = int(nxt[r])
                if t in eos:
                    done[r] = True
                    continue
                toks[r].append(t)
                cols[r].append(col)
                kls[r].append(spike)
                if len(toks[r]) >= max_new_tokens:
                    done[r], truncated[r] = True, True
                    continue
                feed[r], feed_mask[r], feed_pos[r] = t, 1, int(tag[r]) + len(toks[r])
            if all(done):
                break
            f = torch.tensor(feed, device=dev)[:, None]
            fm = torch.tensor(feed_mask, device=dev, dtype=attn.dtype)[:, None]
            fp = torch.tensor(feed_pos, device=dev)[:, None]
            seq_ids = torch.cat([seq_ids, f], 1)
            inp, inp_pos = torch.cat([f, f]), torch.cat([fp, fp])
            attn = torch.cat([attn, torch.cat([fm, fm])], 1)
    return [{"ids": toks[r], "truncated": truncated[r], "backoffs": len(events[r]),
             "backoff_at": [e[0] for e in events[r]], "backoff_kl": [round(e[1], 4) for e in events[r]],
             "final_dose": float(spec.dose * float(row_dose[r])),
             "kl_mean": round(sum(kls[r]) / len(kls[r]), 5) if kls[r] else 0.0,
             "kl_max": round(max(kls[r]), 5) if kls[r] else 0.0} for r in range(B)]
