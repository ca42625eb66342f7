"""What every stage notebook does first: validate its parameters, read the run's config,
seed everything, and know where its files go.

A stage notebook starts with a cell tagged ``parameters``::

    run_dir = "runs/dev"   # the run folder (config.yaml is read from there)
    round = 0              # which round

then calls ``ctx = open_stage("02_generate", globals())``. Papermill injects parameters as
plain variables; ``open_stage`` checks them exactly like the config: a name that is neither
``run_dir``, ``round``, ``preset`` nor a config key, a wrong type or an out-of-range value
raises before any model loads. Config keys passed this way override the run's config for
this execution only (exploration); the driver passes only ``run_dir`` and ``round``.
"""

from __future__ import annotations

import os
import random
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as C
from .runfolder import STAGES, round_dir, safe_child

NOTEBOOK_PARAMS = ("run_dir", "round", "preset")
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def stage_seed(seed: int, rnd: int, stage: str) -> int:
    """A distinct, stable seed per (run seed, round, stage)."""
    return zlib.crc32(f"{seed}/{rnd}/{stage}".encode()) & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def notebook_params(namespace: dict[str, Any]) -> dict[str, Any]:
    """User variables of a notebook namespace: what the parameters cell and papermill set."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES
            and not isinstance(v, (types.ModuleType, type)) and not callable(v)}


@dataclass
class StageContext:
    """Everything a stage needs to know about where it runs."""

    stage: str
    cfg: C.Config
    run_dir: Path
    round: int
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def round_dir(self) -> Path:
        return round_dir(self.run_dir, self.round)

    def prev_round_dir(self) -> Path | None:
        return round_dir(self.run_dir, self.round - 1) if self.round > 0 else None

    def path(self, name: str) -> Path:
        """``round_NN/name``; a name that would lead outside the round folder is refused."""
        return safe_child(self.round_dir, name)

    def load_model(self, *, merge: bool = False):
        """The model at this round (earlier rounds' adapters baked in) and its tokenizer."""
        from .models import load_round_model

        return load_round_model(self.cfg, self.run_dir, self.round, merge=merge)


def open_stage(stage: str, namespace: dict[str, Any]) -> StageContext:
    """Validate notebook parameters, load (or create) the run config, seed, and return the context."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    params = notebook_params(namespace)
    fields = {f for f in C.Config.__dataclass_fields__}
    if any(isinstance(v, StageContext) for v in params.values()):
        # Re-run in an interactive session: the namespace also holds the notebook's own
        # variables (ctx, rows...). Injected names were checked on the first run.
        params = {k: v for k, v in params.items() if k in NOTEBOOK_PARAMS or k in fields}
    unknown = [k for k in params if k not in NOTEBOOK_PARAMS and k not in fields]
    if unknown:
        raise C.unknown_key_error(unknown[0])
    run_dir = params.get("run_dir")
    rnd = params.get("round", 0)
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        raise C.ConfigError(f"run_dir: expected a folder path, got {run_dir!r}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= 99:
        raise C.ConfigError(f"round: expected an integer in 0..99, got {rnd!r}")
    run_dir = Path(run_dir)
    overrides = {k: v for k, v in params.items() if k in fields}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists():
        cfg = C.load_config(cfg_path)
        if overrides:
            cfg = C.validate({**cfg.to_dict(), **overrides})
    else:  # a notebook opened on its own: start a run folder from a preset
        from .driver import init_run

        cfg = C.resolve(params.get("preset", "default"), overrides)
        init_run(run_dir, cfg)
    _plotly_renderer()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = stage_seed(cfg.seed, rnd, stage)
    seed_everything(seed)
    ctx = StageContext(stage, cfg, run_dir, rnd, seed, overrides)
    ctx.round_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def _plotly_renderer() -> None:
    """Store figures as plotly JSON in executed notebooks (JupyterLab renders it offline).

    Embedding plotly.js in every figure would make each executed notebook several MB; the
    run's report.html carries the library once. STEERHEAL_PLOTLY_RENDERER overrides.
    """
    try:
        import plotly.io as pio
    except ImportError:
        return
    pio.renderers.default = os.environ.get("STEERHEAL_PLOTLY_RENDERER", "plotly_mimetype")
