"""Reading the persona direction out of a model: hidden states at the assistant tag, mean difference.

Same user message under both personas, so ``v_L = mean(h_pos) - mean(h_neg)`` isolates the persona
axis; ``r_L`` (the dose unit) is the median residual norm over every prompt position.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn
from ..progress import tqdm  # a plain final line, not a frozen widget, in the journal

from .. import datafiles
from ..batching import left_pad
from ..chat import persona_system, prompt_ids
from ..models import get_layers, model_device
from .value import SteeringVector, persona_hash


def load_contexts(n: int | None = None, seed: int = 0) -> list[dict]:
    """The shipped neutral user messages; ``n`` of them, stratified over kinds by a seeded shuffle."""
    rows = datafiles.rows("contexts.jsonl")
    if n is None or n >= len(rows):
        return rows
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    return datafiles.stratified(dict(sorted(by_kind.items())), n, seed)


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states of the given decoder blocks; hooks removed on exit."""
    store: dict[int, torch.Tensor] = {}
    blocks = get_layers(model)
    handles = []

    def make(i):
        def hook(_mod, _inp, out):
            store[i] = out[0] if isinstance(out, tuple) else out
        return hook

    try:
        for i in layers:
            handles.append(blocks[i].register_forward_hook(make(i)))
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def last_token_states(model: nn.Module, tok, prompts: Sequence[list[int]], layers: Sequence[int],
                      batch_size: int = 16, progress: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Hidden state at the last prompt token for each layer, and the median residual norm per layer.

    Returns ``(states, resid_norms)``: ``states[L]`` is ``[n_prompts, d]`` float32 on CPU;
    ``resid_norms[L]`` is the median L2 norm over every real (non-pad) prompt position. The median,
    not the mean: a few attention-sink positions carry norms several times the typical one
    (SmolLM2: a mean of ~650 against ~140 at the assistant tag), and the dose unit should be the
    typical hidden state.
    """
    dev = model_device(model)
    states = {layer: [] for layer in layers}
    norms: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    order = list(range(len(prompts)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in tqdm(batches, desc="hidden states", disable=not progress, leave=False):
        ids, mask, pos = left_pad([prompts[i] for i in b], tok.pad_token_id, dev)
        with capture_layers(model, layers) as store:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        m = mask.bool()
        for layer in layers:
            h = store[layer].float()
            states[layer].append(h[:, -1].cpu())  # left padding: the assistant tag is last in every row
            norms[layer].append(h.norm(dim=-1)[m.to(h.device)].cpu())  # h is on its block's device
    out = {layer: torch.cat(v) for layer, v in states.items()}
    return out, {layer: float(torch.cat(norms[layer]).median()) for layer in layers}


def extract_vector(model: nn.Module, tok, user_messages: Sequence[str], pos_persona: str, neg_persona: str,
                   layers: Sequence[int], batch_size: int = 16, meta: dict | None = None,
                   progress: bool = False) -> tuple[SteeringVector, dict]:
    """Mean-difference steering vector at the assistant tag.

    Args:
        model, tok: the (possibly adapter-baked) model and its tokenizer.
        user_messages: neutral user turns, the same for both personas.
        pos_persona, neg_persona: persona descriptions ("someone who ...").
        layers: decoder block indices to read.

    Returns:
        ``(vector, details)`` where details holds per-context projections of pos and neg
        states onto the unit vector (``proj_pos``/``proj_neg``: layer -> list) for plots.
    """
    pos_sys, neg_sys = persona_system(pos_persona), persona_system(neg_persona)
    pos_ids = [prompt_ids(tok, u, pos_sys)[0] for u in user_messages]
    neg_ids = [prompt_ids(tok, u, neg_sys)[0] for u in user_messages]
    states, norms = last_token_states(model, tok, pos_ids + neg_ids, layers, batch_size, progress)
    n = len(user_messages)
    directions, proj_pos, proj_neg = {}, {}, {}
    for layer in layers:
        hp, hn = states[layer][:n], states[layer][n:]
        v = hp.mean(0) - hn.mean(0)
        directions[layer] = v
        unit = v / v.norm().clamp_min(1e-12)
        proj_pos[layer] = (hp @ unit).tolist()
        proj_neg[layer] = (hn @ unit).tolist()
    meta = {"n_contexts": n, "persona_hash": persona_hash(pos_persona, neg_persona),
            "pos_persona": pos_persona, "neg_persona": neg_persona, **(meta or {})}
    sv = SteeringVector(directions, norms, meta)
    if not all(torch.isfinite(v).all() for v in directions.values()):
        raise FloatingPointError("steering vector has NaN or inf entries: the model's hidden states are not finite")
    return sv, {"proj_pos": proj_pos, "proj_neg": proj_neg}


def separation(details: dict) -> dict[int, float]:
    """Per layer: gap between mean pos and neg projections, in pooled standard deviations."""
    out = {}
    for layer, pp in details["proj_pos"].items():
        p, n = torch.tensor(pp), torch.tensor(details["proj_neg"][layer])
        sd = torch.cat([p - p.mean(), n - n.mean()]).std().clamp_min(1e-12)
        out[layer] = float((p.mean() - n.mean()) / sd)
    return out
