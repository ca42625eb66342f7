"""Uncertainty for the eval's numbers: paired bootstrap CIs, and where a value falls in a control band.

Every eval metric is a function of per-item data that 05 already stores: per vignette the
answer distribution ``p`` (7 foundations) and the answer mass of both frames (``eval_rows.jsonl``),
per probe item its log-odds (``axis_items``). The bootstrap resamples items, not models: it
asks how much a number would move with another draw of vignettes (or probe items) of the same
kind, with the model fixed. Vignettes and probe items are resampled separately (each metric
depends on one of them only).

*Paired*: one ``[B, n]`` index matrix per round (:func:`bootstrap_indices`) is used for every
model, so a delta ``condition - base`` is computed on the same resampled items for both models and
item-to-item variation that both share cancels. A later round pairs with round 0's base by
vignette id. Intervals are percentile intervals (``level`` = 0.95: the 2.5th and 97.5th
percentiles of the B resampled statistics).

Example:
    >>> idx = bootstrap_indices(4, 1000, seed=0)
    >>> ci = percentile_ci(probe_stats(torch.tensor([0.5, 0.5, 0.5, 0.5]), idx)["axis_logodds"])
    >>> ci
    (0.5, 0.5)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .evaluate.prompts import FOUNDATIONS
from .evaluate.prompts import NATS_KEYS as _NATS

NATS_KEYS = tuple(_NATS[f] for f in FOUNDATIONS)
VIGNETTE_METRICS = ("coherence", *NATS_KEYS, "on_diag_authority", "on_diag_care", "agreement")
PROBE_METRICS = ("axis_logodds", "axis_care_rate")
METRICS = (*VIGNETTE_METRICS, *PROBE_METRICS)
HEADLINE = ("axis_logodds", "care_nats", "auth_nats", "coherence")  # metrics read against the control band


# ------------------------------------------------------------------ resampling
def bootstrap_indices(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """``[n_boot, n]`` item indices drawn with replacement (seeded, CPU)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_indices: need n >= 1 and n_boot >= 1, got {n}, {n_boot}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (n_boot, n), generator=g)


def percentile_ci(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` [B]; NaN resamples (e.g. a subset with no
    Authority row) are left out; ``(nan, nan)`` when none is finite."""
    s = torch.as_tensor(samples, dtype=torch.float64).flatten()
    s = s[torch.isfinite(s)]
    if not len(s):
        return float("nan"), float("nan")
    a = (1 - level) / 2
    q = torch.quantile(s, torch.tensor([a, 1 - a], dtype=torch.float64))
    return float(q[0]), float(q[1])


# ------------------------------------------------------------------ the metrics as functions of resampled items
def vignette_arrays(rows: Sequence[Mapping], human_top: Mapping[str, int] | None = None) -> dict:
    """Tensors from per-row eval records (``id``, ``foundation_coarse``, ``p`` [7], ``mass`` [frames]).

    Args:
        human_top: vignette id -> index of the human majority foundation; rows without one get
            no agreement (NaN).

    Returns ``{"ids", "p" [n, 7], "mass" [n, frames], "coarse" [n] (foundation index), "hit" [n]
    (1.0 if argmax p is the human majority, NaN if unknown), "valid" [n] bool}``. A row the eval
    could not score (tiny-mfv's unscorable rows: ``p`` is None) keeps its place, so pairing by
    index still works, with ``valid`` False and NaN values; every statistic leaves it out, as the
    eval's own summary does.
    """
    if not rows:
        raise ValueError("vignette_arrays: no rows")
    nan7 = [float("nan")] * len(FOUNDATIONS)
    frames = next((len(r["mass"]) for r in rows if r.get("mass") is not None), 2)
    p = torch.tensor([r["p"] if r.get("p") is not None else nan7 for r in rows], dtype=torch.float64)
    mass = torch.tensor([[m if m is not None else float("nan") for m in r["mass"]] if r.get("mass") is not None
                         else [float("nan")] * frames for r in rows], dtype=torch.float64)
    valid = ~torch.isnan(p).any(-1)
    coarse = torch.tensor([FOUNDATIONS.index(r["foundation_coarse"]) for r in rows])
    top = p.nan_to_num(-1.0).argmax(-1)
    hit = torch.tensor([float(int(top[i]) == human_top[r["id"]]) if valid[i] and human_top and r["id"] in human_top
                        else float("nan") for i, r in enumerate(rows)], dtype=torch.float64)
    return {"ids": [r["id"] for r in rows], "p": p, "mass": mass, "coarse": coarse, "hit": hit, "valid": valid}


def _masked_mean(x: torch.Tensor, w: torch.Tensor, dim) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``w`` is 1 (NaN where no weight): unscorable rows drop out."""
    n = w.sum(dim)
    return torch.where(n > 0, (x.nan_to_num(0.0) * w).sum(dim) / n.clamp_min(1), torch.full_like(n, float("nan")))


def vignette_stats(arr: Mapping, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every vignette metric of :func:`steerheal_utils.evaluate.summarize`, per resample.

    Args:
        arr: from :func:`vignette_arrays` (``n`` rows).
        idx: ``[B, n]`` row indices (``torch.arange(n)[None]`` gives the point estimate).

    Returns metric -> ``[B]`` float64: coherence (mean mass), the seven ``*_nats`` (ln of the
    mean p), on-diagonal rates (mean p[F] over resampled rows of coarse foundation F; NaN if a
    resample has none), agreement.
    """
    p = arr["p"][idx]  # [B, n, 7]
    valid = arr.get("valid", torch.ones(len(arr["ids"]), dtype=torch.bool))[idx].double()  # [B, n]
    mass = arr["mass"][idx]  # [B, n, frames]
    out = {"coherence": _masked_mean(mass, valid[..., None].expand_as(mass), (1, 2))}
    profile = _masked_mean(p, valid[..., None].expand_as(p), 1)
    for j, key in enumerate(NATS_KEYS):
        out[key] = profile[:, j].clamp_min(1e-300).log()
    coarse = arr["coarse"][idx]
    for f, key in (("Authority", "on_diag_authority"), ("Care", "on_diag_care")):
        j = FOUNDATIONS.index(f)
        out[key] = _masked_mean(p[..., j], (coarse == j).double() * valid, 1)
    hit = arr["hit"][idx]
    known = (~torch.isnan(hit)).double()
    # all rows' humans known (the shipped set): NaN agreement only when some row's is unknown, as in summarize
    out["agreement"] = torch.where((known.sum(1) == valid.sum(1)), _masked_mean(hit, known, 1),
                                   torch.full_like(valid.sum(1), float("nan")))
    return out


def probe_stats(items: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """axis_logodds (mean per-item log-odds) and axis_care_rate (fraction > 0), per resample."""
    x = torch.as_tensor(items, dtype=torch.float64)[idx]
    return {"axis_logodds": x.mean(1), "axis_care_rate": (x > 0).double().mean(1)}


# ------------------------------------------------------------------ one round's conditions
def align(arr: Mapping, ids: Sequence[str]) -> dict | None:
    """``arr`` reordered to ``ids`` (None if the id sets differ: no pairing possible)."""
    pos = {i: k for k, i in enumerate(arr["ids"])}
    if len(ids) != len(pos) or any(i not in pos for i in ids):
        return None
    order = torch.tensor([pos[i] for i in ids])
    return {"ids": list(ids), **{k: arr[k][order] for k in ("p", "mass", "coarse", "hit", "valid") if k in arr}}


def condition_samples(arr: Mapping | None, items: Sequence[float] | None, vig_idx: torch.Tensor | None,
                  probe_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Bootstrap samples of every metric a condition has data for (vignettes and/or probe)."""
    out: dict[str, torch.Tensor] = {}
    if arr is not None and vig_idx is not None:
        out.update(vignette_stats(arr, vig_idx))
    if items is not None and len(items) and probe_idx is not None:
        out.update(probe_stats(torch.as_tensor(items, dtype=torch.float64), probe_idx))
    return out


def uncertainty(samples: Mapping[str, torch.Tensor], point: Mapping[str, float], base_samples: Mapping[str, torch.Tensor] | None = None,
                base_point: Mapping[str, float] | None = None, level: float = 0.95) -> dict:
    """``{"ci": {m: [lo, hi]}, "delta_vs_base": {m: {"delta", "lo", "hi"}}}`` from paired samples.

    ``point`` gives the reported values (the condition's summary); the delta is ``point - base_point``
    and its interval comes from the per-resample differences of the two models on the same items.
    """
    ci = {m: list(percentile_ci(s, level)) for m, s in samples.items()}
    out: dict = {"ci": ci}
    if base_samples is not None and base_point is not None:
        delta = {}
        for m, s in samples.items():
            if m in base_samples and _finite(point.get(m)) and _finite(base_point.get(m)):
                lo, hi = percentile_ci(s - base_samples[m], level)
                delta[m] = {"delta": float(point[m]) - float(base_point[m]), "lo": lo, "hi": hi}
        out["delta_vs_base"] = delta
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def excludes_zero(lo: float | None, hi: float | None) -> bool:
    """True when a (finite) interval lies wholly above or below 0: a difference one may call a difference."""
    return _finite(lo) and _finite(hi) and (lo > 0 or hi < 0)


# ------------------------------------------------------------------ the control band
def band_position(value: float, band: Sequence[float]) -> dict:
    """Where ``value`` falls in a null band of control values.

    Returns ``{"value", "n", "mean", "sd" (ddof=1), "min", "max", "z" ((value - mean) / sd; None
    if undefined), "rank" (fraction of the band below the value, ties counting half)}``. With K
    controls the rank moves in steps of 1/K: 1.0 means above every control, which for K = 8 is
    what chance gives 1 time in 9.

    Example:
        >>> band_position(5.0, [1.0, 2.0, 3.0])["rank"], band_position(2.0, [1.0, 2.0, 3.0])["z"]
        (1.0, 0.0)
    """
    b = [float(x) for x in band if _finite(x)]
    if not _finite(value) or not b:
        return {"value": value, "n": len(b), "mean": None, "sd": None, "min": None, "max": None, "z": None, "rank": None}
    n = len(b)
    mean = sum(b) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in b) / (n - 1)) if n > 1 else None
    z = (value - mean) / sd if sd else None
    rank = (sum(x < value for x in b) + 0.5 * sum(x == value for x in b)) / n
    return {"value": float(value), "n": n, "mean": mean, "sd": sd, "min": min(b), "max": max(b), "z": z, "rank": rank}


def mean_over_seeds(samples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Bootstrap samples of the mean over seeds: the per-resample mean of each seed's samples.

    Paired when the seeds' samples came from the same index matrix over the same items (the
    shared item draw then moves every seed at once, as it would with another vignette set);
    otherwise each seed's own draw stands for its own items. Metrics missing in any seed are left out.
    """
    if not samples:
        return {}
    keys = set(samples[0]).intersection(*samples[1:])
    return {k: torch.stack([s[k] for s in samples]).mean(0) for k in keys}
