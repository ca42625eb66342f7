"""What every stage notebook does first: validate its parameters, read the run's config,
seed everything, and know where its files go.

A stage notebook starts with a cell tagged ``parameters``::

    run_dir = "runs/dev"   # the run folder (config.yaml is read from there)
    round = 0              # which round

then calls ``ctx = open_stage("02_generate", globals())``. Papermill injects parameters as
plain variables; ``open_stage`` checks them exactly like the config: a name that is neither
``run_dir``, ``round``, ``preset``, ``replace`` nor a config key, a wrong type or an
out-of-range value raises before any model loads. The driver passes only ``run_dir`` and
``round``.

Where a stage writes (``ctx.mode``):

- ``driver``: run by ``steerheal run``: the round folder (the lab journal);
- ``explore``: run by hand on a step that has a record: a scratch folder
  ``round_NN/explore/<hash>/`` (the hash names the config keys set in the parameters cell). It reads its inputs from that folder when an earlier step explored with the same
  keys wrote them there, else from the journal. The journal is never touched;
- ``journal``: run by hand on a step that has no record yet (the driver runs it again anyway);
- ``replace``: ``replace = True`` in the parameters cell: the journal copy is replaced; the
  step's record is removed first, and sealed again when a cell finishes with every declared
  output rewritten (in a Jupyter kernel), so every step built on the old outputs is redone by
  the next ``steerheal run``.

A run folder that does not exist is an error (a typo must not start a new run), unless
``preset`` is given: then it is created from that preset. Hand runs in a Jupyter kernel need
``PYTHONHASHSEED=0`` (as the driver's kernels have), or set iteration orders would differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import config as C
from . import contract, markers
from .models import load_base, load_round_model
from .runfolder import atomic_write_json, clear_done, round_config, round_dir, run_lock, safe_child

NOTEBOOK_PARAMS = ("run_dir", "round", "preset", "replace")
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
DRIVER_ENV = "STEERHEAL_DRIVER_STAGE"  # set by the driver for the kernel of the stage it runs

_CURRENT: "StageContext | None" = None


def driver_token(run_dir: Path | str, rnd: int, stage: str) -> str:
    return f"{Path(run_dir).resolve()}|{rnd}|{stage}"


def current() -> "StageContext | None":
    """The context the last :func:`open_stage` in this process returned."""
    return _CURRENT


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
    mode: str = "journal"  # driver | journal | explore | replace (see the module docstring)
    explore_dir: Path | None = None
    _models: dict = field(default_factory=dict, repr=False)  # what student() and base() loaded

    @property
    def round_dir(self) -> Path:
        """The journal's round folder (inputs live here; outputs too unless exploring)."""
        return round_dir(self.run_dir, self.round)

    @property
    def out_dir(self) -> Path:
        """Where this execution writes: the round folder, or the scratch folder when exploring."""
        return self.explore_dir if self.mode == "explore" else self.round_dir

    def path(self, name: str) -> Path:
        """``out_dir/name``; a name that would lead outside it is refused."""
        return safe_child(self.out_dir, name)

    def artifact(self, name: str, round: int | None = None) -> Path:
        """The file of artifact ``name`` (of this round, or of ``round``) as the contract declares it.

        Raises ContractError when this step declares neither writing nor reading it. Exploring,
        outputs go to the scratch folder and inputs come from there when an earlier explored
        step wrote them.

        Example:
            >>> rows = read_jsonl(ctx.artifact("completions"))          # doctest: +SKIP
            >>> first = SteeringVector.load(ctx.artifact("vector", 0))  # doctest: +SKIP
        """
        rnd = self.round if round is None else round
        how = contract.allowed(self.stage, self.round, name, rnd)
        if self.mode == "explore" and rnd == self.round:
            scratch = self.explore_dir / contract.artifact(name).file
            if how == "write" or scratch.exists():
                return scratch
        return contract.path(self.run_dir, rnd, name)

    def student(self, *, merge: bool = False):
        """``(model, tokenizer)`` at this round: the base with earlier rounds' adapters baked in
        (:func:`models.load_round_model`), loaded once per context and ``merge`` value.

        ``merge=True`` merges them into the weights where that is exact (inference: 01, 02);
        unmerged (04) the base stays recoverable for the KL reference.
        """
        key = ("student", merge)
        if key not in self._models:
            self._models[key] = load_round_model(self.cfg, self.run_dir, self.round, merge=merge)
        return self._models[key]

    def base(self):
        """``(model, tokenizer)``: the base model, no adapters (:func:`models.load_base`), loaded once.

        In round 0 an inference student (``student(merge=True)``) has no adapters: it is the base
        and is returned instead of a second copy.
        """
        if self.round == 0 and ("student", True) in self._models:
            return self._models[("student", True)]
        if "base" not in self._models:
            self._models["base"] = load_base(self.cfg)
        return self._models["base"]


def _in_kernel() -> bool:
    ip = sys.modules.get("IPython")
    get = getattr(ip, "get_ipython", None) if ip else None
    shell = get() if get else None
    return shell is not None and hasattr(shell, "kernel")


def open_stage(stage: str, namespace: dict[str, Any]) -> StageContext:
    """Validate notebook parameters, load the run config for the round, seed, and return the context."""
    global _CURRENT
    if stage not in contract.STEPS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(contract.STEPS)}")
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
    replace = params.get("replace", False)
    if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
        raise C.ConfigError(f"run_dir: expected a folder path, got {run_dir!r}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= contract.MAX_ROUND:
        raise C.ConfigError(f"round: expected an integer in 0..{contract.MAX_ROUND}, got {rnd!r}")
    if not isinstance(replace, bool):
        raise C.ConfigError(f"replace: expected true or false, got {replace!r}")
    run_dir = Path(run_dir).expanduser().absolute()
    overrides = {k: v for k, v in params.items() if k in fields}
    driver = os.environ.get(DRIVER_ENV) == driver_token(run_dir, rnd, stage)
    if not driver and _in_kernel() and os.environ.get("PYTHONHASHSEED") != "0":
        raise C.ConfigError("this Jupyter kernel was started without PYTHONHASHSEED=0, so it would not repeat what "
                            "`steerheal run` computes: start JupyterLab as `PYTHONHASHSEED=0 jupyter lab notebooks/` "
                            "and run the notebook again")
    cfg = _round_config(run_dir, rnd, params, overrides)
    C.check_files(cfg)
    mode, explore_dir = _mode(stage, run_dir, rnd, driver, replace, overrides)
    _plotly_renderer()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed = stage_seed(cfg.seed, rnd, stage)
    seed_everything(seed)
    ctx = StageContext(stage, cfg, run_dir, rnd, seed, overrides, mode, explore_dir)
    ctx.round_dir.mkdir(parents=True, exist_ok=True)
    if explore_dir is not None:
        atomic_write_json(explore_dir / "explore.json", {"overrides": overrides, "last_stage": stage,
                                                         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"{stage} round {rnd:02d}: run by hand on a finished step: writing to "
              f"{explore_dir} (the run folder's own files are not touched; replace=True replaces them)",
              file=sys.stderr)
    if mode == "replace":
        _seal_when_done(ctx)
    _CURRENT = ctx
    return ctx


def _round_config(run_dir: Path, rnd: int, params: dict, overrides: dict) -> C.Config:
    if run_dir.exists() and not run_dir.is_dir():
        raise C.ConfigError(f"run_dir: {run_dir} is a file, not a run folder")
    if not contract.run_path(run_dir, "config").exists() and not contract.run_path(run_dir, "config_history").exists():
        if "preset" not in params:
            where = f"{run_dir} does not exist" if not run_dir.exists() else f"{run_dir} has no config.yaml"
            raise C.ConfigError(f"run_dir: {where} (a relative run_dir is resolved against {Path.cwd()}). Give an "
                                "existing run folder, or set preset = 'tiny' / 'default' / ... in the parameters "
                                "cell to start a new one there")
        from .driver import init_run

        cfg = C.resolve(params["preset"], overrides)
        init_run(run_dir, cfg)
        return cfg
    cfg = round_config(run_dir, rnd)
    return C.validate({**cfg.to_dict(), **overrides}) if overrides else cfg


def _mode(stage: str, run_dir: Path, rnd: int, driver: bool, replace: bool, overrides: dict) -> tuple[str, Path | None]:
    if driver:
        return "driver", None
    has_record = contract.marker_path(run_dir, rnd, stage).exists()
    if replace:
        if overrides:
            raise C.ConfigError(f"replace=True takes no config keys (got {', '.join(overrides)}): the journal holds "
                                "what the run's config makes. Change the run's config with `steerheal run ... "
                                "--set KEY=VALUE --override-config`, or explore without replace")
        _require_no_driver(run_dir)
        return "replace", None
    if has_record:
        tag = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
        return "explore", round_dir(run_dir, rnd) / contract.EXPLORE_DIR / tag
    _require_no_driver(run_dir)
    return "journal", None


def _require_no_driver(run_dir: Path) -> None:
    """Refuse to write the journal while a `steerheal run` works in the folder."""
    with run_lock(run_dir):
        pass


def _seal_when_done(ctx: StageContext) -> None:
    """replace=True: remove the step's record now; seal it again after the first cell that ends
    (successfully) with every declared output rewritten since open_stage."""
    clear_done(ctx.run_dir, ctx.round, ctx.stage)
    before = markers.input_snapshot(ctx.run_dir, ctx.round, ctx.stage, ctx.cfg)
    t0 = time.time()
    outs = [contract.path(ctx.run_dir, ctx.round, n) for n in contract.step(ctx.stage).writes
            if contract.artifact(n).kind != "cache"]
    print(f"{ctx.stage} round {ctx.round:02d}: replace=True: this run replaces the journal's files; its record is "
          "written when every output has been rewritten, and `steerheal run` redoes what was built on them",
          file=sys.stderr)
    if not _in_kernel():
        return
    shell = sys.modules["IPython"].get_ipython()

    def check(result=None) -> None:
        if result is not None and not result.success:
            return
        if all(p.exists() and p.stat().st_mtime >= t0 for p in outs):
            shell.events.unregister("post_run_cell", check)
            markers.seal(ctx.run_dir, ctx.round, ctx.stage, ctx.cfg, inputs_before=before, by="hand (replace=True)")
            print(f"{ctx.stage} round {ctx.round:02d}: every output rewritten: recorded as the journal's copy",
                  file=sys.stderr)

    shell.events.register("post_run_cell", check)


def _plotly_renderer() -> None:
    """Store figures as plotly JSON in executed notebooks (JupyterLab renders it offline), with a
    static copy (PNG, or HTML for tables: see figstatic) for readers without a kernel.

    Embedding plotly.js in every figure would make each executed notebook several MB; the
    run's report.html carries the library once. STEERHEAL_PLOTLY_RENDERER overrides.
    """
    try:
        import plotly.io as pio
    except ImportError:
        return
    from .figstatic import register

    pio.renderers.default = os.environ.get("STEERHEAL_PLOTLY_RENDERER", register())
