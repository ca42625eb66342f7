"""``steerheal bench``: time each stage of one round against its naive reference.

Stages, on the same inputs in the same run:

- ``vector``: :func:`vector.extract_vector` over N contexts (both personas).
- ``generate_bB``: :func:`generate.sample`, steering live, batch B (eager HF ``generate``);
  ``generate_compiled`` (CUDA): the static-cache compiled path, first call (compile included)
  and a second call at another dose. Naive reference: a plain per-prompt ``generate`` loop at
  batch 1 on a few prompts (tokens/s extrapolate per token).
- ``filter``: :func:`filter.model_scores` (+ the text scores) of the generated completions;
  naive: one row at a time.
- ``heal_step``: :func:`heal.heal_step` (LoRA on, KL barrier on, full-vocabulary float32 KL in
  chunks), median of a few steps after a warm-up, peak memory.
- ``eval_<layout>[_steered|_healed]``: :func:`evaluate.evaluate_model` (vignettes, both frames,
  the axis probe); naive: one row at a time (``batch_size=1``, tinymfv layout) on a few rows,
  extrapolated to all rows.

With random weights (``--random-config``) generations are forced to full length
(``min_new_tokens``), and stages whose inputs must be real text use the generated random
text anyway: only their cost is measured. ``--random-config gemma-3-4b`` also prints an
estimate of one round of the ``gemma-3-4b`` preset from the measured rates.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per stage (reset before it); on a CPU
the process's resident high-water mark after the stage (``ru_maxrss``; it never falls, so a
stage shows its own need only where it raises the mark) and its rise during the stage.

Example:
    python -m steerheal_utils bench --small --out /tmp/bench.json
    python -m steerheal_utils bench --device cpu --out bench_cpu.json
    python -m steerheal_utils bench --random-config gemma-3-4b --device cuda --out bench_gpu.json
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

GEMMA_3_4B = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                  query_pre_attn_scalar=256, max_position_embeddings=8192,
                  layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)])

# Sizes per setting: small (CI, tiny model), cpu (embedded model, full), gpu (gemma-3-4b preset sizes).
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(contexts=8, prompts=8, new_tokens=8, gen_batch=[8], naive_prompts=2, naive_tokens=8, filter_rows=8,
                  score_batch=8, heal_batch=2, heal_len=16, heal_steps=1, eval_rows=7, eval_batch=8, think=0,
                  layouts=["prefix", "tinymfv"], naive_eval_rows=2, eval_conditions=["steered"], probe_items=4),
    "cpu": dict(contexts=64, prompts=64, new_tokens=48, gen_batch=[32, 64], naive_prompts=4, naive_tokens=48,
                filter_rows=64, score_batch=16, heal_batch=4, heal_len=64, heal_steps=3, eval_rows=132, eval_batch=16,
                think=0, layouts=["prefix", "tinymfv"], naive_eval_rows=12, eval_conditions=["steered"], probe_items=0),
    "gpu": dict(contexts=256, prompts=256, new_tokens=256, gen_batch=[256], naive_prompts=4, naive_tokens=64,
                filter_rows=256, score_batch=64, heal_batch=8, heal_len=256, heal_steps=4, eval_rows=132, eval_batch=64,
                think=128, layouts=["tinymfv"], naive_eval_rows=1, eval_conditions=["steered", "healed"], probe_items=0),
}


# ------------------------------------------------------------------ measuring
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


class Timer:
    """Seconds and peak memory of a block (see the module docstring for what peak means per device)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.seconds = 0.0
        self.peak_mib = 0.0
        self.rss_rise_mib = 0.0

    def __enter__(self):
        _sync(self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self._rss0 = _rss_mib()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.dev)
        self.seconds = time.perf_counter() - self._t0
        if self.dev.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.dev) / 2**20
        else:
            self.peak_mib = _rss_mib()
            self.rss_rise_mib = self.peak_mib - self._rss0
        return False


def _row(stage: str, t: Timer, tokens: int | None = None, **extra) -> dict:
    r = {"stage": stage, "seconds": round(t.seconds, 3), "tokens": tokens,
         "tokens_per_s": round(tokens / t.seconds, 1) if tokens and t.seconds > 0 else None,
         "peak_mib": round(t.peak_mib, 1)}
    if t.dev.type != "cuda":
        r["rss_rise_mib"] = round(t.rss_rise_mib, 1)
    r.update(extra)
    return r


# ------------------------------------------------------------------ models
def random_model(which: str, device: torch.device, dtype: torch.dtype):
    """A random-init model of real dimensions around the shipped tokenizer, built on ``device``."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from ..models import shipped_tokenizer, tiny_model

    if which == "tiny":
        model, tok = tiny_model("llama", seed=0)
        return model.to(device, dtype), tok
    if which != "gemma-3-4b":
        raise ValueError(f"--random-config must be gemma-3-4b or tiny, got {which!r}")
    tok = shipped_tokenizer("gemma3")
    cfg = Gemma3TextConfig(**GEMMA_3_4B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of minutes on the host
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.name_or_path = "random:gemma-3-4b"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


# ------------------------------------------------------------------ the stages
class Bench:
    """Runs the stages in order, each in try/except, writing the JSON after every stage."""

    def __init__(self, out: Path | None, meta: dict):
        self.out = out
        self.result: dict[str, Any] = {"meta": meta, "stages": [], "errors": {}, "naive": {}, "ratios": {}}

    def save(self) -> None:
        if self.out is not None:
            from ..runfolder import atomic_write_json

            atomic_write_json(self.out, self.result)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            return fn()
        except Exception as e:  # one failing stage must not lose the others
            self.result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[bench] {name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            return None
        finally:
            self.save()

    def add(self, row: dict) -> None:
        self.result["stages"].append(row)
        print(f"[bench]   {row['stage']}: {row['seconds']:.2f}s"
              + (f", {row['tokens_per_s']} tok/s" if row.get("tokens_per_s") else ""), file=sys.stderr, flush=True)


def run_bench(model, tok, *, sizes: dict, dev: torch.device, random_weights: bool, compile_gen: bool,
              out: Path | None = None, meta: dict | None = None, preset: str | None = None, dose: float = 0.1) -> dict:
    """Time every stage at ``sizes`` (see :data:`SIZES`); returns (and writes) the result dict."""
    from .. import datafiles
    from .. import evaluate as E
    from ..batching import eos_ids
    from .. import filter as F
    from .. import generate as G
    from .. import heal as H
    from .. import vector as V
    from ..config import POS_PERSONA, NEG_PERSONA, depth_band, resolve
    from ..chat import persona_system, prompt_ids, render_prompt
    from ..models import n_layers

    b = Bench(out, {**(meta or {}), "sizes": sizes})
    S = sizes
    layers = depth_band(n_layers(model), 0.45, 0.55)
    ctx = {}

    # 01 vector ----------------------------------------------------------------------------
    def vector():
        texts = [c["text"] for c in V.load_contexts(S["contexts"])]
        n_tok = sum(len(prompt_ids(tok, t, persona_system(p))[0]) for t in texts for p in (POS_PERSONA, NEG_PERSONA))
        with Timer(dev) as t:
            sv, _ = V.extract_vector(model, tok, texts, POS_PERSONA, NEG_PERSONA, layers, batch_size=S["score_batch"])
        ctx["sv"] = sv
        b.add(_row("vector", t, n_tok, contexts=len(texts), layers=layers, note="prompt tokens (both personas)"))

    b.stage("vector", vector)
    if "sv" not in ctx:  # a random vector keeps the later stages measurable
        d = model.get_input_embeddings().weight.shape[1]
        ctx["sv"] = V.SteeringVector({i: torch.randn(d) for i in layers}, {i: 1.0 for i in layers})
    sv = ctx["sv"]

    # 02 generate ----------------------------------------------------------------------------
    pool = datafiles.prompts("dilemmas")
    prompts = [pool[i % len(pool)]["text"] for i in range(S["prompts"])]
    force = S["new_tokens"] if random_weights else 0
    params = dict(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=S["new_tokens"], min_new_tokens=force)

    def gen_tokens(rows):
        return sum(r["n_tokens"] + (not r["truncated"]) for r in rows)

    for bs in S["gen_batch"]:
        def generate(bs=bs):
            with Timer(dev) as t:
                rows = G.sample(model, tok, prompts, sv=sv, dose=dose, batch_size=bs, seed=0, **params)
            ctx.setdefault("rows", rows)
            b.add(_row(f"generate_b{bs}", t, gen_tokens(rows), batch=bs, prompts=len(prompts), steered=True))
        b.stage(f"generate_b{bs}", generate)

    def naive_generate():
        n = min(S["naive_prompts"], len(prompts))
        eos = eos_ids(model, tok)
        kw = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=S["naive_tokens"],
                  eos_token_id=eos, pad_token_id=tok.pad_token_id)
        if random_weights:
            kw["min_new_tokens"] = S["naive_tokens"]
        n_tok = 0
        with Timer(dev) as t, torch.inference_mode():
            torch.manual_seed(0)
            for p in prompts[:n]:  # the precursor's loop: one prompt per generate call
                ids = torch.tensor([prompt_ids(tok, p)[0]], device=dev)
                with V.steer(model, sv, dose):
                    g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
                n_tok += g.shape[1] - ids.shape[1]
        row = _row("generate_naive_b1", t, n_tok, batch=1, prompts=n, steered=True,
                   note=f"batch-1 loop on {n} prompts x {S['naive_tokens']} tokens; tokens/s extrapolate per token")
        b.result["naive"]["generate"] = row
        b.add(row)

    b.stage("generate_naive_b1", naive_generate)

    rows = ctx.get("rows")
    if rows is None:  # generation failed: synthetic completions of the right length
        g = torch.Generator().manual_seed(0)
        rows = [{"prompt_text": render_prompt(tok, p), "prompt": p,
                 "completion_ids": torch.randint(100, min(len(tok), 30000), (S["new_tokens"],), generator=g).tolist()}
                for p in prompts]
        for r in rows:
            r["completion"] = tok.decode(r["completion_ids"], skip_special_tokens=True)
            r["truncated"] = True
    for r, p in zip(rows, prompts):
        r["prompt"] = p

    # 03 filter ----------------------------------------------------------------------------
    frows = (rows * math.ceil(S["filter_rows"] / len(rows)))[:S["filter_rows"]]

    def filter_stage():
        ps, cs = [r["prompt_text"] for r in frows], [r["completion"] for r in frows]
        with Timer(dev) as t:
            F.model_scores(model, tok, ps, cs, batch_size=S["score_batch"])
            for c in cs:
                F.text_scores(c, persona_pos=POS_PERSONA, persona_neg=NEG_PERSONA)
        n_tok = sum(len(tok(p + c, add_special_tokens=False)["input_ids"]) for p, c in zip(ps, cs))
        b.add(_row("filter", t, n_tok, rows=len(frows), batch=S["score_batch"], note="base-model scores + text scores"))
        k = min(len(frows), max(2, S["naive_prompts"]))
        with Timer(dev) as t1:
            F.model_scores(model, tok, ps[:k], cs[:k], batch_size=1)
        row = _row("filter_naive_b1", t1, None, rows=k, per_row_s=round(t1.seconds / k, 4),
                   note=f"model scores one row at a time on {k} rows")
        b.result["naive"]["filter"] = row
        b.add(row)

    b.stage("filter", filter_stage)

    # 05 eval (steered) ------------------------------------------------------------------
    vig = E.load_vignettes(max_rows=S["eval_rows"] if S["eval_rows"] < 132 else 0)
    probe = E.load_probe(S["probe_items"])

    def eval_stage(tag: str, m, vec):
        def run():
            for layout in S["layouts"]:
                with Timer(dev) as t, V.steer(m, vec, dose if vec is not None else 0.0):
                    res = E.evaluate_model(m, tok, vig, probe=probe, layout=layout, think_tokens=S["think"],
                                           batch_size=S["eval_batch"], think_batch_size=max(S["gen_batch"]))
                b.add(_row(f"eval_{layout}_{tag}", t, None, rows=len(vig), frames=2, think=S["think"],
                           batch=S["eval_batch"], probe_items=len(probe), coherence=round(res["summary"]["coherence"], 4)))
        return run

    if "steered" in S["eval_conditions"]:
        b.stage("eval_steered", eval_stage("steered", model, sv))

    def naive_eval():
        k = min(S["naive_eval_rows"], len(vig))
        with Timer(dev) as t, V.steer(model, sv, dose):
            E.vignette_logprobs(model, tok, vig[:k], layout="tinymfv", think_tokens=S["think"], batch_size=1)
        per = t.seconds / k
        row = _row("eval_naive_b1", t, None, rows=k, frames=2, think=S["think"], per_row_s=round(per, 4),
                   extrapolated_s=round(per * len(vig), 2),
                   note=f"one row at a time, tinymfv layout, on {k} rows; extrapolated_s = all {len(vig)} rows, no probe")
        b.result["naive"]["eval"] = row
        b.add(row)

    b.stage("eval_naive_b1", naive_eval)

    # 04 heal ------------------------------------------------------------------------------
    def heal_stage():
        cfg = resolve("gemma-3-4b" if preset == "gemma-3-4b" else "default")
        examples = []
        for r in rows[:S["heal_batch"]]:
            p = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
            c = list(r["completion_ids"]) or [tok.eos_token_id]
            c = (c * math.ceil(S["heal_len"] / len(c)))[:S["heal_len"]]  # heal_len completion tokens per row
            examples.append(H.Example(p + c, len(p), False))
        student, new, earlier = H.make_student(model, cfg, 0, seed=0)
        ctx["student"] = student
        hp = H.HealParams.from_config(cfg, new, earlier)
        hp.tau = 0.0  # barrier always active: its gradient is part of the cost
        params_ = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params_, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        student.train(False)
        batch = H.collate(examples, tok.pad_token_id, dev)
        n_tok = int(batch["loss_mask"].sum())
        times, peak, rise = [], 0.0, 0.0
        for step in range(S["heal_steps"]):
            with Timer(dev) as t:
                H.heal_step(student, batch, opt, None, hp, step)
            times.append(t.seconds)
            peak, rise = max(peak, t.peak_mib), max(rise, t.rss_rise_mib)
        med = statistics.median(times[1:]) if len(times) > 1 else times[0]
        t.seconds, t.peak_mib, t.rss_rise_mib = med, peak, rise
        vocab = model.get_output_embeddings().weight.shape[0]
        full = int(batch["input_ids"].numel()) * vocab * 4 * 2 / 2**20
        b.add(_row("heal_step", t, n_tok, batch=len(examples), completion_len=S["heal_len"],
                   seq=int(batch["input_ids"].shape[1]),
                   lora_r=cfg.lora_r, kl_chunk=cfg.kl_chunk, first_step_s=round(times[0], 3),
                   step_seconds=[round(x, 3) for x in times],
                   full_vocab_all_positions_mib=round(full, 1),
                   note="median step after the first; full_vocab_all_positions_mib = float32 student+reference "
                        "log-softmax over every position, which chunking avoids"))

    b.stage("heal_step", heal_stage)
    if "healed" in S["eval_conditions"] and ctx.get("student") is not None:
        b.stage("eval_healed", eval_stage("healed", ctx["student"], None))

    # Last: the one-time compile is the most expensive stage, and a time limit should cut it, not the others.
    if compile_gen:
        if ctx.get("student") is not None:
            ctx["student"].unload()  # heal injected LoRA layers in place: time the plain model, as the eager rows did
        def generate_compiled():
            bs = max(S["gen_batch"])
            with Timer(dev) as t1:
                G.sample(model, tok, prompts, sv=sv, dose=dose, batch_size=bs, seed=0, compile=True, **params)
            with Timer(dev) as t2:
                rows = G.sample(model, tok, prompts, sv=sv, dose=dose * 2, batch_size=bs, seed=1, compile=True, **params)
            b.add(_row("generate_compiled_first", t1, gen_tokens(rows), batch=bs, note="includes the one-time compile"))
            b.add(_row("generate_compiled", t2, gen_tokens(rows), batch=bs, steered=True,
                       note="second call, another dose: no recompile"))
        b.stage("generate_compiled", generate_compiled)
        slots = getattr(model, "_steerheal_slots", None)
        if slots is not None:  # the later stages run eager: leave no zero hooks behind
            slots.__exit__(None, None, None)
            del model._steerheal_slots

    _ratios(b.result)
    if preset == "gemma-3-4b":
        b.result["round_estimate"] = round_estimate(b.result, resolve("gemma-3-4b"), n_pool=len(pool))
    b.save()
    return b.result


# ------------------------------------------------------------------ summaries
def _by_stage(result: dict) -> dict[str, dict]:
    return {r["stage"]: r for r in result["stages"]}


def _ratios(result: dict) -> None:
    st = _by_stage(result)
    naive = result["naive"]
    ng = naive.get("generate")
    for name, r in st.items():
        if name.startswith("generate_") and r.get("tokens_per_s") and ng and ng.get("tokens_per_s") and name != "generate_naive_b1":
            r["naive_seconds"] = round(r["tokens"] / ng["tokens_per_s"], 2)
            r["speedup"] = round(r["tokens_per_s"] / ng["tokens_per_s"], 2)
            result["ratios"][f"{name}_vs_b1"] = r["speedup"]
        if name == "filter" and naive.get("filter"):
            r["naive_seconds"] = round(naive["filter"]["per_row_s"] * r["rows"], 2)
            r["speedup"] = round(r["naive_seconds"] / r["seconds"], 2) if r["seconds"] else None
            result["ratios"]["filter_vs_b1"] = r["speedup"]
        if name.startswith("eval_") and name != "eval_naive_b1" and naive.get("eval"):
            ne = naive["eval"]
            if ne.get("think") == r.get("think"):
                r["naive_seconds"] = ne["extrapolated_s"]
                r["speedup"] = round(ne["extrapolated_s"] / r["seconds"], 2) if r["seconds"] else None
                result["ratios"][f"{name}_vs_b1"] = r["speedup"]


def _collect_calls(n_keep: int, budget: int, batch: int, probes_kept: int, n_probes: int, rate: float) -> list[int]:
    """Row counts of generate.collect's calls when a constant fraction ``rate`` is kept."""
    out, n, kept = [], n_probes, probes_kept
    while kept < n_keep and n < budget:
        r = max(kept / n, 0.25) if n else 1.0
        want = min(batch, budget - n, max(1, math.ceil((n_keep - kept) / r)))
        out.append(want)
        n += want
        kept += int(round(want * rate))
    return out


def round_estimate(result: dict, cfg, n_pool: int = 48) -> dict:
    """One round of a preset from the measured rates (a round >= 1: steered, the control band, healed evals).

    Generation: :func:`generate.probe_calls` probe calls of ``calib_probes`` rows, then collection calls until
    ``n_keep`` are kept at a keep rate of ``calib_target``; compiled calls are padded to full
    batches, so each costs one measured full call; eager calls cost one full call too (decoding
    is launch-bound: the step time hardly depends on the batch). Filter: every generated row
    scored twice (02's judge and 03). Heal: ``epochs * ceil(n_keep / train_batch_size)`` steps, and
    Q1 (greedy + sampled answers to ``q1_prompts`` prompts, eager, one call each).
    """
    st = _by_stage(result)
    from ..generate.dose import probe_calls

    est: dict[str, Any] = {"assumptions": {"keep_rate": cfg.calib_target, "calib_calls": probe_calls(cfg),
                                           "gen_compile": cfg.gen_compile}}
    parts: dict[str, float] = {}
    v = st.get("vector")
    if v:
        parts["01_vector"] = v["seconds"] * cfg.n_contexts / max(1, v["contexts"])
    eager = st.get(f"generate_b{cfg.gen_batch_size}") or next((r for k, r in st.items() if k.startswith("generate_b")), None)
    comp = st.get("generate_compiled")
    per_call = None
    if cfg.gen_compile and comp:
        per_call, mode = comp["seconds"] * cfg.gen_batch_size / max(1, result["meta"]["sizes"]["prompts"]), "compiled"
    elif eager:
        calls = math.ceil(eager.get("prompts", 1) / max(1, eager.get("batch", 1)))
        per_call, mode = eager["seconds"] / calls, "eager"
    calls = []
    if per_call is not None:
        calls = [cfg.calib_probes] * probe_calls(cfg)
        kept0 = int(round(cfg.calib_probes * cfg.calib_target))
        calls += _collect_calls(cfg.n_keep, cfg.gen_budget, cfg.gen_batch_size, kept0, cfg.calib_probes, cfg.calib_target)
        batched = [math.ceil(c / cfg.gen_batch_size) for c in calls]
        parts["02_generate"] = per_call * sum(batched)
        est["generate"] = {"mode": mode, "calls": calls, "seconds_per_full_call": round(per_call, 2),
                           "rows": sum(calls)}
    f = st.get("filter")
    if f and calls:
        parts["02+03_filter"] = f["seconds"] / f["rows"] * sum(calls) * 2
    h = st.get("heal_step")
    if h:
        steps = cfg.epochs * math.ceil(cfg.n_keep / cfg.train_batch_size)
        parts["04_heal"] = h["seconds"] * steps
        est["heal_steps"] = steps
        if eager and cfg.q1_prompts:
            calls_e = math.ceil(eager.get("prompts", 1) / max(1, eager.get("batch", 1)))
            parts["04_q1"] = 2 * eager["seconds"] / calls_e  # one greedy + one sampled call
    evals = [r for k, r in st.items() if k.startswith("eval_") and k != "eval_naive_b1"]
    if evals:
        per_eval = statistics.mean(r["seconds"] for r in evals)
        n_eval = 2 + (cfg.n_controls if "random" in cfg.controls and cfg.controls_every_round else 0)  # + the band
        parts["05_eval"] = per_eval * n_eval
        est["evals_per_round"] = n_eval
    est["parts_s"] = {k: round(x, 1) for k, x in parts.items()}
    est["total_s"] = round(sum(parts.values()), 1)
    first = st.get("generate_compiled_first")
    if first and comp:
        est["one_time_compile_s"] = round(first["seconds"] - comp["seconds"], 1)
    est["not_included"] = "model loading, held-out answers and KL to base in 05, round-0 base/prompted evals"
    return est


def format_table(result: dict) -> str:
    cols = ("stage", "seconds", "tokens_per_s", "peak_mib", "naive_seconds", "speedup")
    lines = [f"{'stage':28s} {'seconds':>9s} {'tok/s':>9s} {'peak MiB':>9s} {'naive s':>9s} {'speed-up':>8s}"]
    for r in result["stages"]:
        vals = [r.get(c) for c in cols]
        lines.append(f"{vals[0]:28s} " + " ".join(f"{'-' if v is None else v:>9}" for v in vals[1:5]) +
                     f" {'-' if vals[5] is None else vals[5]:>8}")
    for name, err in result["errors"].items():
        lines.append(f"{name:28s} FAILED: {err[:100]}")
    est = result.get("round_estimate")
    if est:
        lines.append(f"one round estimate: {est['total_s']} s  {json.dumps(est['parts_s'])}"
                     + (f"  (+ one-time compile {est['one_time_compile_s']} s)" if "one_time_compile_s" in est else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal bench [--model M | --random-config gemma-3-4b|tiny] [--device] [--small] [--out F]``."""
    from ..embedded import NAME

    p.add_argument("--model", default=NAME, help=f"model to time (default: the embedded {NAME})")
    p.add_argument("--random-config", choices=("gemma-3-4b", "tiny"), default=None,
                   help="a random-init model of these dimensions instead of --model (forces full-length generations)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--small", action="store_true", help="CI-sized run on the tiny random model (well under a minute)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="also time compiled static-cache generation (auto: on CUDA)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    for key, typ, nargs in (("contexts", int, None), ("prompts", int, None), ("new_tokens", int, None),
                            ("gen_batch", int, "+"), ("naive_prompts", int, None), ("naive_tokens", int, None),
                            ("filter_rows", int, None), ("score_batch", int, None), ("heal_batch", int, None),
                            ("heal_len", int, None), ("heal_steps", int, None), ("eval_rows", int, None),
                            ("eval_batch", int, None), ("think", int, None), ("layouts", str, "+"),
                            ("naive_eval_rows", int, None), ("eval_conditions", str, "+"), ("probe_items", int, None)):
        old = ("--eval-stages",) if key == "eval_conditions" else ()  # its name before conditions were called so
        p.add_argument("--" + key.replace("_", "-"), *old, dest=key, type=typ, nargs=nargs, default=None,
                       help=f"override the setting's {key}")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from ..models import load_model, resolve_device, resolve_dtype

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    which = "tiny" if args.small and not args.random_config else args.random_config
    setting = "small" if args.small else ("gpu" if dev.type == "cuda" else "cpu")
    sizes = dict(SIZES[setting])
    for k in sizes:
        v = getattr(args, k, None)
        if v is not None:
            sizes[k] = v
    t0 = time.perf_counter()
    if which:
        model, tok = random_model(which, dev, dtype)
        name = f"random:{which}"
    else:
        model, tok = load_model(args.model, dtype=args.dtype, device=str(dev))
        name = args.model
    load_s = time.perf_counter() - t0
    compile_gen = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    meta = {"model": name, "device": str(dev), "dtype": str(dtype).replace("torch.", ""), "setting": setting,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(), "load_s": round(load_s, 2), "random_weights": bool(which),
            "peak_memory": "torch.cuda.max_memory_allocated per stage" if dev.type == "cuda"
            else "process max RSS after the stage (ru_maxrss) and its rise during the stage",
            "command": " ".join(sys.argv)}
    try:
        meta["loadavg"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    preset = "gemma-3-4b" if which == "gemma-3-4b" else None
    res = run_bench(model, tok, sizes=sizes, dev=dev, random_weights=bool(which), compile_gen=compile_gen,
                    out=Path(args.out) if args.out else None, meta=meta, preset=preset)
    res["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        from ..runfolder import atomic_write_json

        atomic_write_json(Path(args.out), res)
    print(format_table(res))
    return 1 if res["errors"] else 0
