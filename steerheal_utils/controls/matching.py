"""Matching a control's dose to the persona's effect: the secant search and the per-model matcher."""

from __future__ import annotations

import math
import zlib
from typing import Callable, Sequence

import torch
from torch import nn

from ..vector.value import SteeringVector
from .effect import tag_kl, tag_logprobs


def match_dose(kl_at: Callable[[float], float], target: float, start: float, *, tol: float = 0.1,
               max_dose: float | None = None, max_steps: int = 12, first: float | None = None) -> dict:
    """The dose at which ``kl_at(dose)`` is within ``tol`` (relative) of ``target``.

    A secant search on ``log KL`` against ``log dose``: for small doses KL grows as dose^2
    (a line of slope 2 in log-log), so the first step assumes slope 2 and later steps use the
    secant of the last two points; once the target is bracketed, a step that leaves the
    bracket is replaced by its midpoint (in log-dose), so a non-linear or noisy curve still
    converges. A non-finite KL counts as overshooting.

    Args:
        kl_at: KL at a dose (e.g. a :func:`tag_kl` closure for one control vector).
        target: the persona's KL at its own dose.
        start: the persona's dose (``ratio`` is relative to it).
        tol: accepted relative error, ``|kl / target - 1| <= tol``.
        max_dose: highest dose tried (default ``10 * start``).
        max_steps: KL evaluations at most.
        first: first dose tried (default ``start``; a band passes the dose its earlier members
            needed, which saves about one evaluation per control).

    Returns:
        ``{"dose", "kl", "target_kl", "start", "ratio" (dose / start), "matched", "steps", "trace"
        [[dose, kl], ...], "reason"}``. When not matched, ``dose``/``kl`` are the closest point
        tried and ``reason`` says why (the bound was reached, or no convergence).

    Example:
        >>> m = match_dose(lambda d: 3.0 * d ** 2, target=0.12, start=0.1)   # exact answer 0.2
        >>> m["matched"], round(m["dose"], 2), m["steps"] <= 3
        (True, 0.2, True)
    """
    if not (math.isfinite(target) and target >= 0 and start >= 0):
        raise ValueError(f"match_dose: need a finite target >= 0 and a start dose >= 0, got {target}, {start}")
    if target == 0 or start == 0:
        return _result(0.0, 0.0, target, start, True, [], None)
    max_dose = 10.0 * start if max_dose is None else max_dose
    lo_ok, hi_ok = math.log1p(-min(tol, 0.999)), math.log1p(tol)
    log_t = math.log(target)
    trace: list[list[float]] = []
    below: float | None = None  # largest log-dose seen with KL under the target
    above: float | None = None  # smallest log-dose seen with KL over the target (or non-finite)
    pts: list[tuple[float, float]] = []  # (log dose, log KL - log target) with finite KL

    def miss(kl: float) -> float:
        return math.log(kl) - log_t if math.isfinite(kl) and kl > 0 else (-math.inf if kl == 0 else math.inf)

    first = start if first is None else min(first, max_dose)
    x = math.log(first)
    x_max = math.log(max_dose)
    reason = None
    for _ in range(max_steps):
        dose = first if not trace else max_dose if x >= x_max else math.exp(x)  # exact at the ends
        kl = float(kl_at(dose))
        trace.append([dose, kl])
        f = miss(kl)
        if lo_ok <= f <= hi_ok:
            return _result(dose, kl, target, start, True, trace, None)
        if f < 0:
            below = x if below is None else max(below, x)
        else:
            above = x if above is None else min(above, x)
        if math.isfinite(f):
            pts.append((x, f))
        if f < 0 and x >= x_max - 1e-12:
            reason = (f"the control's KL at the dose bound {max_dose:.4g} ({kl:.4g}) is below the persona's "
                      f"{target:.4g}: it cannot be matched inside the bound")
            break
        # next point: slope-2 step, then secant of the last two finite points
        if len(pts) >= 2 and pts[-1][1] != pts[-2][1]:
            (x1, f1), (x2, f2) = pts[-2], pts[-1]
            nxt = x2 - f2 * (x2 - x1) / (f2 - f1)
        elif math.isfinite(f):
            nxt = x - f / 2.0
        else:
            nxt = x - math.log(2.0)
        if below is not None and above is not None and not (below < nxt < above):
            nxt = (below + above) / 2
        x = min(nxt, x_max)
    if reason is None:
        reason = f"no dose within {tol:.0%} of the persona's KL {target:.4g} after {len(trace)} evaluations"
    best = min(trace, key=lambda t: abs(miss(t[1])))
    return _result(best[0], best[1], target, start, False, trace, reason)


def _result(dose, kl, target, start, matched, trace, reason) -> dict:
    return {"dose": dose, "kl": kl, "target_kl": target, "start": start, "ratio": dose / start if start else 1.0,
            "matched": matched, "steps": len(trace), "trace": trace, "reason": reason}


def control_seeds(seed: int, n: int) -> list[int]:
    """``n`` distinct seeds for the band's rotations, stable per stage seed."""
    return [zlib.crc32(f"{seed}/control/{i}".encode()) & 0x7FFFFFFF for i in range(n)]


def control_name(i: int) -> str:
    """Stage name of the band's i-th control (``random_00`` ...)."""
    return f"random_{i:02d}"


def is_control_name(condition: str) -> bool:
    """True for the band's members (``random_NN``); the band summary is plain ``random``."""
    return condition.startswith("random_") and condition[7:].isdigit()


class KLMatcher:
    """Matches controls to one persona vector at one dose on one model (as it is when called).

    The unsteered reference and the persona's KL are computed on first use and kept, so a band
    of controls costs one reference pass, one persona pass and a few passes per control.
    Call it with the same adapters active as the condition the controls are evaluated in.

    Args:
        vector, dose: the persona vector and the round's dose.
        prompts: :func:`kl_prompts`.
        tol, max_ratio: :func:`match_dose`'s ``tol``, and its bound as a multiple of ``dose``.
        positions, halflife, gate, gate_kind: the steering spec of generation (:func:`steerheal_utils.vector.steer`).
    """

    def __init__(self, model: nn.Module, tok, vector: SteeringVector, dose: float, prompts: Sequence[list[int]], *,
                 tol: float = 0.1, max_ratio: float = 10.0, positions: str = "all", halflife: int = 0,
                 batch_size: int = 16, gate: float | None = None, gate_kind: str = "threshold"):
        self.model, self.tok, self.vector, self.dose, self.prompts = model, tok, vector, float(dose), prompts
        self.tol, self.max_ratio = tol, max_ratio
        self.kw = dict(positions=positions, halflife=halflife, batch_size=batch_size, gate=gate, gate_kind=gate_kind)
        self._ref: torch.Tensor | None = None
        self._target: float | None = None
        self._ratios: list[float] = []  # matched dose / persona dose of the controls so far

    def kl(self, vector: SteeringVector | None, dose: float) -> float:
        if self._ref is None:
            self._ref = tag_logprobs(self.model, self.tok, self.prompts, self.kw["batch_size"])
        return tag_kl(self.model, self.tok, self.prompts, vector, dose, ref=self._ref, **self.kw)

    @property
    def target(self) -> float:
        """The persona vector's tag KL at its dose."""
        if self._target is None:
            self._target = self.kl(self.vector, self.dose)
            if not math.isfinite(self._target):
                raise FloatingPointError(f"the persona vector's tag KL at dose {self.dose} is not finite: "
                                         "its logits are NaN or inf")
        return self._target

    def match(self, control: SteeringVector) -> dict:
        """:func:`match_dose` for one control vector, starting at the geometric mean of the dose
        ratios the earlier controls needed (rotations of one vector need similar doses)."""
        first = self.dose * math.exp(sum(map(math.log, self._ratios)) / len(self._ratios)) if self._ratios else None
        m = match_dose(lambda d: self.kl(control, d), self.target, self.dose, tol=self.tol,
                       max_dose=self.max_ratio * self.dose, first=first)
        if m["matched"] and m["ratio"] > 0:
            self._ratios.append(m["ratio"])
        return m


def match_band(model: nn.Module, tok, vector: SteeringVector, dose: float, seeds: Sequence[int], *,
               prompts: Sequence[list[int]], **kw) -> tuple[float, list[tuple[SteeringVector, dict]]]:
    """The persona's tag KL at ``dose`` and, per seed, a rotated control with its KL-matched dose.

    Keyword arguments are :class:`KLMatcher`'s. Returns ``(persona_kl, [(control, match + "seed"), ...])``.
    """
    m = KLMatcher(model, tok, vector, dose, prompts, **kw)
    out = []
    for s in seeds:
        ctl = vector.rotated(s)
        out.append((ctl, {**m.match(ctl), "seed": int(s)}))
    return m.target, out
