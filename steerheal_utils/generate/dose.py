"""The dose search: the largest dose at which the 03 filter still keeps enough of what it keeps unsteered.

The dose is not fixed but calibrated (the precursor found coherence falls off a cliff between
two nearby coefficients): :func:`calibrate_dose` samples the same probes (prompts and seeds:
common random numbers) unsteered and at a log-spaced grid of doses between ``calib_lo`` and
``calib_hi``, fits a monotone keep-rate curve (:mod:`.keepcurve`), and takes the *largest* dose
at which the filter still keeps ``calib_target`` of what it keeps unsteered (``calib_relative``).
It checks the curve's monotonicity instead of assuming it and flags a search that ends at a
bound, below target or on a non-monotone curve (:data:`DOSE_FLAGS`: generate.json, metrics.csv,
the report, the terminal). Then :func:`collect` samples at that dose until ``n_keep`` are kept
or ``gen_budget`` have been generated.

Sampling and judging are injected (``generate_fn``, ``judge_fn``), so the search is tested on
simulated keep curves without a model.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .keepcurve import N_BOOT, KeepCurve, binom_cdf, fit_keep_curve, grid_doses

# generate_fn(dose, n, rep) -> n probe rows. rep 0 is the probe set shared by every dose (the same
# prompts and sampling seeds: common random numbers); rep >= 1 (dose 0 only) are the same prompts
# sampled with other seeds, for a tighter unsteered baseline.
ProbeFn = Callable[[float, int, int], list[dict]]
Judge = Callable[[list[dict]], Sequence[Any]]

# The search's fixed statistics (not knobs: they decide how loudly it warns, not what it computes).
REUSE_ALPHA = 0.01       # a reused dose keeps "significantly less" than round 0's threshold when p < this
BASELINE_REPS = 2        # calls at dose 0 (the same prompts, other seeds after the first): a tighter baseline
DIVERGE_FACTOR = 1.25    # a round's dose further than this factor from round 0's is flagged "diverged"
DOSE_FLAGS = {  # flag -> meaning; generate.json "dose_flags", metrics.csv "dose_flag", the warning line
    "below_target": "even the lowest dose keeps less than the target: the round runs at calib_lo, nearly unsteered",
    "at_lower_bound": "the search ended at its lowest dose calib_lo",
    "at_upper_bound": "the search ended at its highest dose calib_hi: the text never broke, a larger dose may be possible",
    "non_monotone": "the keep rate rises with the dose beyond binomial noise: doses past the first failing one were not trusted",
    "diverged": f"the dose differs from round 0's by more than a factor {DIVERGE_FACTOR}",
    "reused_keeps_less": "round 0's dose, reused, now keeps significantly less than round 0's threshold",
}


class CalibrationError(RuntimeError):
    """Even the smallest dose tried kept nothing: the message gives the counts per drop reason."""


def _reasons(verdicts: Sequence[Any]) -> list[str]:
    """Judge output as reasons: a reason string per row ("keep" or why dropped), or bools."""
    return [v if isinstance(v, str) else ("keep" if v else "drop") for v in verdicts]


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
