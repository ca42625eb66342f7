"""Steering modes: how much of the vector a position gets besides dose, positions and half-life.

- ``constant``: the dose as given (with ``dose_halflife`` decay when set): what 02 always did.
- ``cosine_gate``: the vector is added only where the hidden state is not already aligned with it.
  ``gate_kind="threshold"`` adds it where ``cos(h, v_L) < cos_gate`` and nothing elsewhere;
  ``gate_kind="scale"`` multiplies it by ``clip(1 - cos(h, v_L), 0, 1)`` (so it never adds more
  than the constant mode, and nothing at all to a state already pointing along ``v_L``).
  The gate reads the block's output before the add, per position and per row, so it applies
  identically in 02's sampling and in every forward of 05's steered condition. It depends on the
  hidden state, so unlike a constant add it cannot be folded exactly into a weight (bias) change.
- ``backtrack``: a constant dose while sampling, but a row whose per-token
  KL(steered || unsteered) spikes above ``backtrack_kl`` is rewound ``backtrack_k`` tokens and
  replayed at ``backtrack_factor`` times its dose (:mod:`steerheal_utils.generate.backtrack`).
  05 scores forced answers (nothing is sampled to rewind), so its steered condition applies
  backtrack's constant dose.
"""

from __future__ import annotations

from typing import Any

import torch

MODES = ("constant", "backtrack", "cosine_gate")
GATE_KINDS = ("threshold", "scale")


def gate_factor(h: torch.Tensor, v: torch.Tensor, threshold: float, kind: str = "threshold") -> torch.Tensor:
    """Per-position multiplier of the added vector under the cosine gate.

    Args:
        h: hidden states ``[..., d]`` (the block's output before the add).
        v: the layer's vector ``[d]`` (its direction is what counts).
        threshold: ``kind="threshold"``: add where ``cos(h, v) < threshold``; unused for ``"scale"``.
        kind: ``"threshold"`` (0 or 1) or ``"scale"`` (``clip(1 - cos, 0, 1)``).

    Returns:
        float32 multipliers of shape ``h.shape[:-1]``.

    Example:
        >>> v = torch.tensor([1.0, 0.0])
        >>> gate_factor(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), v, 0.5).tolist()
        [0.0, 1.0, 1.0]
        >>> [round(x, 4) for x in gate_factor(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), v, 0.0, "scale").tolist()]
        [0.0, 0.2929]
    """
    if kind not in GATE_KINDS:
        raise ValueError(f"gate kind must be one of {GATE_KINDS}, got {kind!r}")
    cos = torch.nn.functional.cosine_similarity(h.float(), v.float().to(h.device).expand_as(h), dim=-1)
    if kind == "threshold":
        return (cos < threshold).to(torch.float32)
    return (1.0 - cos).clamp(0.0, 1.0)


def spec_kwargs(cfg) -> dict[str, Any]:
    """The :class:`~steerheal_utils.vector.steering.Steering` keywords (beyond vector and dose) of a config:
    positions, half-life and, in ``cosine_gate`` mode, the gate. 02 and 05 both build their spec from this."""
    gate = cfg.cos_gate if cfg.steer_mode == "cosine_gate" else None
    return dict(positions=cfg.steer_positions, halflife=cfg.dose_halflife, gate=gate, gate_kind=cfg.gate_kind)


def backtrack_kwargs(cfg) -> dict[str, Any] | None:
    """:func:`steerheal_utils.generate.backtrack.sample_backtrack`'s knobs, or None outside ``backtrack`` mode."""
    if cfg.steer_mode != "backtrack":
        return None
    return dict(threshold=cfg.backtrack_kl, k=cfg.backtrack_k, factor=cfg.backtrack_factor,
                max_backoffs=cfg.backtrack_max)
