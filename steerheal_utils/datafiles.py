"""The files shipped in ``steerheal_utils/data/`` (see data/README.md), and stratified subsets of them.

The one place a shipped file is found: prompts (``dilemmas``, ``heldout``), the neutral
``contexts`` of 01, the filter's labelled set, the vignettes and the axis probe of 05, the
tokenizers of the tiny test models.

Example:
    >>> [r["id"] for r in rows("heldout.jsonl")][:1]
    ['heldout-ceo-logs']
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import torch


def path(*parts: str) -> Path:
    """``steerheal_utils/data/<parts>``: a shipped file or folder."""
    return Path(str(resources.files("steerheal_utils").joinpath("data", *parts)))


def rows(name: str) -> list[dict]:
    """The rows of a shipped JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def stratified(groups: Mapping[str, Sequence[dict]], n: int, seed: int) -> list[dict]:
    """``n`` rows drawn round-robin over ``groups`` (in the given order), each group shuffled by one
    seeded generator first (empty groups skipped), so that every group is represented.

    Example:
        >>> out = stratified({"a": [{"i": 0}, {"i": 1}], "b": [{"i": 2}]}, 2, seed=0)
        >>> sorted(r["i"] for r in out)[-1]
        2
    """
    g = torch.Generator().manual_seed(seed)
    shuffled = {k: [v[i] for i in torch.randperm(len(v), generator=g).tolist()] for k, v in groups.items() if v}
    n = min(n, sum(len(v) for v in shuffled.values()))
    out: list[dict] = []
    while len(out) < n:
        for k in shuffled:
            if shuffled[k] and len(out) < n:
                out.append(shuffled[k].pop())
    return out


PROMPT_SETS = ("dilemmas", "heldout")


def prompts(kind: str = "dilemmas") -> list[dict]:
    """The shipped training pool (``"dilemmas"``: what 02 steers) or held-out set (``"heldout"``:
    never trained on): rows of id, text, domain."""
    if kind not in PROMPT_SETS:
        raise ValueError(f"prompt set must be 'dilemmas' (training pool) or 'heldout', got {kind!r}")
    return rows(f"{kind}.jsonl")
