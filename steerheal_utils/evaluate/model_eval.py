"""One model's eval as it is now (adapters as the caller set them): the vignettes in both frames,
the on-axis probe, the held-out answers and their KL to the base."""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from ..batching import left_pad, length_sorted_batches
from ..chat import prompt_ids
from ..kl import reverse as kl_reverse
from ..models import model_device
from ..vector.steering import Steering
from .engine import greedy, next_token_logprobs, think_logprobs
from .maths import probe_logodds, score_logprobs, summarize
from .prompts import (FOUNDATIONS, FRAMES, HUMAN_COLS, LABELS, PROTOCOLS, PROBE_LABELS, PROBE_PREFILL, VIGNETTE_PREFILL, PromptSet,
                      EvalError, label_token_ids, probe_template, split_prompts, think_opener, vignette_template)

# ------------------------------------------------------------------ vignette eval and probe
def vignette_reads(model: nn.Module, tok, rows: Sequence[dict], *, layout: str = "prefix", system: str | None = None,
                   think_tokens: int = 0, batch_size: int = 16, think_batch_size: int | None = None,
                   progress: bool = False, steering: Steering | None = None) -> tuple[torch.Tensor, list[list[str]]]:
    """``([rows, 2 frames, 7] answer log-probs in foundation order, read kind per row and frame)``.

    Without a think budget every read is ``"direct"`` (the prefill follows the prompt). With one,
    both layouts run tiny-mfv's think path (:func:`think_logprobs`; reads ``"forced"``,
    ``"natural"`` or ``"unscorable"``, whose log-probs are NaN); both frames' thoughts are decoded
    in one batched pass at ``think_batch_size`` (default ``batch_size``): decoding is launch-bound
    on a GPU, so a step costs about the same at batch 64 or 256 and fewer, wider calls finish sooner.
    """
    label_ids = label_token_ids(tok, VIGNETTE_PREFILL, LABELS)
    texts = [r["text"] for r in rows]
    frames = list(FRAMES.items())
    lp = torch.empty(len(rows), len(FRAMES), len(FOUNDATIONS))
    reads = [["direct"] * len(frames) for _ in rows]
    if think_tokens > 0:
        opener = think_opener(tok, system)
        sets = [split_prompts(tok, vignette_template(layout, order), texts, opener, system) for _, order in frames]
        both = PromptSet([], [s.prefix + r for s in sets for r in s.rests], [t for s in sets for t in s.tags])
        flat, kinds, _ = think_logprobs(model, tok, both, label_ids, VIGNETTE_PREFILL, think_tokens,
                                        batch_size=think_batch_size or batch_size, steering=steering, progress=progress)
        per_frame = [flat[k * len(texts):(k + 1) * len(texts)] for k in range(len(frames))]
        for i in range(len(rows)):
            reads[i] = [kinds[k * len(texts) + i] for k in range(len(frames))]
    else:
        per_frame = [next_token_logprobs(model, tok, split_prompts(tok, vignette_template(layout, order), texts,
                                                                   VIGNETTE_PREFILL, system),
                                         label_ids, batch_size=batch_size, reuse_prefix=layout == "prefix",
                                         progress=progress, desc=f"vignettes {frame}", steering=steering)
                     for frame, order in frames]
    for k, (_, order) in enumerate(frames):
        for slot, f in enumerate(order):  # slot order -> foundation order
            lp[:, k, FOUNDATIONS.index(f)] = per_frame[k][:, slot]
    return lp, reads


def vignette_logprobs(model: nn.Module, tok, rows: Sequence[dict], **kw) -> torch.Tensor:
    """``[rows, 2 frames, 7]`` answer log-probs in foundation order (NaN rows: unscorable thoughts);
    keywords as :func:`vignette_reads`."""
    return vignette_reads(model, tok, rows, **kw)[0]


def probe_logprobs(model: nn.Module, tok, items: Sequence[dict], *, layout: str = "prefix", system: str | None = None,
                   batch_size: int = 16, progress: bool = False, steering: Steering | None = None) -> torch.Tensor:
    """``[items, 2 orders, 2]`` log-probs of the (care, authority) option labels (direct answer, no think budget)."""
    label_ids = label_token_ids(tok, PROBE_PREFILL, PROBE_LABELS)
    lp = torch.empty(len(items), 2, 2)
    tmpl = probe_template(layout)
    for k, care_first in enumerate((True, False)):
        texts = []
        for it in items:
            a, b = (it["care_option"], it["authority_option"]) if care_first else (it["authority_option"], it["care_option"])
            texts.append(f'{it["situation"]}\n"1": "{a}"\n"2": "{b}"')
        ps = split_prompts(tok, tmpl, texts, PROBE_PREFILL, system)
        slot = next_token_logprobs(model, tok, ps, label_ids, batch_size=batch_size, reuse_prefix=layout == "prefix",
                                   progress=progress, desc="axis probe", steering=steering)
        lp[:, k] = slot if care_first else slot.flip(-1)
    return lp


def evaluate_model(model: nn.Module, tok, rows: Sequence[dict], *, probe: Sequence[dict] = (), layout: str = "prefix",
                   system: str | None = None, think_tokens: int = 0, batch_size: int = 16,
                   think_batch_size: int | None = None, progress: bool = False,
                   steering: Steering | None = None) -> dict:
    """Vignette eval (+ probe) of the model as it is now (adapters as set by the caller).

    Args:
        steering: the vector as generation applied it (dose, positions, halflife), applied to
            every forward of the eval; None evaluates the model as the caller left it (any hooks
            the caller registered stay active, e.g. ``with steer(model, sv, dose):``).

    Rows whose thought was unscorable in either frame are left out of every metric; the summary
    records their share (``unscorable``) and the share of reads taken from the model's own text
    (``natural_reads``). Returns ``{"summary": {...}, "rows": [{"id", "foundation_coarse", "p",
    "score", "mass", "read"}, ...]}`` (``p``/``score``/``mass`` None on an unscorable row).
    """
    t0 = time.time()
    lp, reads = vignette_reads(model, tok, rows, layout=layout, system=system, think_tokens=think_tokens,
                               batch_size=batch_size, think_batch_size=think_batch_size, progress=progress,
                               steering=steering)
    ok = torch.isfinite(lp).flatten(1).all(-1)
    if not ok.any():
        raise EvalError(f"none of the {len(rows)} vignettes could be scored: every thought closed itself without an answer")
    keep = ok.nonzero().flatten().tolist()
    human = torch.tensor([[float(r[HUMAN_COLS[f]]) for f in FOUNDATIONS] for r in rows])
    summary = summarize(lp[ok], [rows[i]["foundation_coarse"] for i in keep], human[ok])
    s = score_logprobs(lp[ok])
    at = {i: j for j, i in enumerate(keep)}
    per_row = []
    for i, r in enumerate(rows):
        j = at.get(i)
        per_row.append({"id": r["id"], "foundation_coarse": r["foundation_coarse"],
                        "p": None if j is None else [round(x, 6) for x in s["p"][j].tolist()],
                        "score": None if j is None else [round(x, 5) for x in s["score"][j].tolist()],
                        "mass": None if j is None else [round(x, 6) for x in s["mass"][j].tolist()],
                        "read": reads[i]})
    flat = [k for rr in reads for k in rr]
    summary.update({"unscorable": 1.0 - len(keep) / len(rows), "n_unscorable": len(rows) - len(keep),
                    "natural_reads": flat.count("natural") / len(flat)})
    if probe:
        pr = probe_logprobs(model, tok, probe, layout=layout, system=system, batch_size=batch_size, progress=progress,
                            steering=steering)
        summary.update(probe_logodds(pr))
    if steering is not None and not steering.is_noop:
        summary.update({"steer_positions": steering.positions, "dose_halflife": steering.halflife})
    summary.update({"layout": layout, "protocol": PROTOCOLS[layout], "think_tokens": think_tokens,
                    "seconds": round(time.time() - t0, 2)})
    return {"summary": summary, "rows": per_row}


# ------------------------------------------------------------------ held-out answers and KL to base
def heldout_answers(model: nn.Module, tok, items: Sequence[dict], max_new_tokens: int, batch_size: int = 16,
                    progress: bool = False) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """Greedy answers to held-out prompts: ``(records, prompt ids, answer ids)``."""
    prompts = [prompt_ids(tok, it["text"])[0] for it in items]
    answers = greedy(model, tok, prompts, max_new_tokens, batch_size, progress, desc="held-out answers")
    recs = [{"id": it["id"], "prompt": it["text"], "answer": tok.decode(a, skip_special_tokens=True).strip()}
            for it, a in zip(items, answers)]
    return recs, prompts, answers


@torch.inference_mode()
def answer_kl(model: nn.Module, ref_ctx, tok, prompts: Sequence[list[int]], answers: Sequence[list[int]],
              batch_size: int = 8) -> float:
    """Mean per-token KL(model || reference) over the answer tokens, full vocabulary, float32.

    Args:
        ref_ctx: a zero-argument callable returning a context manager under which ``model``
            is the reference (e.g. ``model.disable_adapter``).
    """
    dev = model_device(model)
    idx = [i for i, a in enumerate(answers) if a]
    total, count = 0.0, 0
    for b in length_sorted_batches([len(prompts[i]) + len(answers[i]) for i in idx], batch_size):
        rows = [idx[j] for j in b]
        ids, mask, pos = left_pad([list(prompts[i]) + list(answers[i]) for i in rows], tok.pad_token_id, dev)
        # answer token t is predicted at position t-1: score the positions before each answer token
        sel = torch.zeros_like(mask, dtype=torch.bool)
        for j, i in enumerate(rows):
            sel[j, ids.shape[1] - len(answers[i]) - 1: ids.shape[1] - 1] = True
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[sel].float(), -1)
        with ref_ctx():
            lq = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[sel].float(), -1)
        kl = kl_reverse(lp, lq)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)
