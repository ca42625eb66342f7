"""Stage 04: heal. Distil the steered completions into a fresh LoRA adapter, under a KL barrier.

Round ``r`` trains a new adapter ``r{r:02d}`` on top of the model at round ``r`` (the base plus
the frozen, unmerged adapters of rounds ``0..r-1``, see :func:`models.load_round_model`)::

    loss = NLL(completion tokens) + lam_r * mean_b relu(D_b - tau),   lam_r = lam * (1 + r)^lam_round_pow

- NLL: mean over completion tokens of the batch; prompt and padding are masked; the target
  after the last completion token is the end-of-turn id when the completion ended naturally.
- D_b: per-position KL between student and reference over the full vocabulary, in float32 from
  the head's matmul on (:func:`head_logits`; reverse KL(student || ref) by default), aggregated per sequence over its completion
  positions by :func:`aggregate_kl` (mean, rmse, p95 or max). The hinge acts per sequence and
  is then averaged over the batch, so neither D nor the barrier depends on the batch size, and
  one looping sequence is penalised even when the batch mean is below tau.
- Reference ``base``: every adapter off (``model.disable_adapter()``); ``prev``: earlier rounds
  on, the new adapter off. Computed under ``torch.no_grad``.
- ``reg = nll`` drops the barrier and ``reg = wd`` uses AdamW weight decay instead; D is
  still measured every step (no gradient) so the baselines are comparable.
- tau: ``absolute`` uses ``cfg.tau``. ``quantile`` sets tau to the ``tau_quantile`` quantile of
  the per-sequence D over all training rows, measured once after the LR warm-up, with the
  barrier off until then. (At step 0 the student equals the reference whenever ref=prev or
  r=0, because B=0, so D would be identically 0 there.) The tau used is written to heal.json.

Memory: logits are only formed for completion positions. Hidden states are gathered at those
positions first, then ``lm_head`` + float32 log-softmax run in chunks of ``kl_chunk`` rows,
each chunk under activation checkpointing, so at most one chunk of full-vocabulary float32
rows (student and reference) is alive at a time, also during backward.

Logit softcapping (Gemma 2/3 ``final_logit_softcapping``) is applied explicitly in
:func:`head_logits` from the model's text config, exactly as the HF forward does it; a test
compares against the model's own ``forward().logits`` with a softcap set.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import get_layers, left_pad, model_device, render_prompt

AGGREGATES = ("mean", "rmse", "p95", "max")
HEAL_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layer_lo", "lora_layer_hi", "reg",
             "kl_dir", "kl_agg", "kl_ref", "lam", "lam_round_pow", "tau", "tau_mode", "tau_quantile",
             "weight_decay", "wd_strength", "lr", "beta1", "beta2", "warmup_frac", "epochs",
             "train_batch_size", "grad_clip", "max_seq_len", "kl_chunk", "q1_prompts")
# decide() reasons that mean "the text loops or falls apart" (the Q1 loop detector)
LOOP_REASONS = ("degenerate_loop", "affect_loop", "token_soup", "drift", "repetition", "entropy_collapse")


# ------------------------------------------------------------------ maths (pure)
def position_kl(logp_s: torch.Tensor, logp_r: torch.Tensor, direction: str = "reverse") -> torch.Tensor:
    """Per-row KL between two log-distributions over the last dim.

    Args:
        logp_s, logp_r: ``[..., V]`` log-probabilities of student and reference (float32).
        direction: ``reverse`` = KL(student || ref) = sum p_s (log p_s - log p_r);
            ``forward`` = KL(ref || student).

    Returns ``[...]``, clamped at 0 (rounding can give -1e-7).
    """
    if direction == "reverse":
        kl = (logp_s.exp() * (logp_s - logp_r)).sum(-1)
    elif direction == "forward":
        kl = (logp_r.exp() * (logp_r - logp_s)).sum(-1)
    else:
        raise ValueError(f"kl_dir must be 'reverse' or 'forward', got {direction!r}")
    return kl.clamp_min(0.0)


def aggregate_kl(kl: torch.Tensor, mask: torch.Tensor, how: str = "rmse") -> torch.Tensor:
    """Aggregate per-position KL into one number per sequence, over its masked positions only.

    Args:
        kl: ``[batch, seq]`` per-position KL (any float dtype; computed in float32).
        mask: ``[batch, seq]`` bool/0-1, True at completion positions.
        how: ``mean``; ``rmse`` = sqrt(mean kl^2); ``p95`` = 95th percentile with linear
            interpolation (as ``torch.quantile``); ``max``.

    Returns ``[batch]`` float32; 0 for a row without masked positions. Differentiable.

    Example: a 4-token loop in a 60-token completion, KL 0 except 2, 4, 6, 8 at the loop, gives
    mean 0.33 < rmse 1.41 < p95 2.1 < max 8: the spikes dominate every aggregate but the mean.
    """
    if kl.shape != mask.shape or kl.dim() != 2:
        raise ValueError(f"kl and mask must both be [batch, seq], got {tuple(kl.shape)} and {tuple(mask.shape)}")
    k = kl.float()
    m = mask.bool()
    n = m.sum(-1)
    nz = n.clamp_min(1).to(k.dtype)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    if how == "mean":
        out = torch.where(m, k, zero).sum(-1) / nz
    elif how == "rmse":
        ms = torch.where(m, k * k, zero).sum(-1) / nz
        out = ms.clamp_min(1e-30).sqrt() * (n > 0)  # clamp: finite gradient at exactly 0
    elif how == "max":
        out = torch.where(m, k, torch.full_like(k, -math.inf)).amax(-1)
        out = torch.where(n > 0, out, zero)
    elif how == "p95":
        # Masked positions sort to the end (+inf); the valid ones are the first n of each row.
        srt = torch.where(m, k, torch.full_like(k, math.inf)).sort(-1).values
        pos = 0.95 * (n - 1).clamp_min(0).to(k.dtype)
        lo = pos.floor().long()
        hi = pos.ceil().long()
        v_lo = srt.gather(-1, lo[:, None]).squeeze(-1)
        v_hi = srt.gather(-1, hi[:, None]).squeeze(-1)
        out = v_lo + (pos - lo.to(k.dtype)) * (v_hi - v_lo)
        out = torch.where(n > 0, out, zero)
    else:
        raise ValueError(f"kl_agg must be one of {AGGREGATES}, got {how!r}")
    return out


def barrier_weight(lam: float, n_baked: int, power: float) -> float:
    """lam_r = lam * (1 + r)^power, r = number of rounds already baked in."""
    return float(lam) * float(1 + n_baked) ** float(power)


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return f


# ------------------------------------------------------------------ data
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


# ------------------------------------------------------------------ the student
def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_target_regex(model: nn.Module, targets: Sequence[str], lo: float, hi: float) -> tuple[str, list[int]]:
    """A peft ``target_modules`` regex for the named linears of the decoder blocks in [lo, hi]
    of depth. Anchored on the decoder's own layer list, so a vision tower's blocks of the same
    names (multimodal Gemma 3) are never touched."""
    import re

    from .config import depth_band

    causal = causal_lm(model)
    blocks = get_layers(causal)
    prefix = next(n for n, m in causal.named_modules() if m is blocks)
    layers = depth_band(len(blocks), lo, hi)
    if not targets:
        raise ValueError("lora_targets is empty: name at least one linear module (e.g. q_proj)")
    rx = rf"{re.escape(prefix)}\.({'|'.join(map(str, layers))})\.(.*\.)?({'|'.join(map(re.escape, targets))})"
    names = [n for n, _ in causal.named_modules() if re.fullmatch(rx, n)]
    if not names:
        raise ValueError(f"lora_targets {list(targets)} match no module in layers {layers} of {type(causal).__name__}")
    return rx, layers


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def set_active(model: nn.Module, active: Sequence[str], trainable: str | None) -> None:
    """Activate exactly ``active`` adapters and make only ``trainable``'s LoRA weights trainable.

    peft's ``set_adapter`` turns ``requires_grad`` on for every active adapter, so the earlier
    rounds are re-frozen here explicitly (test_baking checks the gradients).
    """
    model.base_model.set_adapter(list(active), inference_mode=True)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is not None and "lora_" in name and f".{trainable}." in name)


def make_student(model: nn.Module, cfg, rnd: int, seed: int = 0) -> tuple[nn.Module, str, list[str]]:
    """Add this round's fresh LoRA adapter to the model at round ``rnd``.

    Args:
        model: base model (round 0) or the PeftModel from :func:`models.bake_adapters`.
        cfg: Config (lora_* knobs).
        rnd: round number; the new adapter is named ``r{rnd:02d}``.

    Returns ``(peft_model, new_name, earlier_names)``; all adapters active, only the new one
    trainable. B is zero-initialised (peft's LoRA default), so the student equals the model
    it starts from.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    earlier = adapter_names(model) if isinstance(model, PeftModel) else []
    if len(earlier) != rnd:
        raise ValueError(f"round {rnd} expects {rnd} baked adapters, the model has {len(earlier)}: {earlier}")
    new = f"r{rnd:02d}"
    rx, layers = lora_target_regex(model, cfg.lora_targets, cfg.lora_layer_lo, cfg.lora_layer_hi)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=rx,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's kaiming init
        if isinstance(model, PeftModel):
            model.add_adapter(new, lcfg)
        else:
            model = get_peft_model(model, lcfg, adapter_name=new)
    set_active(model, earlier + [new], new)
    return model, new, earlier


@contextlib.contextmanager
def reference(model: nn.Module, ref: str, new: str, earlier: Sequence[str]) -> Iterator[None]:
    """The KL reference inside the block: ``base`` (every adapter off) or ``prev`` (earlier on,
    new off). Restores all adapters active and only ``new`` trainable on exit."""
    if ref == "base" or (ref == "prev" and not earlier):
        try:
            with model.disable_adapter():
                yield
        finally:  # peft re-enables the adapters with requires_grad on for every active one
            set_active(model, list(earlier) + [new] if new else list(earlier), new or None)
    elif ref == "prev":
        try:
            set_active(model, earlier, None)
            yield
        finally:
            set_active(model, list(earlier) + [new], new)
    else:
        raise ValueError(f"kl_ref must be 'base' or 'prev', got {ref!r}")


# ------------------------------------------------------------------ forward pieces
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
    with torch.autocast(h.device.type, enabled=False):
        bias = head.bias.float() if head.bias is not None else None
        logits = torch.nn.functional.linear(h.float(), head.weight.float(), bias)
    cap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, S, d]`` last hidden states (after the final norm) of the causal LM's decoder."""
    causal = causal_lm(model)
    decoder = getattr(causal, "model", None) or causal.get_decoder()
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], use_cache=False)
    return out[0]


def _autocast(model: nn.Module):
    p = next(model.parameters())
    low = p.dtype in (torch.bfloat16, torch.float16)
    # bf16 autocast only where the weights are bf16/fp16 (float32 LoRA weights meet bf16 activations)
    return torch.autocast(p.device.type, dtype=p.dtype, enabled=low and p.device.type == "cuda")


def _chunk_nll_kl(h_s, h_r, tgt, model, direction):
    logp_s = torch.log_softmax(head_logits(model, h_s), -1)
    nll = -logp_s.gather(-1, tgt[:, None]).squeeze(-1)
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
    nll_full = nll_full.masked_scatter(mask, torch.cat(nlls)) if nlls else nll_full
    kl_full = None
    if h_r is not None:
        kl_full = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kl_full = kl_full.masked_scatter(mask, torch.cat(kls)) if kls else kl_full
    return nll_full, kl_full


@dataclass
class HealParams:
    """What one step needs to know (built from the config by :meth:`from_config`)."""

    new: str
    earlier: list[str]
    reg: str = "kl"
    kl_dir: str = "reverse"
    kl_agg: str = "rmse"
    kl_ref: str = "base"
    lam_r: float = 1.0
    tau: float | None = 0.5     # None: barrier off (quantile mode before calibration)
    grad_clip: float = 1.0
    chunk: int = 1024

    @classmethod
    def from_config(cls, cfg, new: str, earlier: Sequence[str]) -> "HealParams":
        return cls(new=new, earlier=list(earlier), reg=cfg.reg, kl_dir=cfg.kl_dir, kl_agg=cfg.kl_agg,
                   kl_ref=cfg.kl_ref, lam_r=barrier_weight(cfg.lam, len(earlier), cfg.lam_round_pow),
                   tau=cfg.tau if cfg.tau_mode == "absolute" else None, grad_clip=cfg.grad_clip,
                   chunk=cfg.kl_chunk)


def heal_loss(model: nn.Module, batch: dict, hp: HealParams) -> tuple[torch.Tensor, dict[str, Any]]:
    """The heal loss of one batch and its telemetry (floats; D under every aggregate)."""
    barrier_on = hp.reg == "kl" and hp.tau is not None
    with _autocast(model):
        nll, kl = completion_terms(model, batch, ref=hp.kl_ref, new=hp.new, earlier=hp.earlier,
                                   direction=hp.kl_dir, kl_grad=barrier_on, chunk=hp.chunk)
    mask = batch["loss_mask"]
    n_tok = mask.sum()
    nll_mean = nll.sum() / n_tok.clamp_min(1)
    d_rows = {how: aggregate_kl(kl, mask, how) for how in AGGREGATES}
    d = d_rows[hp.kl_agg]
    loss = nll_mean
    barrier = torch.zeros((), device=nll.device)
    if barrier_on:
        barrier = torch.relu(d - hp.tau).mean()
        loss = loss + hp.lam_r * barrier
    stats = {"loss": float(loss.detach()), "nll": float(nll_mean.detach()), "D": float(d.detach().mean()),
             **{f"D_{how}": float(v.detach().mean()) for how, v in d_rows.items()},
             "barrier": float(barrier.detach()),
             "hinge_frac": float((d.detach() > hp.tau).float().mean()) if barrier_on else 0.0,
             "tokens": int(n_tok)}
    return loss, stats


def heal_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, scheduler, hp: HealParams,
              step: int = 0) -> dict[str, Any]:
    """One optimiser step: loss, backward, clip, step. Raises FloatingPointError on NaN/inf.

    Usable alone (e.g. a benchmark): build the student with :func:`make_student`, the batch
    with :func:`collate`, and an optimizer over the new adapter's parameters.
    """
    optimizer.zero_grad(set_to_none=True)
    loss, stats = heal_loss(model, batch, hp)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"heal step {step}: loss is {float(loss.detach())} (nll={stats['nll']}, D={stats['D']}, "
                                 f"barrier={stats['barrier']}): stopping the round, no adapter saved. Lower lr, "
                                 "check the model dtype (float16 overflows) and the training rows.")
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    gn = torch.nn.utils.clip_grad_norm_(params, hp.grad_clip if hp.grad_clip > 0 else float("inf"))
    if not torch.isfinite(gn):
        raise FloatingPointError(f"heal step {step}: gradient norm is {float(gn)} (loss {stats['loss']}): "
                                 "stopping the round, no adapter saved.")
    stats["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats["grad_norm"] = float(gn)
    return stats


@torch.no_grad()
def sequence_d(model: nn.Module, examples: Sequence[Example], hp: HealParams, pad_id: int, batch_size: int) -> dict[str, list[float]]:
    """Per-sequence D under every aggregate for the given examples (no gradient)."""
    dev = model_device(model)
    out = {how: [] for how in AGGREGATES}
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, dev)
        with _autocast(model):
            _, kl = completion_terms(model, batch, ref=hp.kl_ref, new=hp.new, earlier=hp.earlier,
                                     direction=hp.kl_dir, chunk=hp.chunk)
        for how in AGGREGATES:
            out[how] += aggregate_kl(kl, batch["loss_mask"], how).tolist()
    return out


# ------------------------------------------------------------------ training
@dataclass
class HealResult:
    new: str
    agg: str = "rmse"
    steps: list[dict] = field(default_factory=list)
    tau: float | None = None
    tau_info: dict = field(default_factory=dict)
    lam_r: float = 0.0
    n_rows: int = 0
    n_skipped: int = 0
    seconds: float = 0.0


def train(model: nn.Module, tok, rows: Sequence[dict], cfg, rnd: int, *, seed: int = 0,
          progress: bool = True) -> tuple[nn.Module, HealResult]:
    """Train round ``rnd``'s adapter on kept rows. Returns ``(student, result)``; saves nothing.

    ``model`` is the model at round ``rnd`` (from :func:`models.load_round_model`, unmerged).
    """
    from .progress import tqdm  # a plain final line, not a frozen widget, in the journal

    t0 = time.time()
    examples, skipped = encode_rows(tok, rows, cfg.max_seq_len)
    if not examples:
        raise ValueError(f"round {rnd}: no trainable rows ({len(rows)} kept rows, {skipped} skipped for max_seq_len "
                         f"{cfg.max_seq_len}): check completions.jsonl and max_seq_len")
    model, new, earlier = make_student(model, cfg, rnd, seed=seed)
    hp = HealParams.from_config(cfg, new, earlier)
    model.train(cfg.lora_dropout > 0)  # only LoRA dropout differs between modes
    params = [p for p in model.parameters() if p.requires_grad]
    wd = cfg.wd_strength if cfg.reg == "wd" else cfg.weight_decay
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=wd)
    bs = cfg.train_batch_size
    per_epoch = math.ceil(len(examples) / bs)
    total = per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_frac * total))
    calib_at = max(1, warmup) if cfg.tau_mode == "quantile" and cfg.reg == "kl" else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup))
    res = HealResult(new=new, agg=cfg.kl_agg, lam_r=hp.lam_r, tau=hp.tau, n_rows=len(examples), n_skipped=skipped)
    dev = model_device(model)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=f"heal r{rnd:02d}", disable=not progress, leave=False)
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(examples), generator=g).tolist()
        for b in range(per_epoch):
            if calib_at is not None and step == calib_at:
                hp.tau, res.tau_info = calibrate_tau(model, examples, hp, cfg, tok.pad_token_id, step)
                res.tau = hp.tau
            batch = collate([examples[i] for i in order[b * bs:(b + 1) * bs]], tok.pad_token_id, dev)
            t = time.time()
            stats = heal_step(model, batch, opt, sched, hp, step)
            stats.update(step=step, epoch=epoch, tau=hp.tau, seconds=time.time() - t)
            res.steps.append(stats)
            bar.update(1)
            bar.set_postfix(nll=f"{stats['nll']:.3f}", D=f"{stats['D']:.3g}")
            step += 1
    bar.close()
    if calib_at is not None and res.tau is None:  # fewer steps than the warm-up: calibrate at the end
        hp.tau, res.tau_info = calibrate_tau(model, examples, hp, cfg, tok.pad_token_id, step)
        res.tau = hp.tau
    model.eval()
    set_active(model, earlier + [new], None)
    res.seconds = time.time() - t0
    return model, res


def calibrate_tau(model, examples, hp: HealParams, cfg, pad_id: int, step: int) -> tuple[float, dict]:
    """tau = the ``tau_quantile`` quantile of per-sequence D (the configured aggregate) over all
    training rows, with the student as it is now (after the warm-up)."""
    was = model.training
    model.eval()
    d = sequence_d(model, examples, hp, pad_id, cfg.train_batch_size)
    model.train(was)
    tau = float(torch.quantile(torch.tensor(d[hp.kl_agg], dtype=torch.float32), cfg.tau_quantile))
    info = {"calibrated_at_step": step, "quantile": cfg.tau_quantile,
            "D_quantiles": {how: {q: float(torch.quantile(torch.tensor(v), q)) for q in (0.5, 0.9, 0.99)}
                            for how, v in d.items()}}
    return tau, info


# ------------------------------------------------------------------ saving
def save_adapter(model: nn.Module, name: str, path: Path | str) -> Path:
    """Write only adapter ``name`` as a peft folder (safetensors) at ``path``, atomically."""
    import shutil
    import tempfile

    from .runfolder import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=".save.", suffix=".tmp") as scratch:
        # save_embedding_layers=False: we never adapt embeddings, and "auto" would look the base model up on the hub
        model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
        src = Path(scratch) / name if (Path(scratch) / name).is_dir() else Path(scratch)  # peft nests non-default names
        for f in src.iterdir():
            if f.is_file():
                shutil.move(str(f), tmp / f.name)
    return path


def steps_csv(steps: Sequence[dict]) -> str:
    cols = ["step", "epoch", "loss", "nll", "D", *[f"D_{h}" for h in AGGREGATES], "barrier", "hinge_frac", "tau",
            "lr", "grad_norm", "tokens", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for s in steps:
        w.writerow(s)
    return buf.getvalue()


def heal(model: nn.Module, tok, rows: Sequence[dict], cfg, rnd: int, out_dir: Path | str, *, seed: int = 0,
         progress: bool = True) -> tuple[nn.Module, HealResult]:
    """Train, then write ``adapter/``, ``heal.json`` and ``heal_steps.csv`` into ``out_dir``.

    Nothing is written when training raises (e.g. FloatingPointError on a NaN loss).
    """
    from .contract import artifact
    from .runfolder import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    model, res = train(model, tok, rows, cfg, rnd, seed=seed, progress=progress)
    save_adapter(model, res.new, out_dir / artifact("adapter").file)
    atomic_write_text(out_dir / artifact("heal_steps").file, steps_csv(res.steps))
    last = res.steps[-1] if res.steps else {}
    first = res.steps[0] if res.steps else {}
    atomic_write_json(out_dir / artifact("heal_summary").file, {
        "round": rnd, "adapter": res.new, "baked": [f"r{i:02d}" for i in range(rnd)],
        "tau_used": res.tau, "tau_mode": cfg.tau_mode, "tau_info": res.tau_info, "lam_r": res.lam_r,
        "config": {k: getattr(cfg, k) for k in HEAL_KEYS},
        "summary": {"rows": res.n_rows, "skipped": res.n_skipped, "steps": len(res.steps), "seconds": res.seconds,
                    "nll_first": first.get("nll"), "nll_last": last.get("nll"),
                    "D_last": {h: last.get(f"D_{h}") for h in AGGREGATES},
                    "hinge_frac_mean": sum(s["hinge_frac"] for s in res.steps) / max(1, len(res.steps))},
    })
    return model, res


def kept_rows(path: Path | str) -> list[dict]:
    """Rows of ``completions.jsonl`` with ``"keep": true``."""
    from .runfolder import read_jsonl

    return [r for r in read_jsonl(path, "completions (02_generate/03_filter output)") if r.get("keep") is True]


def run_stage(ctx, model: nn.Module, tok) -> tuple[nn.Module, HealResult]:
    """04_heal: train this round's adapter on the kept completions and save it."""
    rows = kept_rows(ctx.artifact("completions"))
    if not rows:
        raise ValueError(f"{ctx.artifact('completions')} has no kept rows: nothing to heal on (see 03_filter)")
    return heal(model, tok, rows, ctx.cfg, ctx.round, ctx.out_dir, seed=ctx.seed)


# ------------------------------------------------------------------ Q1: can we heal?
@torch.no_grad()
def token_kl(model: nn.Module, tok, rows: Sequence[dict], *, ref: str = "base", direction: str = "reverse",
             max_seq_len: int = 512, batch_size: int = 8, chunk: int = 1024) -> list[dict]:
    """Per-token KL(model || ref) over each row's completion: [{tokens, kl}] for heatmaps."""
    examples, _ = encode_rows(tok, rows, max_seq_len)
    dev = model_device(model)
    names = adapter_names(model)
    out = []
    for i in range(0, len(examples), batch_size):
        ex = examples[i:i + batch_size]
        batch = collate(ex, tok.pad_token_id, dev)
        with _autocast(model):
            _, kl = completion_terms(model, batch, ref=ref, new="", earlier=names, direction=direction, chunk=chunk)
        for e, k, m, tg in zip(ex, kl, batch["loss_mask"], batch["targets"]):
            out.append({"tokens": [tok.decode([t]) for t in tg[m].tolist()], "kl": k[m].tolist()})
    return out


def q1_scores(model: nn.Module, tok, sets: dict[str, list[dict]], cfg) -> dict[str, dict]:
    """Rates per set of answers: median tail perplexity under base, loop-detector rate,
    narration rate, mean per-token KL(model || base), decide() reasons."""
    from collections import Counter

    from . import filter as F

    th = F.FilterThresholds.from_config(cfg)
    out = {}
    for name, rows in sets.items():
        prompts = [render_prompt(tok, r["prompt"]) for r in rows]
        comps = [r["completion"] for r in rows]
        with model.disable_adapter():  # every set was sampled here: score the sampled ids
            ms = F.model_scores(model, tok, prompts, comps, tail_frac=cfg.tail_frac, batch_size=cfg.batch_size,
                                completion_ids=[r.get("completion_ids") for r in rows])
        kls = token_kl(model, tok, rows, max_seq_len=cfg.max_seq_len, batch_size=cfg.batch_size, chunk=cfg.kl_chunk)
        reasons, loops, narr, tail = Counter(), 0, 0, []
        for c, m in zip(comps, ms):
            s = {**F.text_scores(c, persona_pos=cfg.pos_persona, persona_neg=cfg.neg_persona), **m}
            r = F.decide(s, th)
            reasons[r] += 1
            narr += r == "narration"
            # the loop detector alone: the gates before it (narration, refusal) switched off
            shape = {**s, "refusal": False, "narration_regex": False, "narration_self": 0.0, "narration_pos": 0.0,
                     "narration_neg": 0.0, "n_words": max(s.get("n_words") or 0, th.min_words)}
            loops += F.decide(shape, th) in LOOP_REASONS
            if m.get("tail_ppl") is not None:
                tail.append(m["tail_ppl"])
        all_kl = [v for k in kls for v in k["kl"]]
        n = max(1, len(rows))
        out[name] = {"n": len(rows), "tail_ppl_median": float(torch.tensor(tail).median()) if tail else None,
                     "loop_rate": loops / n, "narration_rate": narr / n,
                     "kl_to_base_per_token": sum(all_kl) / max(1, len(all_kl)), "reasons": dict(reasons),
                     "examples": [r["completion"][:300] for r in rows[:3]]}
    return out


def run_q1(ctx, model: nn.Module, tok, n_prompts: int | None = None) -> dict:
    """Q1: the healed model's own greedy and sampled answers vs the steered completions on the
    same prompts. Writes ``round_NN/heal_q1.json``."""
    from . import generate as G
    from .runfolder import atomic_write_json

    cfg = ctx.cfg
    n = cfg.q1_prompts if n_prompts is None else n_prompts
    kept = kept_rows(ctx.artifact("completions"))
    seen, steered = set(), []
    for r in kept:  # one steered completion per prompt
        if r["prompt"] not in seen and len(steered) < n:
            seen.add(r["prompt"])
            steered.append(r)
    prompts = [r["prompt"] for r in steered]
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=ctx.seed)
    sets = {"steered": steered,  # unsteered below: the healed model on its own, no persona
            "healed_greedy": [dict(r, prompt=p) for p, r in zip(prompts, G.sample(model, tok, prompts, temperature=0.0, **kw))],
            "healed_sampled": [dict(r, prompt=p) for p, r in zip(prompts, G.sample(
                model, tok, prompts, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **kw))]}
    res = {"round": ctx.round, "prompts": len(prompts), "sets": q1_scores(model, tok, sets, cfg)}
    atomic_write_json(ctx.artifact("heal_q1"), res)
    return res


# ------------------------------------------------------------------ figures
def figures(res: HealResult):
    """Per-step telemetry: NLL, D under all four aggregates (+ tau), hinge-active fraction, lr."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    s = res.steps
    x = [r["step"] for r in s]
    fig = make_subplots(rows=2, cols=2, subplot_titles=("completion NLL", "D per aggregate (used: solid)",
                                                        "hinge-active fraction", "learning rate"))
    fig.add_scatter(x=x, y=[r["nll"] for r in s], name="NLL", row=1, col=1)
    used = f"D_{res.agg}"
    for how in AGGREGATES:
        k = f"D_{how}"
        fig.add_scatter(x=x, y=[r[k] for r in s], name=k, line=dict(dash="solid" if k == used else "dot"), row=1, col=2)
    if res.tau is not None:
        fig.add_hline(y=res.tau, line_dash="dash", annotation_text=f"tau={res.tau:.3g}", row=1, col=2)
    fig.add_scatter(x=x, y=[r["hinge_frac"] for r in s], name="hinge", row=2, col=1)
    fig.add_scatter(x=x, y=[r["lr"] for r in s], name="lr", row=2, col=2)
    fig.update_layout(height=560, title=f"heal {res.new}: {len(s)} steps, lam_r={res.lam_r:.3g}")
    return [fig]


def kl_heatmap(token_rows: Sequence[dict], tau: float | None = None, max_tokens: int = 96):
    """Plotly heatmap of per-token KL for a few completions (hover shows the token)."""
    import plotly.graph_objects as go

    n = min(max_tokens, max((len(r["kl"]) for r in token_rows), default=0))
    z = [r["kl"][:n] + [None] * (n - len(r["kl"][:n])) for r in token_rows]
    text = [r["tokens"][:n] + [""] * (n - len(r["tokens"][:n])) for r in token_rows]
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="pos %{x}: %{text}<br>KL %{z:.3f}<extra></extra>",
                               colorscale="Magma", colorbar=dict(title="KL")))
    fig.update_layout(height=120 + 40 * len(z), title="per-token KL(healed || base)" + (f"; tau={tau:.3g}" if tau else ""),
                      xaxis_title="completion position", yaxis_title="row")
    return fig


def q1_figure(q1: dict):
    """Bars per answer set: loop rate, narration rate, median tail ppl, KL to base per token."""
    from plotly.subplots import make_subplots

    sets = q1["sets"]
    names = list(sets)
    keys = [("loop_rate", "loop-detector rate"), ("narration_rate", "narration rate"),
            ("tail_ppl_median", "median tail ppl under base"), ("kl_to_base_per_token", "KL(healed || base) per token")]
    fig = make_subplots(rows=1, cols=4, subplot_titles=[t for _, t in keys])
    for j, (k, _) in enumerate(keys, 1):
        fig.add_bar(x=names, y=[sets[n][k] for n in names], showlegend=False, row=1, col=j)
    fig.update_layout(height=360, title=f"Q1, round {q1['round']}: can we heal? ({q1['prompts']} prompts)")
    return fig
