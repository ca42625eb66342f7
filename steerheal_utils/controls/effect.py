"""The size of a steering vector's effect: next-token KL(steered || unsteered) at the assistant tag."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import datafiles
from ..batching import left_pad, length_sorted_batches
from ..chat import prompt_ids
from ..kl import reverse as kl_reverse
from ..models import model_device
from ..vector.steering import steer
from ..vector.value import SteeringVector


def kl_prompts(tok, n: int = 0) -> list[list[int]]:
    """Prompt ids (chat template, default system) of the shipped dilemma pool; the first ``n`` (0 = all 48)."""
    rows = datafiles.prompts("dilemmas")
    rows = rows[:n] if n else rows
    return [prompt_ids(tok, r["text"])[0] for r in rows]


@torch.inference_mode()
def tag_logprobs(model: nn.Module, tok, prompts: Sequence[list[int]], batch_size: int = 16) -> torch.Tensor:
    """``[n, vocab]`` float32 log-softmax of the next token at each prompt's last position (the assistant tag).

    Steering hooks active in the caller's context apply (prompts are left-padded, so every
    row's tag is the last position, which is what ``steer(positions="generated")`` assumes).
    """
    dev = model_device(model)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for b in length_sorted_batches([len(p) for p in prompts], batch_size):
        ids, mask, pos = left_pad([prompts[i] for i in b], tok.pad_token_id, dev)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1).logits[:, -1]
        lsm = torch.log_softmax(logits.float(), -1).cpu()
        for j, i in enumerate(b):
            out[i] = lsm[j]
    return torch.stack(out)


def mean_kl(lp: torch.Tensor, lq: torch.Tensor) -> float:
    """Mean over rows of KL(p || q) from ``[n, vocab]`` log-probs (float64 sum; NaN if any row is not finite)."""
    kl = kl_reverse(lp.double(), lq.double())
    return float(kl.mean()) if torch.isfinite(kl).all() else float("nan")


def tag_kl(model: nn.Module, tok, prompts: Sequence[list[int]], vector: SteeringVector | None, dose: float, *,
           ref: torch.Tensor | None = None, positions: str = "all", halflife: int = 0, batch_size: int = 16,
           gate: float | None = None, gate_kind: str = "threshold") -> float:
    """Mean next-token KL(steered || unsteered) at the assistant tag over ``prompts``.

    Args:
        vector, dose: what :func:`steerheal_utils.vector.steer` adds (``positions`` and
            ``halflife`` as in generation; at the tag the halflife factor is 1).
        ref: the unsteered :func:`tag_logprobs` of the same prompts (computed if None).
        gate, gate_kind: the cosine gate of the ``cosine_gate`` mode (None = off), as in generation.

    Returns NaN when the steered logits are not finite (a dose far too high).
    """
    if ref is None:
        ref = tag_logprobs(model, tok, prompts, batch_size)
    with steer(model, vector, dose, positions=positions, halflife=halflife, gate=gate, gate_kind=gate_kind):
        lp = tag_logprobs(model, tok, prompts, batch_size)
    return mean_kl(lp, ref)
