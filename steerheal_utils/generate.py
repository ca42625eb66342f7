"""Stage 02: sample steered completions of care-vs-authority dilemmas.

Steering adds ``dose * r_L * v_L / ||v_L||`` to the output of every steered block (see
:mod:`.vector`): **the dose is a fraction of the layer's median residual norm**, so dose 0.1
pushes each hidden state by a tenth of a typical hidden state's length along the persona
axis, whatever the model.

The dose is not fixed but calibrated each round (the precursor found coherence falls off a
cliff between two nearby coefficients): bisection in log-dose between ``calib_lo`` and
``calib_hi`` for the *largest* dose at which the filter still keeps ``calib_target`` of a
probe set. Probes are a seeded draw across the whole pool, the same prompts and sampling seed
at every dose tried (common random numbers: the doses differ by the dose, not by luck).
Then completions are collected at that dose until ``n_keep`` are kept or ``gen_budget`` have
been generated. The filter used here for the stopping rule is the one 03 applies; 03 re-scores
every row with the config's thresholds and its decision is the one heal uses.

Public API:
    load_prompts(kind)                       -> rows of the shipped pool or held-out set
    sample(model, tok, prompts, ...)         -> one dict per prompt (completion, n_tokens, truncated...)
    calibrate_dose(generate_fn, judge_fn, ...) -> Calibration (dose, path, rows at that dose)
    collect(generate_fn, judge_fn, ...)      -> rows until n_keep kept or the budget is spent
    run_stage(ctx, model, tok, base)         -> writes completions.jsonl, calibration.jsonl, generate.json
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .models import length_sorted_batches, left_pad, model_device, prompt_ids, render_prompt
from .vector import SteeringVector, steer, steering_slots

# A completions.jsonl row as 02 writes it; 03 adds every filter score, "reason" and "keep".
ROW_KEYS = ("id", "round", "prompt_id", "prompt", "prompt_text", "completion", "completion_ids", "dose",
            "seed", "n_tokens", "truncated", "positions", "halflife")


class CalibrationError(RuntimeError):
    """Even the smallest dose tried kept nothing: the message gives the counts per drop reason."""


# ------------------------------------------------------------------ prompts
def load_prompts(kind: str = "dilemmas") -> list[dict]:
    """The shipped training pool (``"dilemmas"``) or held-out set (``"heldout"``): rows of id, text, domain."""
    if kind not in ("dilemmas", "heldout"):
        raise ValueError(f"prompt set must be 'dilemmas' (training pool) or 'heldout', got {kind!r}")
    path = Path(str(resources.files("steerheal_utils").joinpath("data", f"{kind}.jsonl")))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)``: probes and collection order span the whole pool."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def sample_params(cfg) -> dict[str, Any]:
    """The keyword arguments of :func:`sample` that come from the config."""
    return dict(positions=cfg.steer_positions, halflife=cfg.dose_halflife, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                compile=cfg.gen_compile)


# ------------------------------------------------------------------ sampling
def _eos_ids(model: nn.Module, tok) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (Gemma has two)."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for e in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    if not ids:
        raise ValueError("the tokenizer and the generation config define no EOS token: completions would never end")
    return sorted(ids)


def sample(model: nn.Module, tok, prompts: Sequence[str] | Sequence[Sequence[int]], *,
           sv: SteeringVector | None = None, dose: float = 0.0, positions: str = "all", halflife: int = 0,
           temperature: float = 1.0, top_p: float = 0.95, top_k: int = 64, max_new_tokens: int = 96,
           batch_size: int = 32, seed: int = 0, min_new_tokens: int = 0, compile: bool = False,
           progress: bool = False) -> list[dict]:
    """Sample one completion per prompt, batched, with the vector added at ``dose``.

    Args:
        model, tok: the model to sample from and its tokenizer (left padding).
        prompts: user messages (rendered with the chat template, no system prompt) or
            already-rendered prompt token ids.
        sv, dose, positions, halflife: steering, as in :func:`steerheal_utils.vector.steer`.
        temperature: 0 means greedy. top_k 0 means off.
        batch_size: prompts per ``generate`` call; prompts are length-sorted into batches.
        seed: batch ``b`` (in sorted order) samples with seed ``seed + b``, recorded per row, so
            the same prompts, seed and batch size give the same completions.
        min_new_tokens: forces length; for benchmarks only (it suppresses EOS).
        compile: on CUDA, a static KV cache and a compiled decode step (:func:`compiled_generation`);
            ignored elsewhere and for steering settings other than a constant dose at every position.

    Returns:
        One dict per prompt, in input order: ``prompt_index``, ``prompt_text`` (the rendered
        prompt), ``completion`` (special tokens stripped), ``completion_ids`` (up to and excluding
        the EOS), ``n_tokens``, ``truncated`` (no EOS within ``max_new_tokens``), ``seed``,
        ``dose``, ``positions``, ``halflife``.

    Example:
        >>> rows = sample(model, tok, ["Your boss says ... Do you?"], sv=sv, dose=0.05)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if not prompts:
        return []
    if not math.isfinite(dose):
        raise ValueError(f"dose must be finite, got {dose}")
    seqs = [list(p) if not isinstance(p, str) else prompt_ids(tok, p)[0] for p in prompts]
    texts = [render_prompt(tok, p) if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in prompts]
    eos = _eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev = model_device(model)
    gen_kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)
    if temperature > 0:
        gen_kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        gen_kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if min_new_tokens:
        gen_kw["min_new_tokens"] = min_new_tokens
    static = compiled_generation(model, enable=compile and (sv is None or dose == 0 or (positions == "all" and halflife == 0)))
    if static:
        gen_kw.update(static)
    out: list[dict | None] = [None] * len(seqs)
    batches = length_sorted_batches([len(s) for s in seqs], batch_size)
    fork_devices = [dev] if dev.type == "cuda" else []
    eos_t = torch.tensor(eos, device=dev)
    for b, idx in enumerate(tqdm(batches, desc=f"sampling (dose {dose:.3g})", disable=not progress, leave=False)):
        rows = [seqs[i] for i in idx]
        if static:  # one shape for every call: full batches, prompt width rounded up (no recompiles)
            rows += [rows[-1]] * (batch_size - len(rows))
        ids, mask, _ = left_pad(rows, pad_id, dev)
        if static and ids.shape[1] % PROMPT_BUCKET:
            extra = PROMPT_BUCKET - ids.shape[1] % PROMPT_BUCKET
            ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1)
            mask = torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], 1)
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed + b)
            # One steer() per batch: its position counter starts at this batch's padded prompt.
            with steer(model, sv, dose, positions=positions, halflife=halflife, prompt_len=ids.shape[1]):
                gen = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        new = gen[:, ids.shape[1]:]
        is_eos = torch.isin(new, eos_t)
        has_eos = is_eos.any(-1)
        first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, new.shape[1], dtype=torch.long))
        for r, i in enumerate(idx):
            n = int(first[r])
            cids = new[r, :n].tolist()
            out[i] = {"prompt_index": i, "prompt_text": texts[i],
                      "completion": tok.decode(cids, skip_special_tokens=True).strip(), "completion_ids": cids,
                      "n_tokens": n, "truncated": not bool(has_eos[r]), "seed": seed + b, "dose": float(dose),
                      "positions": positions, "halflife": halflife}
    return out  # type: ignore[return-value]


PROMPT_BUCKET = 64  # compiled generation pads prompts to a multiple of this many tokens
COMPILE_DEVICES = ("cuda",)  # where compiled generation pays (tests add "cpu" with dynamo's eager backend)
COMPILE_CONFIG = None  # transformers' CompileConfig for generate; None = its default (inductor, CUDA graphs)


def compiled_generation(model: nn.Module, enable: bool = True) -> dict[str, Any]:
    """``generate`` keywords for a static KV cache with a compiled decode step, or ``{}``.

    Only on CUDA (transformers compiles the forward there; on a CPU it would cost more than it
    saves). The first call compiles (about 2 minutes at gemma-3-4b size), later calls of the
    same shape reuse the graph, so :func:`sample` pads every batch to ``batch_size`` rows and
    every prompt to a multiple of :data:`PROMPT_BUCKET` tokens (transformers keeps the largest
    cache length seen). Steering must then go through persistent slots (see
    :func:`steerheal_utils.vector.steering_slots`): they are attached to every decoder block
    here, once, and stay for the model's life, so the compiled graph always contains them
    (a hook added after compiling would be silently ignored) and never recompiles across doses.
    """
    if not enable or model_device(model).type not in COMPILE_DEVICES:
        return {}
    if not getattr(model, "_steerheal_slots", None):
        cm = steering_slots(model)
        cm.__enter__()  # deliberately never exited: the slots live as long as the compiled graph
        model._steerheal_slots = cm
    return {"cache_implementation": "static", **({"compile_config": COMPILE_CONFIG} if COMPILE_CONFIG else {})}


# ------------------------------------------------------------------ dose search
Judge = Callable[[list[dict]], Sequence[Any]]


def _reasons(verdicts: Sequence[Any]) -> list[str]:
    """Judge output as reasons: a reason string per row ("keep" or why dropped), or bools."""
    return [v if isinstance(v, str) else ("keep" if v else "drop") for v in verdicts]


@dataclass
class Calibration:
    """Result of :func:`calibrate_dose`.

    Attributes:
        dose: the chosen dose.
        path: every dose tried, in order: ``{"step", "dose", "n", "kept", "frac", "passed", "reasons"}``.
        rows: the probe rows generated at the chosen dose (reusable as collected rows), each
            with its ``reason``; empty when the chosen dose was never sampled.
        below_target: the chosen dose is ``lo`` and even it keeps less than the target.
        probes: the probe rows of every step, in ``path`` order (for inspection).
    """

    dose: float
    path: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    below_target: bool = False
    probes: list[list[dict]] = field(default_factory=list)


def calibrate_dose(generate_fn: Callable[[float, int], list[dict]], judge_fn: Judge, *, lo: float, hi: float,
                   steps: int, target: float = 0.75, n: int = 16) -> Calibration:
    """The largest dose in ``[lo, hi]`` whose keep fraction is at least ``target``.

    Bisection in log-dose, assuming the keep fraction falls as the dose rises: try the
    geometric midpoint, move ``lo`` up when it passes and ``hi`` down when it fails. After
    ``steps`` tries the largest passing dose wins (resolution: a factor ``(hi/lo)^(2^-steps)``).
    If no try passed, ``lo`` itself is tried: kept at least once -> ``lo`` (``below_target``),
    kept nothing -> :class:`CalibrationError` with the counts per drop reason.
    At most ``steps + 1`` calls to ``generate_fn``, so the search always terminates.

    Args:
        generate_fn: ``(dose, n) -> rows``; should sample the same probe prompts with the same
            seed for every dose.
        judge_fn: ``rows -> verdicts``, a reason per row (``"keep"`` or why dropped) or a bool.
        lo, hi: dose bounds, ``0 < lo < hi``.
        steps: midpoints tried (0 = use ``lo`` after checking it keeps something).
        target: keep fraction required.
        n: probes per dose.

    Example:
        >>> cal = calibrate_dose(lambda d, n: [{"d": d}] * n, lambda rows: [r["d"] < 0.2 for r in rows],
        ...                      lo=0.01, hi=1.0, steps=4)
        >>> round(cal.dose, 3), len(cal.path)
        (0.178, 4)
    """
    if not 0 < lo < hi or not all(map(math.isfinite, (lo, hi))):
        raise ValueError(f"dose bounds must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
    if steps < 0 or n < 1:
        raise ValueError(f"steps must be >= 0 and n >= 1, got steps={steps}, n={n}")
    path: list[dict] = []
    probes: list[list[dict]] = []

    def trial(dose: float) -> bool:
        rows = generate_fn(dose, n)
        reasons = _reasons(judge_fn(rows))
        if len(reasons) != len(rows):
            raise ValueError(f"judge_fn returned {len(reasons)} verdicts for {len(rows)} rows")
        kept = sum(r == "keep" for r in reasons)
        frac = kept / max(1, len(rows))
        path.append({"step": len(path), "dose": dose, "n": len(rows), "kept": kept, "frac": frac,
                     "passed": frac >= target, "reasons": dict(Counter(reasons))})
        probes.append([{**r, "reason": why} for r, why in zip(rows, reasons)])
        return frac >= target

    a, b = math.log(lo), math.log(hi)
    best: int | None = None  # index into path of the largest passing dose
    for _ in range(steps):
        mid = math.exp((a + b) / 2)
        if trial(mid):
            best, a = len(path) - 1, math.log(mid)
        else:
            b = math.log(mid)
    if best is not None:
        return Calibration(path[best]["dose"], path, probes[best], probes=probes)
    passed = trial(lo)
    if path[-1]["kept"] == 0:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(path[-1]["reasons"].items(), key=lambda kv: -kv[1]))
        raise CalibrationError(
            f"dose search: even the smallest dose {lo:g} kept 0 of {path[-1]['n']} probe completions "
            f"(drop reasons: {counts}). Lower calib_lo, loosen the 03 filter thresholds, or check the model "
            f"and prompts; path: " + "; ".join(f"{p['dose']:.3g} -> {p['kept']}/{p['n']}" for p in path))
    return Calibration(lo, path, probes[-1], below_target=not passed, probes=probes)


def collect(generate_fn: Callable[[int, int], list[dict]], judge_fn: Judge, *, n_keep: int, budget: int,
            batch_size: int, rows: Sequence[dict] = ()) -> list[dict]:
    """Generate until ``n_keep`` rows are kept or ``budget`` rows exist (``rows`` count toward both).

    ``generate_fn(offset, n)`` returns ``n`` new rows, ``offset`` being how many were generated
    before (so prompts continue through the pool). Each call asks for at most ``batch_size``
    rows, and no more than the current keep rate says are still needed (less work at the end).
    Returns every row with its ``reason``.
    """
    out = list(rows)
    while True:
        kept = sum(r["reason"] == "keep" for r in out)
        if kept >= n_keep or len(out) >= budget:
            return out
        rate = max(kept / len(out), 0.25) if out else 1.0  # a floor so a bad start does not ask for thousands
        want = min(batch_size, budget - len(out), max(1, math.ceil((n_keep - kept) / rate)))
        new = generate_fn(len(out), want)
        if not new:
            raise RuntimeError("generate_fn returned no rows: collection would never end")
        out += [{**r, "reason": why} for r, why in zip(new, _reasons(judge_fn(new)))]


# ------------------------------------------------------------------ the stage
def filter_judge(ctx, base: nn.Module, tok) -> Judge:
    """The 03 decision as a judge: base-model scores (no steering hooks are live here) + thresholds."""
    from . import filter as F

    th = F.FilterThresholds.from_config(ctx.cfg)

    def judge(rows: list[dict]) -> list[str]:
        scored = F.filter_rows(rows, th, model=base, tokenizer=tok, prompts=[r["prompt_text"] for r in rows],
                               persona_pos=ctx.cfg.pos_persona, persona_neg=ctx.cfg.neg_persona,
                               batch_size=ctx.cfg.batch_size)
        return [r["reason"] for r in scored]

    return judge


def _finish_rows(ctx, rows: list[dict], pool: list[dict]) -> list[dict]:
    out = []
    for k, r in enumerate(rows):
        p = pool[r["pool_index"]]
        out.append({"id": f"r{ctx.round:02d}-{k:04d}", "round": ctx.round, "prompt_id": p["id"], "prompt": p["text"],
                    **{key: r[key] for key in ROW_KEYS if key in r and key not in ("id", "round", "prompt_id", "prompt")}})
    return out


def run_stage(ctx, model: nn.Module, tok, base: nn.Module | None = None, *, sv: SteeringVector | None = None) -> dict:
    """02_generate: calibrate the dose (unless the config fixes it), collect, write the round's files.

    Args:
        ctx: the stage context.
        model: the current student, used to sample (steered).
        tok: its tokenizer.
        base: the base model for the filter's scores (unsteered; ``model`` itself in round 0).
        sv: the steering vector; default: this round's ``vector.safetensors``.

    Writes ``generated.jsonl`` (rows at the chosen dose, :data:`ROW_KEYS`), ``calibration.jsonl``
    (every probe row with its dose and reason) and ``generate.json`` (dose, search path, counts
    per reason, timings, tokens/s). Returns the ``generate.json`` content.
    """
    from .runfolder import atomic_write_json, atomic_write_jsonl
    from .vector import check_vector_matches

    cfg = ctx.cfg
    sv = sv or SteeringVector.load(ctx.artifact("vector"))
    check_vector_matches(sv, model)
    base = model if base is None else base
    pool = load_prompts("dilemmas")
    order = permutation(len(pool), ctx.seed)
    params = sample_params(cfg)
    judge = filter_judge(ctx, base, tok)
    n_tok = {"calibration": 0, "collection": 0}
    seconds = {"calibration": 0.0, "collection": 0.0}

    def gen(dose: float, start: int, n: int, seed: int, phase: str) -> list[dict]:
        picks = [order[(start + j) % len(order)] for j in range(n)]
        t = time.time()
        rows = sample(model, tok, [pool[i]["text"] for i in picks], sv=sv, dose=dose, seed=seed, progress=True, **params)
        seconds[phase] += time.time() - t
        n_tok[phase] += sum(r["n_tokens"] + (not r["truncated"]) for r in rows)  # + the EOS step
        return [{**r, "pool_index": i, "prompt": pool[i]["text"]} for r, i in zip(rows, picks)]  # prompt: the off-topic gate

    t0 = time.time()
    if cfg.dose is None:
        # Same probe prompts and seed at every dose tried (common random numbers).
        cal = calibrate_dose(lambda d, n: gen(d, 0, n, ctx.seed, "calibration"), judge, lo=cfg.calib_lo,
                             hi=cfg.calib_hi, steps=cfg.calib_steps, target=cfg.calib_target, n=cfg.calib_probes)
        dose, start_rows = cal.dose, cal.rows
    else:
        cal, dose, start_rows = None, cfg.dose, []
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
        "round": ctx.round, "dose": dose, "dose_source": "config" if cal is None else "calibrated",
        "dose_unit": "fraction of the layer's median residual norm r_L (vector added: dose * r_L * v_L / |v_L|)",
        "below_target": bool(cal and cal.below_target), "calibration_path": cal.path if cal else [],
        "calib_target": cfg.calib_target, "n_generated": len(rows), "n_kept_02": reasons.get("keep", 0),
        "reasons_02": dict(reasons), "n_truncated": sum(r["truncated"] for r in rows),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / max(1, len(rows)),
        "prompts_used": len({r["pool_index"] for r in rows}), "pool_size": len(pool),
        "layers": sv.layers, "positions": cfg.steer_positions, "halflife": cfg.dose_halflife,
        "seconds": {"calibration": round(t_cal, 2), "total": round(t_all, 2),
                    "sampling": round(gen_s, 2), "scoring": round(t_all - gen_s, 2)},
        "tokens": dict(n_tok), "tokens_per_s": round(sum(n_tok.values()) / max(gen_s, 1e-9), 1),
    }
    atomic_write_json(ctx.artifact("generate_summary"), summary)
    return summary



# ------------------------------------------------------------------ looking at it
def compare(model: nn.Module, tok, sv: SteeringVector | None, prompt: str, doses: Sequence[float], *,
            seed: int = 0, **params) -> list[dict]:
    """The same prompt sampled at each dose with the same seed (dose 0 = the unsteered model)."""
    params = {**params, "batch_size": 1}
    return [sample(model, tok, [prompt], sv=sv, dose=d, seed=seed, **params)[0] for d in doses]


def _side_by_side(rows: Sequence[dict], labels: Sequence[str]) -> str:
    import html

    cells = "".join(
        f"<td style='vertical-align:top;width:{100 // len(rows)}%;padding:6px'><b>{html.escape(lab)}</b>"
        f"<br><small>{r['n_tokens']} tokens{', cut at max_new_tokens' if r['truncated'] else ''}</small>"
        f"<div style='white-space:pre-wrap'>{html.escape(r['completion'])}</div></td>"
        for r, lab in zip(rows, labels))
    return f"<table style='width:100%;table-layout:fixed'><tr>{cells}</tr></table>"


def comparison_html(rows: Sequence[dict]) -> str:
    """HTML: completions of :func:`compare` side by side, labelled by dose."""
    return _side_by_side(rows, [("unsteered" if r["dose"] == 0 else f"steered, dose {r['dose']:.3g}") for r in rows])


def compare_widget(model: nn.Module, tok, sv: SteeringVector, prompts: Sequence[dict], *, dose: float,
                   lo: float = 1e-3, hi: float = 2.0, seed: int = 0, **params):
    """JupyterLab: pick a prompt and a dose, press the button, see steered next to unsteered.

    Nothing is sampled until the button is pressed, so a notebook executed by papermill
    neither blocks nor spends time here. Returns ``None`` when ipywidgets is missing.
    """
    try:
        import ipywidgets as W
    except ImportError:
        return None
    picker = W.Dropdown(options=[(p["id"], p["text"]) for p in prompts], description="prompt",
                        layout=W.Layout(width="60%"))
    slider = W.FloatLogSlider(value=max(dose, lo), base=10, min=math.log10(lo), max=math.log10(hi), step=0.05,
                              description="dose", readout_format=".3f")
    button = W.Button(description="sample", icon="play")
    text = W.HTML(layout=W.Layout(width="100%"))
    shown = W.HTML()

    def show(_=None):
        shown.value = f"<i>{picker.value}</i>"
        button.disabled, text.value = True, "<i>sampling...</i>"
        try:
            text.value = comparison_html(compare(model, tok, sv, picker.value, [0.0, slider.value], seed=seed, **params))
        except Exception as e:  # a widget callback's exception would vanish into the log
            text.value = f"<b>error:</b> {type(e).__name__}: {e}"
        finally:
            button.disabled = False

    button.on_click(show)
    return W.VBox([W.HBox([picker, slider, button]), shown, text])


def figures(summary: dict, rows: Sequence[dict]):
    """Plotly figures for 02: the dose search path, and completion lengths."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = []
    path = summary.get("calibration_path") or []
    if path:
        reasons = sorted({k for p in path for k in p["reasons"]}, key=lambda k: (k != "keep", k))
        fig = make_subplots(rows=1, cols=2, subplot_titles=("keep fraction per dose tried (step number on the point)",
                                                            "probe verdicts per step"))
        fig.add_scatter(x=[p["dose"] for p in path], y=[p["frac"] for p in path], mode="markers+text",
                        text=[str(p["step"]) for p in path], textposition="top center", name="probes kept",
                        marker=dict(size=10, color=["seagreen" if p["passed"] else "firebrick" for p in path]),
                        row=1, col=1)
        fig.add_hline(y=summary["calib_target"], line_dash="dash", annotation_text="target", row=1, col=1)
        fig.add_vline(x=summary["dose"], line_dash="dot", annotation_text="chosen", row=1, col=1)
        for k in reasons:
            fig.add_bar(x=[f"{p['step']}: {p['dose']:.3g}" for p in path], y=[p["reasons"].get(k, 0) for p in path],
                        name=k, row=1, col=2)
        fig.update_xaxes(type="log", title="dose (fraction of r_L)", row=1, col=1)
        fig.update_yaxes(range=[-0.05, 1.1], row=1, col=1)
        fig.update_layout(barmode="stack", height=380, title=f"round {summary['round']}: dose search")
        figs.append(fig)
    fig = go.Figure()
    for trunc, color in ((False, "seagreen"), (True, "darkorange")):
        fig.add_histogram(x=[r["n_tokens"] for r in rows if r["truncated"] == trunc], name="cut at max_new_tokens" if trunc else "ended (EOS)",
                          marker_color=color)
    fig.update_layout(barmode="stack", height=300, title=f"completion length (tokens), dose {summary['dose']:.3g}",
                      xaxis_title="tokens")
    figs.append(fig)
    return figs
