"""Heal's training: the loss, one optimiser step, the loop over the kept rows, tau calibration.

Round ``r`` trains a new adapter ``r{r:02d}`` on top of the model at round ``r`` (the base plus
the frozen, unmerged adapters of rounds ``0..r-1``)::

    loss = NLL(completion tokens) + lam_r * mean_b relu(D_b - tau),   lam_r = lam * (1 + r)^lam_round_pow

- NLL: mean over completion tokens of the batch; prompt and padding are masked.
- D_b: per-position KL between student and reference over the full vocabulary, in float32
  (:mod:`.forward`; reverse KL(student || ref) by default, ``kl_dir``), aggregated per sequence
  over its completion positions by ``kl_agg`` (:data:`steerheal_utils.kl.AGGREGATES`). The hinge
  acts per sequence and is then averaged over the batch, so neither D nor the barrier depends on
  the batch size, and one looping sequence is penalised even when the batch mean is below tau.
- Reference ``base``: every adapter off (``model.disable_adapter()``); ``prev``: earlier rounds
  on, the new adapter off. Computed under ``torch.no_grad``.
- ``reg = nll`` drops the barrier and ``reg = wd`` uses AdamW weight decay instead; D is
  still measured every step (no gradient) so the baselines are comparable.
- tau: ``absolute`` uses ``cfg.tau``. ``quantile`` sets tau to the ``tau_quantile`` quantile of
  the per-sequence D over all training rows, measured once after the LR warm-up, with the
  barrier off until then. (At step 0 the student equals the reference whenever ref=prev or
  r=0, because B=0, so D would be identically 0 there.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from ..progress import tqdm  # a plain final line, not a frozen widget, in the journal

from ..adapters import set_active
from ..kl import AGGREGATES, aggregate_kl
from ..models import model_device
from .data import Example, collate, encode_rows
from .forward import autocast, completion_terms
from .student import make_student


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


def make_optimizer(model: nn.Module, cfg, total: int):
    """``(AdamW, LambdaLR, warmup)``: AdamW over the trainable parameters (the new adapter) with the
    config's lr, betas and decay (``wd_strength`` when reg=wd), warm-up then cosine over ``total`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    wd = cfg.wd_strength if cfg.reg == "wd" else cfg.weight_decay
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=wd)
    warmup = int(round(cfg.warmup_frac * total))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup)), warmup


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
    with autocast(model):
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
        with autocast(model):
            _, kl = completion_terms(model, batch, ref=hp.kl_ref, new=hp.new, earlier=hp.earlier,
                                     direction=hp.kl_dir, chunk=hp.chunk)
        for how in AGGREGATES:
            out[how] += aggregate_kl(kl, batch["loss_mask"], how).tolist()
    return out


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
    model: Any = field(default=None, repr=False)  # the trained student (set by heal.step.run_stage)
    tok: Any = field(default=None, repr=False)


def train(model: nn.Module, tok, rows: Sequence[dict], cfg, rnd: int, *, seed: int = 0,
          progress: bool = True) -> tuple[nn.Module, HealResult]:
    """Train round ``rnd``'s adapter on kept rows. Returns ``(student, result)``; saves nothing.

    ``model`` is the model at round ``rnd`` (from :func:`models.load_round_model`, unmerged).
    """
    t0 = time.time()
    examples, skipped = encode_rows(tok, rows, cfg.max_seq_len)
    if not examples:
        raise ValueError(f"round {rnd}: no trainable rows ({len(rows)} kept rows, {skipped} skipped for max_seq_len "
                         f"{cfg.max_seq_len}): check completions.jsonl and max_seq_len")
    model, new, earlier = make_student(model, cfg, rnd, seed=seed)
    hp = HealParams.from_config(cfg, new, earlier)
    model.train(cfg.lora_dropout > 0)  # only LoRA dropout differs between modes
    bs = cfg.train_batch_size
    per_epoch = math.ceil(len(examples) / bs)
    total = per_epoch * cfg.epochs
    opt, sched, warmup = make_optimizer(model, cfg, total)
    calib_at = max(1, warmup) if cfg.tau_mode == "quantile" and cfg.reg == "kl" else None
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
