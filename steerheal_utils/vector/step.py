"""01_vector: extract this round's vector from the current student and save it.

Writes ``vector`` (one tensor per steered layer; metadata: model, layers, persona pair hash,
round, number of contexts, residual norms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import n_layers
from .extract import extract_vector, load_contexts, separation
from .value import SteeringVector


@dataclass
class VectorResult:
    """What 01 computed: the vector, each context's pos/neg projections onto it (``proj_pos`` /
    ``proj_neg``: layer -> list, for plots), the contexts' ids and, from round 1 on, the per-layer
    cosine to round 0's vector."""

    vector: SteeringVector
    proj_pos: dict[int, list[float]] = field(default_factory=dict, repr=False)
    proj_neg: dict[int, list[float]] = field(default_factory=dict, repr=False)
    contexts: list[str] = field(default_factory=list, repr=False)
    cosine_to_round0: dict[int, float] | None = None

    def separation(self) -> dict[int, float]:
        """Per layer: the gap between mean pos and neg projections, in pooled standard deviations."""
        return separation({"proj_pos": self.proj_pos, "proj_neg": self.proj_neg})


def run_stage(ctx) -> VectorResult:
    """01_vector: read the vector from the student (``ctx.student(merge=True)``: inference only,
    earlier adapters merged where exact, as in 02) and write it."""
    model, tok = ctx.student(merge=True)
    cfg = ctx.cfg
    layers = cfg.steered_layers(n_layers(model))
    contexts = load_contexts(cfg.n_contexts, seed=cfg.seed)
    sv, details = extract_vector(model, tok, [c["text"] for c in contexts], cfg.pos_persona, cfg.neg_persona,
                                 layers, batch_size=cfg.batch_size, progress=True,
                                 meta={"model": cfg.model, "round": ctx.round, "layers": layers})
    sv.save(ctx.artifact("vector"))
    cosine = sv.cosine(SteeringVector.load(ctx.artifact("vector", 0))) if ctx.round > 0 else None
    return VectorResult(sv, details["proj_pos"], details["proj_neg"], [c["id"] for c in contexts], cosine)
