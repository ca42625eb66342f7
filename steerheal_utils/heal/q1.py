"""Q1, "can we heal?": the healed model's own answers next to the steered completions it trained on.

Three answer sets on the same prompts: ``steered`` (02's kept completions), ``healed_greedy`` and
``healed_sampled`` (the healed model, unsteered, no persona). Each set gets the filter's verdicts,
the loop detector's rate, the median tail perplexity under the base and the per-token
KL(healed || base). Writes ``heal_q1``.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torch import nn

from ..adapters import adapter_names
from ..chat import render_prompt
from ..filter.gates import FilterThresholds, decide, loop_reason
from ..filter.model import model_scores
from ..filter.text import text_scores
from ..generate.sampling import sample
from ..models import model_device
from ..runfolder import atomic_write_json
from .data import collate, encode_rows, kept_rows
from .forward import autocast, completion_terms


@torch.no_grad()
def token_kl(model: nn.Module, tok, rows: Sequence[dict], *, ref: str = "base", direction: str = "reverse",
             max_seq_len: int = 512, batch_size: int = 8, chunk: int = 1024) -> list[dict]:
    """Per-token KL(model || ref) over each row's completion: ``[{tokens, kl}]`` for heatmaps."""
    examples, _ = encode_rows(tok, rows, max_seq_len)
    dev = model_device(model)
    names = adapter_names(model)
    out = []
    for i in range(0, len(examples), batch_size):
        ex = examples[i:i + batch_size]
        batch = collate(ex, tok.pad_token_id, dev)
        with autocast(model):
            _, kl = completion_terms(model, batch, ref=ref, new="", earlier=names, direction=direction, chunk=chunk)
        for k, m, tg in zip(kl, batch["loss_mask"], batch["targets"]):
            out.append({"tokens": [tok.decode([t]) for t in tg[m].tolist()], "kl": k[m].tolist()})
    return out


def q1_scores(model: nn.Module, tok, sets: dict[str, list[dict]], cfg) -> dict[str, dict]:
    """Rates per set of answers: median tail perplexity under base, loop-detector rate,
    narration rate, mean per-token KL(model || base), decide() reasons."""
    th = FilterThresholds.from_config(cfg)
    out = {}
    for name, rows in sets.items():
        prompts = [render_prompt(tok, r["prompt"]) for r in rows]
        comps = [r["completion"] for r in rows]
        with model.disable_adapter():  # every set was sampled here: score the sampled ids
            ms = model_scores(model, tok, prompts, comps, tail_frac=cfg.tail_frac, batch_size=cfg.batch_size,
                              completion_ids=[r.get("completion_ids") for r in rows])
        kls = token_kl(model, tok, rows, max_seq_len=cfg.max_seq_len, batch_size=cfg.batch_size, chunk=cfg.kl_chunk)
        reasons, loops, narr, tail = Counter(), 0, 0, []
        for c, m in zip(comps, ms):
            s = {**text_scores(c, persona_pos=cfg.pos_persona, persona_neg=cfg.neg_persona), **m}
            r = decide(s, th)
            reasons[r] += 1
            narr += r == "narration"
            loops += loop_reason(s, th) is not None
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
    """Q1 on the first ``q1_prompts`` distinct prompts of the kept rows; writes ``heal_q1``."""
    cfg = ctx.cfg
    n = cfg.q1_prompts if n_prompts is None else n_prompts
    seen, steered = set(), []
    for r in kept_rows(ctx.artifact("completions")):  # one steered completion per prompt
        if r["prompt"] not in seen and len(steered) < n:
            seen.add(r["prompt"])
            steered.append(r)
    prompts = [r["prompt"] for r in steered]
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=ctx.seed)
    sets = {"steered": steered,  # unsteered below: the healed model on its own, no persona
            "healed_greedy": [dict(r, prompt=p) for p, r in zip(prompts, sample(model, tok, prompts, temperature=0.0, **kw))],
            "healed_sampled": [dict(r, prompt=p) for p, r in zip(prompts, sample(
                model, tok, prompts, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **kw))]}
    res = {"round": ctx.round, "prompts": len(prompts), "sets": q1_scores(model, tok, sets, cfg)}
    atomic_write_json(ctx.artifact("heal_q1"), res)
    return res
