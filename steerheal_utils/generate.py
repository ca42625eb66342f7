"""Stage 02: sample steered completions of care-vs-authority dilemmas.

Steering adds ``dose * r_L * v_L / ||v_L||`` to the output of every steered block (see
:mod:`.vector`): **the dose is a fraction of the layer's median residual norm**, so dose 0.1
pushes each hidden state by a tenth of a typical hidden state's length along the persona
axis, whatever the model.

The dose is not fixed but calibrated (the precursor found coherence falls off a cliff between
two nearby coefficients): :func:`calibrate_dose` samples the same probes (prompts and seeds:
common random numbers) unsteered and at a log-spaced grid of doses between ``calib_lo`` and
``calib_hi``, fits a monotone keep-rate curve, and takes the *largest* dose at which the 03
filter still keeps ``calib_target`` of what it keeps unsteered (``calib_relative``). It checks
the curve's monotonicity instead of assuming it and flags a search that ends at a bound, below
target or on a non-monotone curve (:data:`DOSE_FLAGS`: generate.json, metrics.csv, the report,
the terminal). ``calib_rounds: first`` calibrates in round 0 only and reuses that dose later.
Then completions are collected at that dose until ``n_keep`` are kept or ``gen_budget`` have
been generated. The filter used here for the stopping rule is the one 03 applies; 03 re-scores
every row with the config's thresholds and its decision is the one heal uses.

Public API:
    load_prompts(kind)                       -> rows of the shipped pool or held-out set
    sample(model, tok, prompts, ...)         -> one dict per prompt (completion, n_tokens, truncated...)
    calibrate_dose(generate_fn, judge_fn, ...) -> Calibration (dose, fitted keep curve, flags, rows at that dose)
    collect(generate_fn, judge_fn, ...)      -> rows until n_keep kept or the budget is spent
    run_stage(ctx, model, tok, base)         -> writes completions.jsonl, calibration.jsonl, generate.json
    warn_dose(run_dir, rnd)                  -> prints generate.json's dose warning line, if any
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
    from .progress import tqdm  # a plain final line, not a frozen widget, in the journal

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
# generate_fn(dose, n, rep) -> n probe rows. rep 0 is the probe set shared by every dose (the same
# prompts and sampling seeds: common random numbers); rep >= 1 (dose 0 only) are the same prompts
# sampled with other seeds, for a tighter unsteered baseline.
ProbeFn = Callable[[float, int, int], list[dict]]
Judge = Callable[[list[dict]], Sequence[Any]]

# The search's fixed statistics (not knobs: they decide how loudly it warns, not what it computes).
MONOTONE_ALPHA = 0.01    # raw keep rates contradict a non-increasing curve when the test's p < this
REUSE_ALPHA = 0.01       # a reused dose keeps "significantly less" than round 0's threshold when p < this
N_BOOT = 1000            # parametric-bootstrap draws (monotonicity test and dose interval)
BASELINE_REPS = 2        # calls at dose 0 (the same prompts, other seeds after the first): a tighter baseline
DOSE_CI = 0.90           # coverage of the chosen dose's bootstrap interval
DIVERGE_FACTOR = 1.25    # a round's dose further than this factor from round 0's is flagged "diverged"
DOSE_FLAGS = {  # flag -> meaning; generate.json "dose_flags", metrics.csv "dose_flag", the warning line
    "below_target": "even the lowest dose keeps less than the target: the round runs at calib_lo, nearly unsteered",
    "at_lower_bound": "the search ended at its lowest dose calib_lo",
    "at_upper_bound": "the search ended at its highest dose calib_hi: the text never broke, a larger dose may be possible",
    "non_monotone": "the keep rate rises with the dose beyond binomial noise: doses past the first failing one were not trusted",
    "diverged": f"the dose differs from round 0's by more than a factor {DIVERGE_FACTOR}",
    "reused_keeps_less": "round 0's dose, reused, now keeps significantly less than round 0's threshold",
}


def _reasons(verdicts: Sequence[Any]) -> list[str]:
    """Judge output as reasons: a reason string per row ("keep" or why dropped), or bools."""
    return [v if isinstance(v, str) else ("keep" if v else "drop") for v in verdicts]


def isotonic_decreasing(y: Sequence[float], w: Sequence[float]) -> list[float]:
    """The non-increasing sequence closest to ``y`` in weighted least squares (pool adjacent violators).

    With ``y`` the keep rates ``k_i / n_i`` at increasing doses and ``w = n_i`` this is also the
    maximum-likelihood binomial keep curve under "more steering never keeps more".

    Example:
        >>> isotonic_decreasing([0.5, 0.7, 0.2], [2, 2, 1])
        [0.6, 0.6, 0.2]
    """
    if len(y) != len(w) or any(wi <= 0 for wi in w):
        raise ValueError("isotonic_decreasing needs one positive weight per value")
    blocks: list[list[float]] = []  # [weighted sum, weight, length]
    for yi, wi in zip(y, w):
        blocks.append([yi * wi, wi, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, ww, m = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += ww
            blocks[-1][2] += m
    return [b[0] / b[1] for b in blocks for _ in range(int(b[2]))]


def binom_deviance(kept: Sequence[float], n: Sequence[float], fit: Sequence[float]) -> float:
    """2 x the log-likelihood ratio of the raw rates ``kept / n`` against fitted rates (0 log 0 = 0)."""
    g = 0.0
    for k, m, f in zip(kept, n, fit):
        f = min(max(f, 1e-12), 1 - 1e-12)
        if k > 0:
            g += k * math.log(k / m / f)
        if k < m:
            g += (m - k) * math.log((1 - k / m) / (1 - f))
    return 2.0 * g


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, min(k, n) + 1)) if k >= 0 else 0.0


def crossing(doses: Sequence[float], fit: Sequence[float], threshold: float) -> tuple[float, str]:
    """Where a non-increasing keep curve falls below ``threshold``, log-linear between doses.

    Args:
        doses: increasing positive doses.
        fit: the fitted keep rate at each (non-increasing).
        threshold: the keep rate required.

    Returns ``(dose, where)``: ``"inside"`` (the largest dose whose interpolated rate meets the
    threshold), ``"lower"`` (even the first dose is below it: that dose) or ``"upper"`` (the last
    dose still meets it: that dose).

    Example:
        >>> d, where = crossing([0.01, 0.1], [0.8, 0.4], 0.6)   # half-way in log-dose
        >>> round(d, 4), where
        (0.0316, 'inside')
    """
    if fit[0] < threshold:
        return doses[0], "lower"
    if fit[-1] >= threshold:
        return doses[-1], "upper"
    j = next(i for i, f in enumerate(fit) if f < threshold)
    a, b = math.log(doses[j - 1]), math.log(doses[j])
    frac = (fit[j - 1] - threshold) / (fit[j - 1] - fit[j])
    return math.exp(a + frac * (b - a)), "inside"


def grid_doses(lo: float, hi: float, grid: int) -> list[float]:
    """``grid`` log-spaced doses from ``lo`` to ``hi``, both exactly included."""
    if grid < 2:
        raise ValueError(f"a dose grid needs at least 2 points, got {grid}")
    return [lo, *(lo * (hi / lo) ** (i / (grid - 1)) for i in range(1, grid - 1)), hi]


@dataclass
class KeepCurve:
    """A monotone fit of keep rate against dose, and the dose where it meets the target.

    Attributes:
        doses, n, kept: the sampled doses (increasing, the first one 0) and their probe counts.
        fit: the isotonic (non-increasing) keep rate at each dose, weighted by ``n``.
        baseline: the raw keep rate at dose 0 (``relative``; None otherwise); ``threshold`` =
            ``target`` x baseline, or ``target`` itself.
        dose, where: :func:`crossing` of the fit over the positive doses it trusts.
        deviance, monotone_p: likelihood-ratio statistic of the raw rates against the fit, and its
            parametric-bootstrap p-value; ``non_monotone`` when p < :data:`MONOTONE_ALPHA`.
        trusted_upto: with ``non_monotone``, the largest dose the choice used; None otherwise.
        ci: a :data:`DOSE_CI` parametric-bootstrap interval of ``dose``.
    """

    doses: list[float]
    n: list[int]
    kept: list[int]
    fit: list[float]
    baseline: float | None
    threshold: float
    dose: float
    where: str
    deviance: float
    monotone_p: float
    non_monotone: bool
    trusted_upto: float | None
    ci: tuple[float, float]
    target: float
    relative: bool


def _choose(doses, n, kept, target, relative):
    """Fit, baseline, threshold and crossing of one data set (no monotonicity handling)."""
    fit = isotonic_decreasing([k / m for k, m in zip(kept, n)], n)
    baseline = kept[0] / n[0] if relative else None
    thr = target * baseline if relative else target
    return (fit, baseline, thr, *crossing(doses[1:], fit[1:], thr))


def fit_keep_curve(doses: Sequence[float], n: Sequence[int], kept: Sequence[int], *, target: float,
                   relative: bool = True, seed: int = 0, n_boot: int = N_BOOT) -> KeepCurve:
    """Fit keep rate against dose and choose the dose (the statistics of :func:`calibrate_dose`).

    Args:
        doses: sampled doses, increasing, starting with 0 (the unsteered model on the same probes).
        n, kept: probes and kept probes per dose.
        target: keep rate required, a fraction of the raw keep rate at dose 0 (``relative``) or absolute.
        seed: for the bootstrap draws: the result is a deterministic function of the data and seed.

    Monotonicity is checked, not assumed: the deviance of the raw rates from the isotonic fit is
    compared with its distribution when the fit is the truth (``n_boot`` binomial draws at the
    fitted rates, each refitted). When p < :data:`MONOTONE_ALPHA` the curve is not trusted past
    the first positive dose whose raw rate fails the threshold, and the fit is redone on the doses
    up to it: a dip followed by a recovery at higher doses cannot carry the choice past the dip.
    The dose interval comes from the same draws, each taken through :func:`crossing`. Both are
    approximate: the draws are independent across doses while the real probes share prompts and
    seeds, and in the simulation of ``tests/test_generate.py`` the nominal 90% interval of the
    chosen dose covered the true crossing 84% of the time.
    """
    doses, n, kept = [float(d) for d in doses], [int(m) for m in n], [int(k) for k in kept]
    if not len(doses) == len(n) == len(kept) or len(doses) < 2 or doses[0] != 0.0:
        raise ValueError("fit_keep_curve needs dose 0 first and at least one positive dose")
    if any(b <= a for a, b in zip(doses, doses[1:])) or any(m < 1 or not 0 <= k <= m for k, m in zip(kept, n)):
        raise ValueError(f"doses must increase and 0 <= kept <= n, n >= 1: {list(zip(doses, kept, n))}")
    fit, baseline, thr, dose, where = _choose(doses, n, kept, target, relative)
    dev = binom_deviance(kept, n, fit)
    g = torch.Generator().manual_seed(seed)
    draws = torch.binomial(torch.tensor(n, dtype=torch.float64).expand(n_boot, -1).contiguous(),
                           torch.tensor(fit, dtype=torch.float64).clamp(0, 1).expand(n_boot, -1).contiguous(),
                           generator=g)
    exceed, boot = 0, []
    for row in draws.tolist():
        f_b, b_b, _, d_b, _ = _choose(doses, n, row, target, relative)
        exceed += binom_deviance(row, n, f_b) >= dev - 1e-9
        boot.append(d_b)
    p = (1 + exceed) / (1 + n_boot) if dev > 1e-9 else 1.0
    non_mono, upto = p < MONOTONE_ALPHA, None
    if non_mono:
        fail = next((i for i in range(1, len(doses)) if kept[i] / n[i] < thr), None)
        if fail is not None and fail < len(doses) - 1:
            upto = doses[fail]
            _, baseline, thr, dose, where = _choose(doses[:fail + 1], n[:fail + 1], kept[:fail + 1], target, relative)
            where = "lower" if where == "lower" else "inside"  # the end of a truncated range is not calib_hi
    boot.sort()
    q = (1 - DOSE_CI) / 2
    ci = (boot[int(q * (n_boot - 1))], boot[int(round((1 - q) * (n_boot - 1)))])
    return KeepCurve(doses, n, kept, fit, baseline, thr, dose, where, dev, p, non_mono, upto, ci, target, relative)


@dataclass
class Calibration:
    """Result of :func:`calibrate_dose`.

    Attributes:
        dose: the chosen dose.
        curve: the :class:`KeepCurve` it was chosen from (every probe before the chosen dose's own).
        final: the same fit over every probe, the chosen dose's own included (for the record).
        path: every call, in order: ``{"step", "phase" ("baseline", "grid" or "refine"), "dose",
            "n", "kept", "frac", "reasons", "fit" (final fit at that dose), "passed" (fit >= threshold)}``.
        rows: the probe rows at the chosen dose (reusable as collected rows), each with its
            ``reason``; empty when the chosen dose was never sampled (``refine=0``).
        probes: the probe rows of every call, in ``path`` order.
    """

    dose: float
    curve: KeepCurve
    final: KeepCurve
    path: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    probes: list[list[dict]] = field(default_factory=list)

    @property
    def below_target(self) -> bool:
        return self.curve.where == "lower"

    @property
    def flags(self) -> list[str]:
        """The :data:`DOSE_FLAGS` this search raised (empty: an ordinary crossing inside the range)."""
        c = self.curve
        return [f for f, on in (("below_target", c.where == "lower"), ("at_lower_bound", c.where == "lower"),
                                ("at_upper_bound", c.where == "upper"), ("non_monotone", c.non_monotone)) if on]

    def record(self) -> dict:
        """What generate.json keeps of the search (JSON-ready): ``points`` are the raw rates and the
        fit over every probe (:attr:`final`); ``threshold``, ``where``, ``crossing_ci`` and the
        monotonicity test are those of the fit the dose was chosen from (:attr:`curve`)."""
        c, f = self.curve, self.final
        return {"target": c.target, "relative": c.relative, "baseline_keep": c.baseline, "threshold": c.threshold,
                "where": c.where, "crossing_ci": list(c.ci), "monotone_deviance": c.deviance,
                "monotone_p": c.monotone_p, "non_monotone": c.non_monotone, "trusted_upto": c.trusted_upto,
                "points": [{"dose": d, "n": m, "kept": k, "frac": k / m, "fit": ft}
                           for d, m, k, ft in zip(f.doses, f.n, f.kept, f.fit)],
                "final_crossing": f.dose, "final_where": f.where}


def calibrate_dose(generate_fn: ProbeFn, judge_fn: Judge, *, lo: float, hi: float, grid: int = 4, n: int = 32,
                   target: float = 0.75, relative: bool = True, refine: int = 3, baseline_reps: int = BASELINE_REPS,
                   seed: int = 0, n_boot: int = N_BOOT) -> Calibration:
    """The largest dose in ``[lo, hi]`` at which the filter still keeps ``target`` of what it keeps unsteered.

    1. The unsteered model (dose 0) on the probes, ``baseline_reps`` times (the same prompts, the
       first time with the shared seeds, then with others); then the same ``n`` probes (same
       prompts and sampling seeds: common random numbers) at ``grid`` log-spaced doses from ``lo``
       to ``hi``.
    2. A non-increasing keep curve fitted to every dose sampled so far (:func:`isotonic_decreasing`,
       weighted by counts), the threshold ``target`` x the dose-0 keep rate, and the dose where the
       fit, interpolated in log-dose, meets it (:func:`crossing`); see :func:`fit_keep_curve` for
       the monotonicity check and the interval.
    3. ``refine`` times: sample the probes at the current estimate; refit between calls. The last
       call samples the chosen dose itself, whose rows start the collection (it would sample them
       anyway), so only ``refine - 1`` calls improve the estimate.

    Why relative to dose 0 (``relative=True``): the dose should be limited by what steering breaks,
    not by what the model fails unsteered. SmolLM2-135M's answers fail the off-topic gate ~40% of
    the time at dose 0, so an absolute target of 0.6 sat at the unsteered keep rate and every dose
    "passed" or "failed" by luck. Counting only the drop reasons steering causes does not work:
    strong steering makes text off-topic too, so the same reason is both the unsteered failure and
    the steering cliff. ``relative=False`` keeps an absolute target (for a model that passes
    nearly everything unsteered the two agree).

    Why it is not a coin flip (binomial arithmetic at SmolLM2's rates, p0 = 0.6 unsteered,
    ``target`` 0.75, so a threshold of 0.45): the baseline rests on ``baseline_reps`` x ``n`` = 64
    probes, standard error sqrt(0.6 x 0.4 / 64) = 0.061, i.e. 0.046 on the threshold. A dose with
    32 probes whose true rate is still p0 reads below 0.45 with P(Bin(32, 0.6) <= 14) = 0.05, one
    whose true rate is 0.30 reads at or above it with P(Bin(32, 0.3) >= 15) = 0.03, and the fit
    pools neighbouring doses on top of that. The old search compared one call of 16 probes with a
    target at the unsteered rate: P(Bin(16, 0.65) >= 10) = 0.69 at *every* harmless dose, so its
    first bisection step went either way. Simulated with independent Bernoulli outcomes on a
    SmolLM2-like keep curve (62% unsteered, half that at dose 0.12; ``tests/test_generate.py``),
    over 400 seeds the chosen dose's 10/50/90% quantiles are x0.53 / x0.97 / x1.28 of the true
    crossing, against x0.10 / x0.28 / x0.78 for the old search at the old preset.

    The search ends loudly at a bound: ``below_target`` / ``at_lower_bound`` when even ``lo``
    fails (the dose is ``lo``), ``at_upper_bound`` when ``hi`` still passes; ``non_monotone`` when
    the raw rates rise with the dose beyond binomial noise (see :attr:`Calibration.flags`).

    Args:
        generate_fn: ``(dose, n, rep) -> rows``: ``rep`` 0 must give the same probe prompts with the
            same seeds at every dose; ``rep`` >= 1 (dose 0 only) the same prompts with other seeds.
        judge_fn: ``rows -> verdicts``, a reason per row (``"keep"`` or why dropped) or a bool.
        lo, hi: dose bounds, ``0 < lo < hi``.
        grid: log-spaced doses from ``lo`` to ``hi`` (both included), besides dose 0.
        n: probes per call.
        target: keep rate required, a fraction of the dose-0 rate when ``relative``.
        refine: calls at the estimated crossing after the grid (0: the dose is the grid's estimate
            and no probe rows come back unless it is a grid dose).
        baseline_reps: calls at dose 0.
        seed: bootstrap seed.

    Raises :class:`CalibrationError` (with counts per drop reason) when no probe was kept at all,
    or when the lowest dose is below target and kept none of its probes.

    Example:
        >>> gen = lambda d, n, rep: [{"d": d, "i": i} for i in range(n)]
        >>> judge = lambda rows: [r["i"] < 8 * (1 - min(r["d"], 0.2) / 0.2) for r in rows]  # true crossing 0.05
        >>> cal = calibrate_dose(gen, judge, lo=0.01, hi=1.0, grid=5, n=8, refine=3)
        >>> round(cal.dose, 3), cal.flags, len(cal.rows)
        (0.06, [], 8)
    """
    if not 0 < lo < hi or not all(map(math.isfinite, (lo, hi))):
        raise ValueError(f"dose bounds must satisfy 0 < lo < hi, got lo={lo}, hi={hi}")
    if grid < 2 or n < 1 or refine < 0 or baseline_reps < 1 or not 0 <= target <= 1:
        raise ValueError(f"need grid >= 2, n >= 1, refine >= 0, baseline_reps >= 1 and 0 <= target <= 1; got "
                         f"grid={grid}, n={n}, refine={refine}, baseline_reps={baseline_reps}, target={target}")
    path: list[dict] = []
    probes: list[list[dict]] = []

    def trial(dose: float, phase: str, rep: int = 0) -> None:
        rows = generate_fn(dose, n, rep)
        reasons = _reasons(judge_fn(rows))
        if len(reasons) != len(rows) or not rows:
            raise ValueError(f"judge_fn returned {len(reasons)} verdicts for {len(rows)} rows")
        kept = sum(r == "keep" for r in reasons)
        path.append({"step": len(path), "phase": phase, "dose": dose, "rep": rep, "n": len(rows), "kept": kept,
                     "frac": kept / len(rows), "reasons": dict(Counter(reasons))})
        probes.append([{**r, "reason": why} for r, why in zip(rows, reasons)])

    def pooled() -> dict[float, list[int]]:
        by: dict[float, list[int]] = {}
        for p in path:
            c = by.setdefault(p["dose"], [0, 0])
            c[0] += p["n"]
            c[1] += p["kept"]
        return dict(sorted(by.items()))

    def fit() -> KeepCurve:
        by = pooled()
        return fit_keep_curve(list(by), [c[0] for c in by.values()], [c[1] for c in by.values()],
                              target=target, relative=relative, seed=seed, n_boot=n_boot)

    for rep in range(baseline_reps):
        trial(0.0, "baseline", rep)
    for dose in grid_doses(lo, hi, grid):
        trial(dose, "grid")
    if not any(p["kept"] for p in path):
        raise CalibrationError(_starved("no probe was kept at any dose, not even unsteered (dose 0)", path))
    curve = fit()
    for r in range(refine):
        if any(math.isclose(p["dose"], curve.dose, rel_tol=1e-9) for p in path):
            break  # a bound or a dose already sampled: its rows exist
        trial(curve.dose, "refine")
        if r < refine - 1:  # not the last call: refit for the next estimate
            curve = fit()
    final = fit()
    at = next((i for i, p in enumerate(path) if p["rep"] == 0 and math.isclose(p["dose"], curve.dose, rel_tol=1e-9)), None)
    if curve.where == "lower" and at is not None and path[at]["kept"] == 0:
        raise CalibrationError(_starved(f"even the smallest dose {lo:g} kept 0 of its {path[at]['n']} probe completions "
                                        f"(the threshold was {curve.threshold:.2f})", path, at))
    fitted = dict(zip(final.doses, final.fit))
    for p in path:
        p["fit"] = fitted[p["dose"]]
        p["passed"] = p["fit"] >= final.threshold
    return Calibration(curve.dose, curve, final, path, probes[at] if at is not None else [], probes)


def probe_calls(cfg, rnd: int = 0) -> int:
    """Sampling calls the dose search makes in round ``rnd`` at most, not counting the last
    refine call, whose rows are collected (0 when the dose is fixed or reused from round 0)."""
    if cfg.dose is not None or (cfg.calib_rounds == "first" and rnd > 0):
        return 0
    return BASELINE_REPS + cfg.calib_grid + max(0, cfg.calib_refine - 1)


def _starved(what: str, path: list[dict], at: int | None = None) -> str:
    reasons: Counter = Counter()
    for p in (path if at is None else [path[at]]):
        reasons.update(p["reasons"])
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return (f"dose search: {what} (drop reasons: {counts}). Lower calib_lo, loosen the 03 filter thresholds, or "
            f"check the model and prompts; path: " + "; ".join(f"{p['dose']:.3g} -> {p['kept']}/{p['n']}" for p in path))


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
    """02_generate: choose the dose, collect, write the round's files.

    The dose comes from the config (``dose`` set), from round 0 (``calib_rounds: first`` in a
    later round: every round then steers with the same push), or from :func:`calibrate_dose` on
    this round's model. Either way it is compared with round 0's and flagged (:data:`DOSE_FLAGS`).

    Args:
        ctx: the stage context.
        model: the current student, used to sample (steered).
        tok: its tokenizer.
        base: the base model for the filter's scores (unsteered; ``model`` itself in round 0).
        sv: the steering vector; default: this round's ``vector.safetensors``.

    Writes ``generated.jsonl`` (rows at the chosen dose, :data:`ROW_KEYS`), ``calibration.jsonl``
    (every probe row with its dose and reason) and ``generate.json`` (dose, its source, flags and
    warning line, the search's points and fit, counts per reason, timings, tokens/s). Returns the
    ``generate.json`` content.
    """
    from .runfolder import RunFolderError, atomic_write_json, atomic_write_jsonl, read_json
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
        from .progress import search_note

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
    summary["dose_warning"] = dose_warning(summary)
    atomic_write_json(ctx.artifact("generate_summary"), summary)
    return summary


def dose_checks(cal: Calibration | None, dose: float, source: str, round0: dict | None, kept: int, n: int) -> dict:
    """The dose's flags (:data:`DOSE_FLAGS`) and its comparison with round 0's, as generate.json fields.

    ``round0`` is round 0's generate.json (None in round 0). A calibrated dose more than
    :data:`DIVERGE_FACTOR` from round 0's is ``diverged`` (``round0_dose_in_ci`` says whether
    round 0's dose lies inside this round's interval, i.e. whether probe noise alone could
    explain the gap). A reused dose (``source`` "round0") is ``reused_keeps_less`` when this
    round's 02 keep rate ``kept / n`` is below round 0's threshold with binomial p <
    :data:`REUSE_ALPHA` (round 0's threshold was relative to round 0's unsteered rate: this
    round's own unsteered rate is not measured when the dose is reused).
    """
    flags = list(cal.flags) if cal else []
    d0 = round0.get("dose") if round0 else None
    out: dict[str, Any] = {"round0_dose": d0, "dose_ratio_to_round0": dose / d0 if d0 else None,
                           "round0_dose_in_ci": None, "reuse_check": None}
    if cal is not None and d0:
        lo, hi = cal.curve.ci
        out["round0_dose_in_ci"] = lo <= d0 <= hi
        if not 1 / DIVERGE_FACTOR <= dose / d0 <= DIVERGE_FACTOR:
            flags.append("diverged")
    if source == "round0" and round0 and (round0.get("calibration") or {}).get("threshold") is not None and n:
        thr = round0["calibration"]["threshold"]
        p = binom_cdf(kept, n, thr)
        out["reuse_check"] = {"kept": kept, "n": n, "round0_threshold": thr, "p": p}
        if p < REUSE_ALPHA:
            flags.append("reused_keeps_less")
    return {**out, "below_target": "below_target" in flags, "dose_flags": flags, "dose_flag": ";".join(flags)}


def dose_warning(summary: dict) -> str | None:
    """One line for the terminal and the report when the dose is flagged; None otherwise.

    Example:
        >>> dose_warning({"round": 1, "dose": 0.005, "dose_source": "calibrated", "dose_flags": ["at_lower_bound"]})
        'warning: round 01 dose 0.005 (calibrated): at_lower_bound (the search ended at its lowest dose calib_lo)'
    """
    flags = summary.get("dose_flags") or []
    if not flags:
        return None
    what = "; ".join(f"{f} ({DOSE_FLAGS.get(f, '?')})" for f in flags)
    cal = summary.get("calibration") or {}
    extra = ""
    if cal.get("threshold") is not None:
        pts = {p["dose"]: p for p in cal.get("points", [])}
        at = pts.get(summary["dose"])
        base = (f" = {cal['target']:g} x unsteered {cal['baseline_keep']:.2f}" if cal.get("relative") and
                cal.get("baseline_keep") is not None else "")
        extra = (f"; fitted keep at the dose {at['fit']:.2f}" if at else "") + f", threshold {cal['threshold']:.2f}{base}"
    if summary.get("dose_ratio_to_round0") is not None and "diverged" in flags:
        extra += f"; round 0's dose {summary['round0_dose']:.3g} (x{summary['dose_ratio_to_round0']:.2f})"
    return f"warning: round {summary['round']:02d} dose {summary['dose']:.3g} ({summary['dose_source']}): {what}{extra}"


def warn_dose(run_dir: Path | str, rnd: int, file=None) -> str | None:
    """Print round ``rnd``'s dose warning (02's generate.json), if any, to stderr; return it. For the driver."""
    import sys

    from . import contract
    from .runfolder import read_json

    p = contract.path(run_dir, rnd, "generate_summary")
    if not p.exists():
        return None
    line = dose_warning(read_json(p, "02_generate record"))
    if line:
        print(line, file=file or sys.stderr, flush=True)
    return line



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
    from .figstatic import with_static

    return with_static(W.VBox([W.HBox([picker, slider, button]), shown, text]),
                       "<p><i>Interactive dose comparison: open this notebook in JupyterLab with a kernel to sample "
                       "any prompt at any dose (the held-out comparison above is its static record).</i></p>")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def figures(summary: dict, rows: Sequence[dict]):
    """Plotly figures for 02: the dose search (keep rate per dose with 95% intervals, the monotone
    fit, the threshold, the chosen dose and its interval; flags in red in the title), the probe
    verdicts per call, and completion lengths."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figs = []
    flags = summary.get("dose_flags") or []
    flag_txt = f" <span style='color:#c00'><b>FLAGGED: {', '.join(flags)}</b></span>" if flags else ""
    cal = summary.get("calibration") or {}
    path = summary.get("calibration_path") or []
    if cal and path:
        pts = cal["points"]
        pos = [p for p in pts if p["dose"] > 0]
        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                            subplot_titles=("keep rate per dose (95% Wilson bars), monotone fit", "probe verdicts per call"))
        ci = [wilson(p["kept"], p["n"]) for p in pos]
        fig.add_scatter(x=[p["dose"] for p in pos], y=[p["frac"] for p in pos], mode="markers", name="kept (raw)",
                        error_y=dict(type="data", symmetric=False, array=[c[1] - p["frac"] for c, p in zip(ci, pos)],
                                     arrayminus=[p["frac"] - c[0] for c, p in zip(ci, pos)]),
                        text=[f"{p['kept']}/{p['n']}" for p in pos], marker=dict(size=9, color="#444"), row=1, col=1)
        fig.add_scatter(x=[p["dose"] for p in pos], y=[p["fit"] for p in pos], mode="lines", name="monotone fit",
                        line=dict(color="seagreen"), row=1, col=1)
        if cal.get("baseline_keep") is not None:
            lo0, hi0 = wilson(pts[0]["kept"], pts[0]["n"])
            fig.add_hrect(y0=lo0, y1=hi0, fillcolor="gray", opacity=0.15, line_width=0, row=1, col=1)
            fig.add_hline(y=cal["baseline_keep"], line_dash="dot", line_color="gray", row=1, col=1,
                          annotation_text=f"unsteered {pts[0]['kept']}/{pts[0]['n']}")
        thr_txt = (f"threshold {cal['threshold']:.2f} = {cal['target']:g} x unsteered" if cal.get("relative")
                   else f"threshold {cal['threshold']:.2f}")
        fig.add_hline(y=cal["threshold"], line_dash="dash", line_color="firebrick", annotation_text=thr_txt, row=1, col=1)
        lo_ci, hi_ci = cal["crossing_ci"]
        fig.add_vrect(x0=lo_ci, x1=hi_ci, fillcolor="royalblue", opacity=0.12, line_width=0, row=1, col=1)
        fig.add_vline(x=summary["dose"], line_dash="dot", line_color="royalblue",
                      annotation_text=f"chosen {summary['dose']:.3g} (90%: {lo_ci:.3g}-{hi_ci:.3g})", row=1, col=1)
        reasons = sorted({k for p in path for k in p["reasons"]}, key=lambda k: (k != "keep", k))
        for k in reasons:
            fig.add_bar(x=[f"{p['step']} {p['phase'][0]}: {p['dose']:.3g}" for p in path],
                        y=[p["reasons"].get(k, 0) for p in path], name=k, row=1, col=2)
        fig.update_xaxes(type="log", title="dose (fraction of r_L)", row=1, col=1)
        fig.update_yaxes(range=[-0.05, 1.05], title="kept fraction", row=1, col=1)
        mono = f"monotone test p = {cal['monotone_p']:.3g}"
        fig.update_layout(barmode="stack", height=420,
                          title=f"round {summary['round']}: dose search ({mono}){flag_txt}")
        figs.append(fig)
    fig = go.Figure()
    for trunc, color in ((False, "seagreen"), (True, "darkorange")):
        fig.add_histogram(x=[r["n_tokens"] for r in rows if r["truncated"] == trunc], name="cut at max_new_tokens" if trunc else "ended (EOS)",
                          marker_color=color)
    src = "" if summary.get("dose_source") == "calibrated" else f" ({summary.get('dose_source')})"
    fig.update_layout(barmode="stack", height=300, xaxis_title="tokens",
                      title=f"completion length (tokens), dose {summary['dose']:.3g}{src}" + ("" if cal else flag_txt))
    figs.append(fig)
    return figs
