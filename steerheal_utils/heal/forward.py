"""Heal's forward pieces: per-completion-position NLL and KL to the reference, in float32.

Memory: logits are only formed for completion positions. Hidden states are gathered at those
positions first, then ``lm_head`` + float32 log-softmax run in chunks of ``kl_chunk`` rows,
each chunk under activation checkpointing, so at most one chunk of full-vocabulary float32
rows (student and reference) is alive at a time, also during backward.

Logit softcapping (Gemma 2/3 ``final_logit_softcapping``) is applied explicitly in
:func:`head_logits` from the model's text config, exactly as the HF forward does it; a test
compares against the model's own ``forward().logits`` with a softcap set.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kl import kl as kl_between
from .student import causal_lm, reference


def position_kl(logp_s: torch.Tensor, logp_r: torch.Tensor, direction: str = "reverse") -> torch.Tensor:
    """Per-position KL of student and reference (:func:`steerheal_utils.kl.kl`), clamped at 0
    (rounding can give -1e-7)."""
    return kl_between(logp_s, logp_r, direction).clamp_min(0.0)


def head_logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits computed in float32 from final hidden states: the model's ``lm_head`` weight (and
    bias) cast to float32, then its final logit softcap if it has one (Gemma 2/3), as the HF
    forward does.

    The matmul itself runs in float32, with autocast off: a bfloat16 head rounds every logit to
    8 significant bits (up to 0.06 at logits of 16-32) before the float32 log-softmax. Measured on
    SmolLM2-135M's logits (top logit ~24): that rounding alone is a per-token KL of 4e-4 on
    average (max 2e-3), and a small step whose true KL is 4e-7 reads 2.4e-5 through two bf16
    heads: a noise floor under the barrier's D and its quantile-calibrated tau. The cast
    copy of the weight lives for one call (262k x 2560 at gemma-3-4b: 2.7 GB, freed after the
    chunk; with ``kl_chunk`` 1024 the float32 logits of a chunk are 1.1 GB themselves).
    """
    causal = causal_lm(model)
    head = causal.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head_logits expects an nn.Linear output head, got {type(head).__name__}")
    h = h.to(head.weight.device)  # a no-op unless the model is spread over devices (devices.py)
    with torch.autocast(h.device.type, enabled=False):
        bias = head.bias.float() if head.bias is not None else None
        logits = torch.nn.functional.linear(h.float(), head.weight.float(), bias)
    cap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, S, d]`` last hidden states (after the final norm) of the causal LM's decoder, on the device
    of the batch (the decoder of a model spread over devices ends on its last block's device)."""
    causal = causal_lm(model)
    decoder = getattr(causal, "model", None) or causal.get_decoder()
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    return out[0].to(batch["input_ids"].device)


def autocast(model: nn.Module):
    p = next(model.parameters())
    low = p.dtype in (torch.bfloat16, torch.float16)
    # bf16 autocast only where the weights are bf16/fp16 (float32 LoRA weights meet bf16 activations)
    return torch.autocast(p.device.type, dtype=p.dtype, enabled=low and p.device.type == "cuda")


def _chunk_nll_kl(h_s, h_r, tgt, model, direction):
    logp_s = torch.log_softmax(head_logits(model, h_s), -1)
    nll = -logp_s.gather(-1, tgt[:, None].to(logp_s.device)).squeeze(-1)
    if h_r is None:
        return nll, None
    with torch.no_grad():
        logp_r = torch.log_softmax(head_logits(model, h_r), -1)
    return nll, position_kl(logp_s, logp_r, direction)


def completion_terms(model: nn.Module, batch: dict, *, ref: str | None, new: str = "", earlier: Sequence[str] = (),
                     direction: str = "reverse", kl_grad: bool = True, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-completion-position NLL and KL, as ``[B, S]`` tensors (0 off the loss mask).

    The reference forward (``ref`` not None) runs under no_grad. Only masked rows go through
    the head, ``chunk`` at a time, checkpointed when gradients are on.
    """
    mask = batch["loss_mask"]
    h_r = None
    if ref is not None:
        with torch.no_grad(), reference(model, ref, new, earlier):
            was = model.training
            model.eval()
            h_r = final_hidden(model, batch)[mask]
            model.train(was)
    h_s = final_hidden(model, batch)[mask]
    tgt = batch["targets"][mask]
    nlls, kls = [], []
    grad = torch.is_grad_enabled()
    for i in range(0, h_s.shape[0], chunk):
        hs, ht = h_s[i:i + chunk], tgt[i:i + chunk]
        hr = h_r[i:i + chunk] if h_r is not None else None
        if grad and kl_grad:
            nll, kl = checkpoint(_chunk_nll_kl, hs, hr, ht, model, direction, use_reentrant=False)
        elif grad:  # KL for telemetry only: no graph through it
            nll, _ = checkpoint(_chunk_nll_kl, hs, None, ht, model, direction, use_reentrant=False)
            with torch.no_grad():
                kl = _chunk_nll_kl(hs.detach(), hr, ht, model, direction)[1] if hr is not None else None
        else:
            nll, kl = _chunk_nll_kl(hs, hr, ht, model, direction)
        nlls.append(nll)
        kls.append(kl)
    nll_full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    nll_full = nll_full.masked_scatter(mask, torch.cat(nlls).to(mask.device)) if nlls else nll_full
    kl_full = None
    if h_r is not None:
        kl_full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kl_full = kl_full.masked_scatter(mask, torch.cat(kls).to(mask.device)) if kls else kl_full
    return nll_full, kl_full
