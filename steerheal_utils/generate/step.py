"""02_generate: choose the dose, collect steered completions, write the round's files.

Writes ``generated`` (rows at the chosen dose, :data:`ROW_KEYS`), ``calibration`` (every probe
row with its dose and reason) and ``generate_summary`` (dose, its source, flags and warning line,
the search's points and fit, counts per reason, timings, tokens/s). The filter used for the
stopping rule is the one 03 applies; 03 re-scores every row and its decision is the one heal uses.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import axis, contract
from ..filter.gates import FilterThresholds
from ..filter.rows import filter_rows
from ..runfolder import RunFolderError, atomic_write_json, atomic_write_jsonl, read_json
from ..vector.steering import check_vector_matches
from ..vector.value import SteeringVector
from ..progress import search_note
from .modesummary import BACKOFF_KEYS, mode_summary
from .dose import BASELINE_REPS, Judge, calibrate_dose, collect, dose_checks, dose_warning
from .sampling import permutation, sample, sample_params

# A completions.jsonl row as 02 writes it; 03 adds every filter score, "reason" and "keep".
ROW_KEYS = ("id", "round", "prompt_id", "prompt", "prompt_text", "completion", "completion_ids", "dose",
            "seed", "n_tokens", "truncated", "positions", "halflife")


def filter_judge(ctx, base: nn.Module, tok) -> Judge:
    """The 03 decision as a judge: base-model scores (no steering hooks are live here) + thresholds."""
    th = FilterThresholds.from_config(ctx.cfg)

    def judge(rows: list[dict]) -> list[str]:
        scored = filter_rows(rows, th, model=base, tokenizer=tok, prompts=[r["prompt_text"] for r in rows],
                               persona_pos=ctx.cfg.pos_persona, persona_neg=ctx.cfg.neg_persona,
                               batch_size=ctx.cfg.batch_size)
        return [r["reason"] for r in scored]

    return judge


def _finish_rows(ctx, rows: list[dict], pool: list[dict]) -> list[dict]:
    out = []
    for k, r in enumerate(rows):
        p = pool[r["pool_index"]]
        out.append({"id": f"r{ctx.round:02d}-{k:04d}", "round": ctx.round, "prompt_id": p["id"], "prompt": p["text"],
                    **{key: r[key] for key in (*ROW_KEYS, *BACKOFF_KEYS)  # backoff keys: backtrack mode only
                       if key in r and key not in ("id", "round", "prompt_id", "prompt")}})
    return out


@dataclass
class GenerateResult:
    """What 02 computed: ``generate.json`` (``summary``), the rows it wrote (``generated.jsonl``) and
    the vector it steered with."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    vector: SteeringVector | None = field(default=None, repr=False)


def run_stage(ctx) -> GenerateResult:
    """02_generate: choose the dose, collect, write the round's files.

    The dose comes from the config (``dose`` set), from round 0 (``calib_rounds: first`` in a
    later round: every round then steers with the same push), or from :func:`calibrate_dose` on
    this round's model. Either way it is compared with round 0's and flagged (:data:`DOSE_FLAGS`).

    The student samples (``ctx.student(merge=True)``: earlier adapters merged into the weights only
    where that is exact, float32; on bfloat16 they stay unmerged, so the model that samples is the
    one 04 heals and 05 evaluates). The filter scores with the base model, unsteered (steering hooks
    only live inside each sampling call); in round 0 the student is the base.
    """
    if ctx.cfg.data_source == "prompt":  # the prompt-distillation arm: persona system prompt, no vector
        from .prompted import run_prompted
        return run_prompted(ctx, GenerateResult)
    sv = SteeringVector.load(ctx.artifact("vector"))
    model, tok = ctx.student(merge=True)
    base, _ = ctx.base()
    cfg = ctx.cfg
    check_vector_matches(sv, model)
    pool = axis.load_prompts(cfg.axis_prompts)  # the axis's pool; default: the shipped dilemmas
    order = permutation(len(pool), ctx.seed)
    params = sample_params(cfg)
    judge = filter_judge(ctx, base, tok)
    n_tok = {"calibration": 0, "collection": 0}
    seconds = {"calibration": 0.0, "collection": 0.0}

    def gen(dose: float, start: int, n: int, seed: int, phase: str) -> list[dict]:
        search_note(phase, dose, n_tok, cfg, BASELINE_REPS)  # the driver's status line: which call, which dose
        picks = [order[(start + j) % len(order)] for j in range(n)]
        t = time.time()
        rows = sample(model, tok, [pool[i]["text"] for i in picks], sv=sv, dose=dose, seed=seed, progress=True, **params)
        seconds[phase] += time.time() - t
        n_tok[phase] += sum(r["n_tokens"] + (not r["truncated"]) for r in rows)  # + the EOS step
        return [{**r, "pool_index": i, "prompt": pool[i]["text"]} for r, i in zip(rows, picks)]  # prompt: the off-topic gate

    first = ctx.artifact("generate_summary", 0)
    round0 = read_json(first, "round 0's 02_generate record") if ctx.round > 0 and first.exists() else None
    t0 = time.time()
    cal = None
    if cfg.dose is not None:
        dose, start_rows, source = cfg.dose, [], "config"
    elif cfg.calib_rounds == "first" and ctx.round > 0:
        if round0 is None or round0.get("dose") is None:
            raise RunFolderError(f"calib_rounds=first reuses round 0's dose, but {first} is missing or has no dose: "
                                 "re-run round 0's 02_generate")
        dose, start_rows, source = float(round0["dose"]), [], "round0"
    else:
        # The probes: the first calib_probes prompts of the permutation with this stage's seed, at
        # every dose (common random numbers); dose 0's extra reps sample them with other seeds.
        cal = calibrate_dose(lambda d, n, rep: gen(d, 0, n, ctx.seed + 100_000 * rep, "calibration"), judge,
                             lo=cfg.calib_lo, hi=cfg.calib_hi, grid=cfg.calib_grid, n=cfg.calib_probes,
                             target=cfg.calib_target, relative=cfg.calib_relative, refine=cfg.calib_refine,
                             seed=ctx.seed)
        dose, start_rows, source = cal.dose, cal.rows, "calibrated"
    t_cal = time.time() - t0
    # Collection continues through the permutation after the probes, with fresh seeds.
    rows = collect(lambda off, n: gen(dose, off, n, ctx.seed + 1000 + off, "collection"), judge,
                   n_keep=cfg.n_keep, budget=max(cfg.gen_budget, len(start_rows)), batch_size=cfg.gen_batch_size,
                   rows=start_rows)
    t_all = time.time() - t0
    done = _finish_rows(ctx, rows, pool)
    atomic_write_jsonl(ctx.artifact("generated"), done)
    atomic_write_jsonl(ctx.artifact("calibration"), [
        {"step": s, "prompt_id": pool[r["pool_index"]]["id"], "dose": r["dose"], "reason": r["reason"],
         "n_tokens": r["n_tokens"], "truncated": r["truncated"], "completion": r["completion"]}
        for s, p_rows in enumerate(cal.probes) for r in p_rows] if cal else [])
    reasons = Counter(r["reason"] for r in rows)
    gen_s = seconds["calibration"] + seconds["collection"]
    summary = {
        "round": ctx.round, "dose": dose, "dose_source": source,
        "dose_unit": "fraction of the layer's median residual norm r_L (vector added: dose * r_L * v_L / |v_L|)",
        **dose_checks(cal, dose, source, round0, reasons.get("keep", 0), len(rows)),
        "calibration": cal.record() if cal else None, "calibration_path": cal.path if cal else [],
        "calib_target": cfg.calib_target, "calib_relative": cfg.calib_relative, "calib_rounds": cfg.calib_rounds,
        "n_generated": len(rows), "n_kept_02": reasons.get("keep", 0),
        "reasons_02": dict(reasons), "n_truncated": sum(r["truncated"] for r in rows),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / max(1, len(rows)),
        "prompts_used": len({r["pool_index"] for r in rows}), "pool_size": len(pool),
        "layers": sv.layers, "positions": cfg.steer_positions, "halflife": cfg.dose_halflife,
        "seconds": {"calibration": round(t_cal, 2), "total": round(t_all, 2),
                    "sampling": round(gen_s, 2), "scoring": round(t_all - gen_s, 2)},
        "tokens": dict(n_tok), "tokens_per_s": round(sum(n_tok.values()) / max(gen_s, 1e-9), 1),
    }
    summary.update(mode_summary(cfg, rows))  # nothing in the constant mode
    summary["dose_warning"] = dose_warning(summary)
    atomic_write_json(ctx.artifact("generate_summary"), summary)
    return GenerateResult(summary, done, sv)


def warn_dose(run_dir: Path | str, rnd: int, file=None) -> str | None:
    """Print round ``rnd``'s dose warning (02's generate.json), if any, to stderr; return it. For the driver."""
    p = contract.path(run_dir, rnd, "generate_summary")
    if not p.exists():
        return None
    line = dose_warning(read_json(p, "02_generate record"))
    if line:
        print(line, file=file or sys.stderr, flush=True)
    return line
