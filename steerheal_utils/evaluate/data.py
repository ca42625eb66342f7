"""The eval's data: the vignettes (shipped classic set or a user file, tiny-mfv schema), the
on-axis probe items, the held-out prompts."""

from __future__ import annotations

import json

from pathlib import Path

from .. import datafiles
from .prompts import FOUNDATIONS, HUMAN_COLS, EvalError


VIGNETTES = "mfv_classic_other_violate.jsonl"  # the shipped classic set (132 vignettes)
PROBE = "axis_probe.jsonl"


def load_vignettes(path: Path | str | None = None, max_rows: int = 0, seed: int = 0) -> list[dict]:
    """Vignette rows with the tiny-mfv schema (see data/README.md); the shipped classic set by default.

    ``max_rows`` > 0 takes a stratified subset (round-robin over foundations after a seeded
    shuffle): the files are sorted by foundation, so "the first N" would be all Care.
    """
    path = Path(path) if path else datafiles.path(VIGNETTES)
    if not path.is_file():
        raise EvalError(f"vignette file {path} does not exist (give a JSONL file with the tiny-mfv schema)")
    rows = []
    need = ("id", "foundation_coarse", "text", *HUMAN_COLS.values())
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path} line {n} is not JSON: {e}") from None
        missing = [k for k in need if k not in r]
        if missing:
            raise EvalError(f"{path} line {n}: missing fields {missing}; the schema is id, foundation_coarse, text, "
                            f"{', '.join(HUMAN_COLS.values())} (see steerheal_utils/data/README.md)")
        if r["foundation_coarse"] not in FOUNDATIONS:
            raise EvalError(f"{path} line {n}: foundation_coarse {r['foundation_coarse']!r} is not one of {FOUNDATIONS}")
        rows.append(r)
    if not rows:
        raise EvalError(f"{path} has no rows")
    if max_rows and max_rows < len(rows):
        by_f = {f: [r for r in rows if r["foundation_coarse"] == f] for f in FOUNDATIONS}
        out = datafiles.stratified(by_f, max_rows, seed)
        rows = sorted(out, key=lambda r: (FOUNDATIONS.index(r["foundation_coarse"]), r["id"]))
    return rows


def load_probe(max_items: int = 0) -> list[dict]:
    """The shipped on-axis probe items (id, situation, care_option, authority_option)."""
    rows = datafiles.rows(PROBE)
    return rows[:max_items] if max_items else rows


def load_heldout() -> list[dict]:
    """Held-out prompts (never trained on) for the outputs-over-loop table and KL to base."""
    return datafiles.prompts("heldout")
