"""04_heal: train this round's adapter on the kept completions and write it.

Writes ``adapter`` (a peft folder, this round's adapter only), ``heal_summary`` (heal config,
tau, lam_r and the training summary) and ``heal_steps`` (per-step telemetry). Nothing is written
when training raises (e.g. FloatingPointError on a NaN loss).
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from torch import nn

from ..adapters import adapter_name
from ..config import section_keys
from ..contract import artifact
from ..kl import AGGREGATES
from ..runfolder import atomic_dir, atomic_write_json, atomic_write_text
from .data import kept_rows
from .train import HealResult, train

HEAL_KEYS = section_keys("heal")  # heal.json "config"; what the eval's fingerprint leaves out


def save_adapter(model: nn.Module, name: str, path: Path | str) -> Path:
    """Write only adapter ``name`` as a peft folder (safetensors) at ``path``, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp, tempfile.TemporaryDirectory(dir=path.parent, prefix=".save.", suffix=".tmp") as scratch:
        # save_embedding_layers=False: we never adapt embeddings, and "auto" would look the base model up on the hub
        model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
        src = Path(scratch) / name if (Path(scratch) / name).is_dir() else Path(scratch)  # peft nests non-default names
        for f in src.iterdir():
            if f.is_file():
                shutil.move(str(f), tmp / f.name)
    return path


def steps_csv(steps: Sequence[dict]) -> str:
    cols = ["step", "epoch", "loss", "nll", "D", *[f"D_{h}" for h in AGGREGATES], "barrier", "hinge_frac", "tau",
            "lr", "grad_norm", "tokens", "seconds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for s in steps:
        w.writerow(s)
    return buf.getvalue()


def heal(model: nn.Module, tok, rows: Sequence[dict], cfg, rnd: int, out_dir: Path | str, *, seed: int = 0,
         progress: bool = True) -> tuple[nn.Module, HealResult]:
    """Train, then write ``adapter/``, ``heal.json`` and ``heal_steps.csv`` into ``out_dir``.

    Nothing is written when training raises (e.g. FloatingPointError on a NaN loss).
    """
    out_dir = Path(out_dir)
    model, res = train(model, tok, rows, cfg, rnd, seed=seed, progress=progress)
    save_adapter(model, res.new, out_dir / artifact("adapter").file)
    atomic_write_text(out_dir / artifact("heal_steps").file, steps_csv(res.steps))
    last = res.steps[-1] if res.steps else {}
    first = res.steps[0] if res.steps else {}
    atomic_write_json(out_dir / artifact("heal_summary").file, {
        "round": rnd, "adapter": res.new, "baked": [adapter_name(i) for i in range(rnd)],
        "tau_used": res.tau, "tau_mode": cfg.tau_mode, "tau_info": res.tau_info, "lam_r": res.lam_r,
        "config": {k: getattr(cfg, k) for k in HEAL_KEYS},
        "summary": {"rows": res.n_rows, "skipped": res.n_skipped, "steps": len(res.steps), "seconds": res.seconds,
                    "nll_first": first.get("nll"), "nll_last": last.get("nll"),
                    "D_last": {h: last.get(f"D_{h}") for h in AGGREGATES},
                    "hinge_frac_mean": sum(s["hinge_frac"] for s in res.steps) / max(1, len(res.steps))},
    })
    return model, res


def run_stage(ctx) -> HealResult:
    """04_heal: train this round's adapter on the kept completions of ``completions`` and save it.

    The student is ``ctx.student()`` unmerged: the base stays recoverable for the KL reference.
    The result carries the trained model (``result.model``, ``result.tok``) for Q1 and the plots.
    """
    rows = kept_rows(ctx.artifact("completions"))
    if not rows:
        raise ValueError(f"{ctx.artifact('completions')} has no kept rows: nothing to heal on (see 03_filter)")
    model, tok = ctx.student()
    model, res = heal(model, tok, rows, ctx.cfg, ctx.round, ctx.out_dir, seed=ctx.seed)
    res.model, res.tok = model, tok
    return res
