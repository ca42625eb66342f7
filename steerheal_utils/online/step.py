"""06_online: the loop run online. Per training step: sample, filter, heal.

Round ``r`` of ``loop=online`` is a checkpoint: steps ``r*M .. min((r+1)*M, online_steps) - 1``
(``M = online_every``) of one continuous stream. Each step

1. re-reads the steering vector from the current student (adapters on, the one in training
   included) when the step is a multiple of ``online_refresh`` (01's vector otherwise);
2. samples ``online_batch`` steered completions from the current student at the fixed ``dose``
   (prompts continue through one seeded permutation of the dilemma pool across checkpoints);
3. filters them with 03's filter (base-model scores, the same thresholds);
4. takes one heal step (:func:`heal.heal_step`: NLL + lam_r * mean_b relu(D_b - tau), the same KL
   aggregate and reference) on the kept rows; a batch with nothing kept takes no optimiser step
   (the LR schedule still advances: it is indexed by training step).

The checkpoint freezes the adapter as round ``r``'s (``adapter/``), exactly where the round loop
puts its own, so 05, the report, the controls, the study and export read it unchanged; round
``r+1`` trains a fresh adapter on top with a fresh optimiser (as the round loop does). The
checkpoint also writes ``completions`` (every sampled row with its filter verdict and ``step``),
``generate_summary`` (the dose 05 steers with, tokens, timings), ``heal_summary``, ``heal_steps``
(04's columns) and ``online_steps`` (the per-step telemetry).

Resume: after every step the state (adapter, optimiser, scheduler, step, RNGs, vector, rows and
telemetry so far) is written atomically to ``online_state``; a killed run resumes at the next
step and, every step being seeded by its index, ends with the same adapter and metrics.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import axis, markers
from ..adapters import adapter_name, set_active
from ..config import ConfigError
from ..filter.gates import FilterThresholds
from ..filter.rows import filter_rows
from ..generate.sampling import permutation, sample, sample_params
from ..heal.data import collate, encode_rows
from ..heal.step import HEAL_KEYS, save_adapter, steps_csv
from ..heal.student import make_student
from ..heal.train import HealParams, heal_step, make_optimizer
from ..kl import AGGREGATES
from ..models import model_device, n_layers
from ..runfolder import atomic_write_json, atomic_write_jsonl, atomic_write_text
from ..stage import stage_seed
from ..vector.extract import extract_vector, load_contexts
from ..vector.steering import check_vector_matches
from ..vector.value import SteeringVector
from .state import read_state, restore, save_state

STEP_COLS = ("step", "round", "sampled", "kept", "keep_rate", "gen_tokens", "refreshed", "trained", "loss", "nll", "D",
             *[f"D_{h}" for h in AGGREGATES], "barrier", "hinge_frac", "tau", "lr", "grad_norm", "tokens", "seconds")
"""The columns of ``online_steps.csv``: ``D`` is the barrier's aggregate (``kl_agg``), ``D_mean`` the mean per-token KL."""


def checkpoints(cfg) -> int:
    """How many rounds (checkpoints) ``loop=online`` makes: ``ceil(online_steps / online_every)``."""
    return math.ceil(cfg.online_steps / cfg.online_every)


def segment(cfg, rnd: int) -> range:
    """The global training steps of checkpoint ``rnd``.

    Example:
        >>> from steerheal_utils.config import resolve
        >>> segment(resolve("tiny", {"online_steps": 5, "online_every": 2, "loop": "online", "dose": 0.1}), 2)
        range(4, 5)
    """
    start = rnd * cfg.online_every
    return range(start, min(start + cfg.online_every, cfg.online_steps))


def refresh_due(step: int, start: int, every: int) -> bool:
    """Whether step ``step`` re-reads the vector: a multiple of ``every`` (0 = never), not the
    checkpoint's first step (01 read it from the same student just before)."""
    return every > 0 and step != start and step % every == 0


def steps_table(steps: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(STEP_COLS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for s in steps:
        w.writerow(s)
    return buf.getvalue()


def read_steps(path) -> list[dict]:
    """Rows of an ``online_steps.csv`` (numbers as floats, empty cells as None)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({k: (None if v == "" else v == "True" if v in ("True", "False") else float(v)) for k, v in r.items()})
    return out


@dataclass
class OnlineResult:
    """What a checkpoint of 06 did: per-step telemetry, the summary, every sampled row, and the
    telemetry of the earlier checkpoints (``history``) for the run-wide figures."""

    steps: list[dict]
    summary: dict[str, Any]
    rows: list[dict] = field(default_factory=list, repr=False)
    history: list[dict] = field(default_factory=list, repr=False)
    resumed_at: int | None = None
    model: Any = field(default=None, repr=False)
    tok: Any = field(default=None, repr=False)


def _fingerprint(ctx) -> str:
    """The config keys and input hashes this checkpoint's state belongs to."""
    doc = {"config": markers.config_record(ctx.stage, ctx.cfg),
           "inputs": markers.input_snapshot(ctx.run_dir, ctx.round, ctx.stage, ctx.cfg), "round": ctx.round}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def run_stage(ctx, on_step: Callable[[int], None] | None = None) -> OnlineResult:
    """06_online: run checkpoint ``ctx.round``'s training steps (resuming from ``online_state``
    when it belongs to this config and these inputs) and write the checkpoint.

    Args:
        ctx: the stage context (``open_stage("06_online", ...)``).
        on_step: called with the global step index after each step's state is saved (tests inject
            a crash here).
    """
    cfg = ctx.cfg
    if cfg.loop != "online" or cfg.dose is None:
        raise ConfigError("06_online runs with loop=online and a fixed dose (--set loop=online dose=X)")
    seg = segment(cfg, ctx.round)
    if not seg:
        raise ConfigError(f"round {ctx.round}: online_steps={cfg.online_steps} ends before checkpoint {ctx.round} "
                          f"(online_every={cfg.online_every}: {checkpoints(cfg)} checkpoints)")
    t0 = time.time()
    model, tok = ctx.student()  # unmerged: the base stays recoverable for the KL reference
    base, _ = ctx.base()        # the filter's scores (03 scores with the base, unsteered)
    sv = SteeringVector.load(ctx.artifact("vector"))
    check_vector_matches(sv, model)
    model, new, earlier = make_student(model, cfg, ctx.round, seed=ctx.seed)
    hp = HealParams.from_config(cfg, new, earlier)
    opt, sched, _ = make_optimizer(model, cfg, len(seg))
    dev = model_device(model)
    th = FilterThresholds.from_config(cfg)
    params = sample_params(cfg)
    pool = axis.load_prompts(cfg.axis_prompts)  # the axis's pool; default: the shipped dilemmas
    order = permutation(len(pool), stage_seed(cfg.seed, 0, "06_online"))  # one stream across checkpoints
    contexts = [c["text"] for c in load_contexts(cfg.n_contexts, seed=cfg.seed)]
    layers = cfg.steered_layers(n_layers(model))

    state_path = ctx.artifact("online_state")
    fp = _fingerprint(ctx)
    steps: list[dict] = []
    rows: list[dict] = []
    first, resumed = seg.start, None
    saved = read_state(state_path)
    if saved is not None and saved[1].get("fingerprint") == fp and seg.start <= saved[1]["next_step"] <= seg.stop:
        sv = restore(*saved, model=model, adapter=new, optimizer=opt, scheduler=sched)
        first = resumed = saved[1]["next_step"]
        steps, rows = saved[1]["steps"], saved[1]["rows"]
        print(f"06_online round {ctx.round:02d}: resuming at step {first} from {state_path.name}", flush=True)

    for s in range(first, seg.stop):
        t = time.time()
        refreshed = refresh_due(s, seg.start, cfg.online_refresh)
        model.eval()
        if refreshed:
            sv, _ = extract_vector(model, tok, contexts, cfg.pos_persona, cfg.neg_persona, layers,
                                   batch_size=cfg.batch_size, meta={"model": cfg.model, "round": ctx.round, "step": s,
                                                                    "layers": layers})
        picks = [order[(s * cfg.online_batch + j) % len(order)] for j in range(cfg.online_batch)]
        sampled = sample(model, tok, [pool[i]["text"] for i in picks], sv=sv, dose=cfg.dose,
                         seed=stage_seed(cfg.seed, s, "06_online/sample"), **params)
        batch_rows = [{"id": f"r{ctx.round:02d}-s{s:05d}-{j:03d}", "round": ctx.round, "step": s,
                       "prompt_id": pool[i]["id"], "prompt": pool[i]["text"], **r}
                      for j, (r, i) in enumerate(zip(sampled, picks))]
        scored = filter_rows(batch_rows, th, model=base, tokenizer=tok, prompts=[r["prompt_text"] for r in batch_rows],
                             persona_pos=cfg.pos_persona, persona_neg=cfg.neg_persona, batch_size=cfg.batch_size)
        kept = [r for r in scored if r["keep"]]
        examples, _ = encode_rows(tok, kept, cfg.max_seq_len)
        model.train(cfg.lora_dropout > 0)
        rec: dict[str, Any] = {"step": s, "round": ctx.round, "sampled": len(scored), "kept": len(kept),
                               "keep_rate": len(kept) / len(scored), "refreshed": refreshed, "trained": bool(examples),
                               "gen_tokens": sum(r["n_tokens"] + (not r["truncated"]) for r in scored), "tau": hp.tau}
        if examples:
            rec.update(heal_step(model, collate(examples, tok.pad_token_id, dev), opt, sched, hp, s))
        else:  # nothing kept: no optimiser step; the schedule is indexed by training step, so it moves on
            rec["lr"] = opt.param_groups[0]["lr"]
            sched.step()
        rec["seconds"] = time.time() - t
        steps.append(rec)
        rows += scored
        save_state(state_path, model=model, adapter=new, optimizer=opt, scheduler=sched, next_step=s + 1, sv=sv,
                   fingerprint=fp, extra={"steps": steps, "rows": rows})
        print(f"step {s}: kept {len(kept)}/{len(scored)}" + (f", nll {rec['nll']:.3f}, D {rec['D']:.3g}" if examples else
                                                              ", no heal step"), flush=True)
        if on_step is not None:
            on_step(s)

    model.eval()
    set_active(model, earlier + [new], None)
    trained = [r for r in steps if r["trained"]]
    save_adapter(model, new, ctx.artifact("adapter"))
    atomic_write_jsonl(ctx.artifact("completions"), rows)
    atomic_write_text(ctx.artifact("heal_steps"), steps_csv([{**r, "epoch": 0} for r in trained]))
    atomic_write_text(ctx.artifact("online_steps"), steps_table(steps))
    reasons = Counter(r["reason"] for r in rows)
    gen_tokens = sum(r["gen_tokens"] for r in steps)
    secs = round(time.time() - t0, 2)
    gen = {"round": ctx.round, "loop": "online", "dose": cfg.dose, "dose_source": "config",
           "dose_unit": "fraction of the layer's median residual norm r_L", "dose_warning": None,
           "n_generated": len(rows), "n_kept_02": reasons.get("keep", 0), "reasons_02": dict(reasons),
           "n_truncated": sum(r["truncated"] for r in rows),
           "mean_tokens": sum(r["n_tokens"] for r in rows) / max(1, len(rows)),
           "steps": [seg.start, seg.stop], "tokens": {"calibration": 0, "collection": gen_tokens},
           "seconds": {"total": secs, "steps": round(sum(r["seconds"] for r in steps), 2)},
           "resumed_at": resumed}
    atomic_write_json(ctx.artifact("generate_summary"), gen)
    atomic_write_json(ctx.artifact("heal_summary"), {
        "round": ctx.round, "loop": "online", "adapter": new, "baked": [adapter_name(i) for i in range(ctx.round)],
        "tau_used": hp.tau, "tau_mode": cfg.tau_mode, "tau_info": {}, "lam_r": hp.lam_r,
        "config": {k: getattr(cfg, k) for k in HEAL_KEYS},
        "summary": {"rows": sum(r["kept"] for r in steps), "skipped": 0, "steps": len(trained),
                    "training_steps": len(steps), "seconds": secs,
                    "nll_first": trained[0]["nll"] if trained else None, "nll_last": trained[-1]["nll"] if trained else None,
                    "D_last": {h: trained[-1].get(f"D_{h}") for h in AGGREGATES} if trained else {},
                    "hinge_frac_mean": sum(r["hinge_frac"] for r in trained) / max(1, len(trained)),
                    "keep_rate": sum(r["kept"] for r in steps) / max(1, sum(r["sampled"] for r in steps))},
    })
    state_path.unlink(missing_ok=True)  # the checkpoint is written: the resume state has served
    history = []
    for r in range(ctx.round):
        p = ctx.artifact("online_steps", r)
        if p.exists():
            history += read_steps(p)
    res = OnlineResult(steps, gen, rows, history, resumed)
    res.model, res.tok = model, tok
    return res
