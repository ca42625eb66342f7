"""Token ids in, padded batches out; the ids that end a turn.

Left padding everywhere a batch is run as one forward (the prompts' last tokens line up in the
last column), with position ids that count real tokens only, so a padded row sees the same
positions as it would alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Left-pad token lists; return ``input_ids, attention_mask, position_ids``.

    Position ids count real tokens only, so a padded row sees the same positions as it
    would alone (HF's plain forward otherwise numbers the padding too).
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return ids, mask, pos


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding), longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def eos_ids(model: nn.Module, tok) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the generation config's (Gemma has two).

    Sampling stops at them, greedy decoding cuts at them, the think path suppresses them.
    """
    ids = set()
    gen = getattr(model, "generation_config", None)
    for e in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        if e is None:
            continue
        ids.update(e if isinstance(e, (list, tuple)) else [e])
    if not ids:
        raise ValueError("the tokenizer and the generation config define no EOS token: completions would never end")
    return sorted(ids)
