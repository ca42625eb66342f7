"""What 05 evaluates, per condition (base, prompted, steered, random_NN, healed): the dose, the
fingerprint that says whether a saved result still holds, and the eval's code version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
import transformers

from .. import axis, datafiles
from ..embedded import sha256
from ..heal.step import HEAL_KEYS
from ..runfolder import read_cached, read_json
from . import prompts
from .data import PROBE, VIGNETTES
from .prompts import EvalError


def condition_dose(ctx) -> float | None:
    """The dose 02 calibrated this round (round_NN/generate.json "dose"), else cfg.dose; None if 02 has not run
    or sampled with the persona prompt and no vector (``data_source: prompt``, and no ``dose`` set)."""
    p = ctx.artifact("generate_summary")
    if p.exists():
        dose = read_json(p, "02_generate record").get("dose")
        if dose is not None:
            return float(dose)
        if ctx.cfg.dose is None and read_json(p, "02_generate record").get("data_source") != "prompt":
            raise EvalError(f"{p} has no 'dose' and the config's dose is null: cannot evaluate the steered model. "
                            "Re-run 02_generate or set dose=<value>.")
    return ctx.cfg.dose


# What decides how a model is scored, besides the config, the model and the condition's inputs: the
# prompt text and answer labels (read from evaluate.prompts at call time, so a changed constant counts),
# the source of the scoring code and the data it reads.
PROMPT_CONSTANTS = ("FOUNDATIONS", "GLOSSES", "LABELS", "FRAMES", "VIGNETTE_INSTRUCTION", "VIGNETTE_PREFILL",
                    "THINK_OPEN", "THINK_CLOSE", "THINK_NUDGE", "PROBE_INSTRUCTION", "PROBE_PREFILL", "PROBE_LABELS",
                    "PROTOCOLS")
# the eval, the steering hooks and vector, model loading, prompt rendering and batching (paths in the package)
CODE_FILES = ("evaluate", "vector", "models.py", "adapters.py", "chat.py", "batching.py")
DATA_FILES = (VIGNETTES, PROBE, "tokenizers")


def _hash_path(path: Path) -> str | dict[str, str]:
    """sha256 of a file, or of each file in a folder (by relative name; a code folder: its ``.py`` files)."""
    if path.is_dir():
        files = path.rglob("*.py") if any(path.glob("*.py")) else path.rglob("*")
        return {str(f.relative_to(path)): sha256(f) for f in sorted(files) if f.is_file()}
    return sha256(path)


def eval_code_version() -> str:
    """sha256 over how the eval scores: prompt constants, the scoring code, its data, torch/transformers versions.

    Part of :func:`condition_fingerprint`, so a saved condition's result computed by other code (a fixed
    prompt, another protocol, a changed steering hook) is recomputed instead of served stale.
    Any edit to the listed source files counts, also one that changes no number: the safe side.
    """
    pkg = Path(__file__).parent.parent
    doc = {"constants": {k: getattr(prompts, k) for k in PROMPT_CONSTANTS},
           "code": {name: _hash_path(pkg / name) for name in CODE_FILES},
           "data": {name: _hash_path(datafiles.path(name)) for name in DATA_FILES},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=list).encode()).hexdigest()


# config keys that change what 02 samples but not a model 05 evaluates (that model is the adapters, vector,
# dose and system prompt, all in the fingerprint): the prompt-distillation arm shares round 0's base eval
NOT_EVAL_KEYS = ("data_source",)


def condition_fingerprint(cfg, seed: int, name: str, adapters: Sequence[Path], vector: Path | None,
                      dose: float | None, system: str | None) -> str:
    """sha256 over everything one condition's eval reads: the config outside the heal keys, the
    seed, the active adapters' files, the vector file, the dose, the system prompt, the vignette
    file's contents and the eval's code version (:func:`eval_code_version`).

    Two evaluations with the same fingerprint compute the same thing, so a finished condition's
    result can be reused: after a crash inside 05, and by the study, whose arms share round 0's
    base, controls and steered model (they differ only in heal keys and in the adapter).
    """
    doc = {"schema": 3, "condition": name, "seed": seed, "dose": dose if vector is not None else None, "system": system,
           "config": {k: v for k, v in cfg.to_dict().items() if k not in HEAL_KEYS and k not in NOT_EVAL_KEYS},
           "vector": sha256(vector) if vector is not None else None,
           "adapters": [{f.name: sha256(f) for f in sorted(Path(d).iterdir()) if f.is_file()} for d in adapters],
           "vignette_file": sha256(Path(cfg.vignettes)) if cfg.vignettes and Path(cfg.vignettes).is_file() else None,
           # a probe file other than the shipped default (which eval_code_version hashes)
           **({"probe_file": sha256(probe)} if cfg.axis_probe and (probe := axis.probe_path(cfg.axis_probe)).is_file() else {}),
           "code": eval_code_version()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def cached_condition(path: Path, fingerprint: str) -> dict | None:
    """The saved result at ``path`` when its fingerprint matches; None otherwise (or unreadable)."""
    return read_cached(path, fingerprint, ("summary", "rows"))
