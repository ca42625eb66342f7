"""The eval's pure maths: answer log-probs -> per-foundation scores, the round's summary, the
probe's log-odds, the human majority per vignette. No model, no I/O."""

from __future__ import annotations

from typing import Sequence

import math

import torch

from .prompts import FOUNDATIONS, HUMAN_COLS, NATS_KEYS, EvalError

# ------------------------------------------------------------------ pure scoring maths
def score_logprobs(lp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row scores from answer log-probs.

    Args:
        lp: ``[rows, frames, 7]`` natural-log probabilities of each foundation's label
            (foundation order, already mapped back from the frame's slot order).

    Returns:
        ``score`` [rows, 7] (mean over frames), ``p`` [rows, 7] (softmax of score),
        ``mass`` [rows, frames] (total probability on the 7 labels).

    Example:
        >>> import math
        >>> lp = torch.log(torch.tensor([[[0.5, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]]]))
        >>> out = score_logprobs(lp)
        >>> round(float(out["mass"][0, 0]), 6), round(float(out["p"][0, 0]), 6)
        (1.0, 0.5)
    """
    lp = torch.as_tensor(lp, dtype=torch.float64)
    if lp.ndim != 3 or lp.shape[-1] != len(FOUNDATIONS):
        raise EvalError(f"expected log-probs of shape [rows, frames, {len(FOUNDATIONS)}], got {tuple(lp.shape)}")
    if not torch.isfinite(lp).all():
        raise FloatingPointError("answer log-probs contain NaN or inf: the model's logits are not finite")
    score = lp.mean(1)
    return {"score": score, "p": torch.softmax(score, -1), "mass": lp.exp().sum(-1)}


def summarize(lp: torch.Tensor, coarse: Sequence[str], human: torch.Tensor | None = None) -> dict:
    """Run-level metrics from ``[rows, frames, 7]`` answer log-probs.

    Args:
        lp: see :func:`score_logprobs`.
        coarse: each row's ``foundation_coarse``.
        human: optional ``[rows, 7]`` human percentages (foundation order) for agreement.

    Returns:
        coherence, profile (foundation -> mean p), the seven ``*_nats``, on-diagonal rates
        (mean p[Authority] on Authority rows, p[Care] on Care rows; NaN if no such rows),
        agreement (fraction of rows whose argmax p is the human majority; NaN without human).
    """
    s = score_logprobs(lp)
    p = s["p"]
    profile = p.mean(0)
    out: dict = {"coherence": float(s["mass"].mean()), "profile": dict(zip(FOUNDATIONS, profile.tolist()))}
    for f, key in NATS_KEYS.items():
        out[key] = math.log(max(float(profile[FOUNDATIONS.index(f)]), 1e-300))
    for f, key in (("Authority", "on_diag_authority"), ("Care", "on_diag_care")):
        rows = [i for i, c in enumerate(coarse) if c == f]
        out[key] = float(p[rows, FOUNDATIONS.index(f)].mean()) if rows else float("nan")
    if human is not None:
        out["agreement"] = float((p.argmax(-1) == torch.as_tensor(human).argmax(-1)).double().mean())
    else:
        out["agreement"] = float("nan")
    out["n_rows"] = int(lp.shape[0])
    return out


def probe_logodds(lp: torch.Tensor) -> dict:
    """On-axis probe score from ``[items, orders, 2]`` log-probs of (care, authority) labels.

    Returns ``axis_logodds`` (mean over items and orders of log p(care) - log p(authority)),
    per-item log-odds, ``axis_care_rate`` (fraction of items whose mean log-odds is > 0) and
    ``axis_mass`` (mean probability on the two labels).
    """
    lp = torch.as_tensor(lp, dtype=torch.float64)
    if not torch.isfinite(lp).all():
        raise FloatingPointError("probe log-probs contain NaN or inf")
    per_item = (lp[..., 0] - lp[..., 1]).mean(1)
    return {"axis_logodds": float(per_item.mean()), "axis_care_rate": float((per_item > 0).double().mean()),
            "axis_mass": float(lp.exp().sum(-1).mean()), "axis_items": per_item.tolist()}



def human_majority(rows: Sequence[dict]) -> dict[str, int]:
    """Vignette id -> foundation index of the human majority (the ``human_*`` percentages)."""
    return {r["id"]: max(range(len(FOUNDATIONS)), key=lambda j: float(r[HUMAN_COLS[FOUNDATIONS[j]]])) for r in rows}
