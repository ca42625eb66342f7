"""The statistics of the dose search: a monotone keep-rate curve over doses and where it meets a target.

Pure functions of counts (kept / sampled per dose): the isotonic fit, the binomial deviance and
its parametric-bootstrap monotonicity test, the log-dose crossing and its interval.
:func:`steerheal_utils.generate.dose.calibrate_dose` drives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# The search's fixed statistics (not knobs: they decide how loudly it warns, not what it computes).
MONOTONE_ALPHA = 0.01    # raw keep rates contradict a non-increasing curve when the test's p < this
N_BOOT = 1000            # parametric-bootstrap draws (monotonicity test and dose interval)
DOSE_CI = 0.90           # coverage of the chosen dose's bootstrap interval


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


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


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
