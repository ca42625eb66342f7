"""KL divergence between next-token distributions, and its per-sequence aggregates.

The one place a KL is computed: heal's barrier (per completion position, aggregated per
sequence), the eval's KL of the healed model to base on the held-out answers, and the controls'
next-token KL at the assistant tag all call :func:`kl`.

Two tables, each also the ``choices`` of its config knob (``config.py`` imports them):

- :data:`DIRECTIONS` (``kl_dir``): ``reverse`` = KL(p || q), ``forward`` = KL(q || p);
- :data:`AGGREGATES` (``kl_agg``): how a sequence's per-position KLs become one number.

Adding an aggregate is one function and one entry in :data:`AGGREGATES`; the config accepts
its name, heal logs it (``D_<name>`` in heal_steps.csv) and the barrier can use it.

This module does not import torch (it only calls tensor methods), so the config can read the
tables without loading torch (``tests/test_config.py`` checks it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ------------------------------------------------------------------ KL between two distributions
def reverse(logp: "torch.Tensor", logq: "torch.Tensor") -> "torch.Tensor":
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last dim, from log-probabilities.

    Example:
        >>> import torch
        >>> p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.9, 0.1]).log()
        >>> round(float(reverse(p, q)), 4)
        0.5108
    """
    return (logp.exp() * (logp - logq)).sum(-1)


def forward(logp: "torch.Tensor", logq: "torch.Tensor") -> "torch.Tensor":
    """``KL(q || p)``: the reverse KL with the roles swapped."""
    return reverse(logq, logp)


DIRECTIONS: dict[str, Callable] = {"reverse": reverse, "forward": forward}
"""``kl_dir`` -> function of (student log-probs, reference log-probs)."""


def kl(logp: "torch.Tensor", logq: "torch.Tensor", direction: str = "reverse") -> "torch.Tensor":
    """Per-row KL between two log-distributions over the last dim (see :data:`DIRECTIONS`).

    Args:
        logp, logq: ``[..., V]`` log-probabilities (the model, the reference).
        direction: a key of :data:`DIRECTIONS`.

    Returns ``[...]``, not clamped (rounding can give -1e-7; heal clamps at 0).
    """
    try:
        return DIRECTIONS[direction](logp, logq)
    except KeyError:
        raise ValueError(f"kl_dir must be one of {', '.join(DIRECTIONS)}, got {direction!r}") from None


# ------------------------------------------------------------------ per-sequence aggregates
# Each takes kl [batch, seq] (float32), mask [batch, seq] (bool, True at counted positions) and
# n [batch] (counted positions per row); a row without counted positions gives 0.
def _mean(k, m, n):
    return k.where(m, 0.0).sum(-1) / n.clamp_min(1).to(k.dtype)


def _rmse(k, m, n):
    ms = (k * k).where(m, 0.0).sum(-1) / n.clamp_min(1).to(k.dtype)
    return ms.clamp_min(1e-30).sqrt() * (n > 0)  # clamp: finite gradient at exactly 0


def _max(k, m, n):
    return k.where(m, -math.inf).amax(-1).where(n > 0, 0.0)


def _p95(k, m, n):
    # Masked positions sort to the end (+inf); the valid ones are the first n of each row.
    srt = k.where(m, math.inf).sort(-1).values
    pos = 0.95 * (n - 1).clamp_min(0).to(k.dtype)
    lo, hi = pos.floor().long(), pos.ceil().long()
    v_lo = srt.gather(-1, lo[:, None]).squeeze(-1)
    v_hi = srt.gather(-1, hi[:, None]).squeeze(-1)
    return (v_lo + (pos - lo.to(k.dtype)) * (v_hi - v_lo)).where(n > 0, 0.0)


AGGREGATES: dict[str, Callable] = {"mean": _mean, "rmse": _rmse, "p95": _p95, "max": _max}
"""``kl_agg`` -> aggregate: ``mean``; ``rmse`` = sqrt(mean kl^2); ``p95`` = the 95th percentile with
linear interpolation (as ``torch.quantile``); ``max``."""


def aggregate_kl(kl: "torch.Tensor", mask: "torch.Tensor", how: str = "rmse") -> "torch.Tensor":
    """Aggregate per-position KL into one number per sequence, over its masked positions only.

    Args:
        kl: ``[batch, seq]`` per-position KL (any float dtype; computed in float32).
        mask: ``[batch, seq]`` bool/0-1, True at completion positions.
        how: a key of :data:`AGGREGATES`.

    Returns ``[batch]`` float32; 0 for a row without masked positions. Differentiable.

    Example: a 4-token loop in a 60-token completion, KL 0 except 2, 4, 6, 8 at the loop, gives
    mean 0.33 < rmse 1.41 < p95 2.1 < max 8: the spikes dominate every aggregate but the mean.
    """
    if kl.shape != mask.shape or kl.dim() != 2:
        raise ValueError(f"kl and mask must both be [batch, seq], got {tuple(kl.shape)} and {tuple(mask.shape)}")
    if how not in AGGREGATES:
        raise ValueError(f"kl_agg must be one of {', '.join(AGGREGATES)}, got {how!r}")
    m = mask.bool()
    return AGGREGATES[how](kl.float(), m, m.sum(-1))
