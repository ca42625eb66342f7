"""Helpers several test files share (imported as ``from helpers import ...``; no test module imports another)."""

from __future__ import annotations

from pathlib import Path

import torch

from steerheal_utils import vector as V
from steerheal_utils.models import get_layers


def hook_count(model) -> int:
    """Forward hooks on the decoder layers (0 when every steering context has cleaned up)."""
    return sum(len(b._forward_hooks) for b in get_layers(model))


def random_vector(model, layers=(1, 2), seed: int = 0, norm: float = 5.0) -> V.SteeringVector:
    """A seeded random SteeringVector for ``model`` on ``layers``, every layer's residual norm ``norm``."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    return V.SteeringVector({i: torch.randn(d, generator=g) for i in layers}, {i: norm for i in layers})


def tiny_eval_round(run: Path, overrides: dict, dose: float = 0.5):
    """A run folder at round 0 with just what 05_eval reads besides the model: a vector extracted from
    ``tiny:llama`` (seed 0) and 02's dose. Returns ``(cfg, ctx, model, tok, sv)``; call
    ``evaluate.run_stage(ctx)`` to evaluate it."""
    from steerheal_utils import config as C
    from steerheal_utils.driver import init_run
    from steerheal_utils.models import tiny_model
    from steerheal_utils.runfolder import atomic_write_json
    from steerheal_utils.stage import open_stage

    cfg = C.resolve("tiny", overrides)
    init_run(run, cfg)
    ctx = open_stage("05_eval", {"run_dir": str(run), "round": 0})
    model, tok = tiny_model("llama", seed=0)
    sv, _ = V.extract_vector(model, tok, ["hello", "write a poem"], cfg.pos_persona, cfg.neg_persona, [1, 2])
    sv.save(ctx.path("vector.safetensors"))
    atomic_write_json(ctx.path("generate.json"), {"dose": dose})
    return cfg, ctx, model, tok, sv
