"""The loop driver: execute the stage notebooks with papermill, round after round.

``steerheal run --preset P --rounds N --run-dir DIR [--set key=value ...]``

- Each stage notebook is executed into ``DIR/round_NN/<stage>.ipynb`` with only
  ``run_dir`` and ``round`` as parameters; everything else comes from ``DIR/config.yaml``.
- A stage is marked done (``round_NN/.done/<stage>.json``) after its notebook succeeded;
  re-running the same command skips finished stages and resumes at the first unfinished one.
- A different config for an existing run folder is refused unless ``--override-config``.
- The notebooks run in a kernel that is this very Python interpreter.

Failure model: a stage's artifacts are written atomically by the stage, and its marker
only after its notebook succeeded, so a run killed at any point (even SIGKILL) resumes at
the interrupted stage. One driver per run folder (a lock); leftovers of interrupted
writes are removed on start; re-running a stage un-marks everything downstream of it.
The model is checked before the first stage, so a typo costs seconds, not a kernel start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import __version__
from . import config as C
from .runfolder import (STAGES, RunFolderError, atomic_write_json, clean_temp_files, invalidate_after, is_done,
                        mark_done, read_json, round_dir, run_lock)

MAX_ROUNDS = 100  # round folders are round_00 .. round_99

REPO_ROOT = Path(__file__).resolve().parent.parent


class LoopError(RuntimeError):
    """A stage failed; the message names the executed notebook and the cell's error."""


def notebook_dir() -> Path:
    return Path(os.environ.get("STEERHEAL_NOTEBOOKS", REPO_ROOT / "notebooks"))


# ------------------------------------------------------------------ provenance
def provenance() -> dict:
    """Versions and the git commit, saved with every run's config."""
    import importlib.metadata as md

    libs = {}
    for name in ("torch", "transformers", "peft", "papermill", "plotly", "safetensors"):
        try:
            libs[name] = md.version(name)
        except md.PackageNotFoundError:
            libs[name] = None
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"steerheal_version": __version__, "git_commit": commit, "python": platform.python_version(),
            "platform": platform.platform(), "libraries": libs, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def init_run(run_dir: Path | str, cfg: C.Config, *, override: bool = False) -> None:
    """Create ``run_dir/config.yaml``, or check that an existing one matches ``cfg``."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.exists():
        old = C.load_config(path)
        diff = C.config_diff(old, cfg)
        if diff and not override:
            raise C.ConfigError(
                f"{run_dir} was started with a different config:\n  " + "\n  ".join(diff) +
                "\nUse another --run-dir, repeat the original settings, or pass --override-config "
                "to continue this run with the new ones (finished stages are kept).")
        if not diff:
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save_config(cfg, path, provenance())


# ------------------------------------------------------------------ kernel
def kernel_name() -> str:
    """A kernelspec for this interpreter, made visible to papermill through JUPYTER_PATH."""
    from .embedded import cache_root

    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:10]
    name = f"steerheal-{tag}"
    base = cache_root() / "jupyter"
    spec = base / "kernels" / name / "kernel.json"
    want = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=ERROR"],
            "display_name": f"steerheal ({sys.executable})", "language": "python",
            # A fixed hash seed: set and dict-of-str iteration orders are then the same in
            # every kernel, so a resumed run repeats exactly what an uninterrupted one does.
            "env": {"PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0"}}
    if not spec.exists() or json.loads(spec.read_text()) != want:
        atomic_write_json(spec, want)
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(base) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(base), paths) if p)
    return name


# ------------------------------------------------------------------ progress
class Ticker:
    """One status line: rewritten in place on a terminal, printed at start and end otherwise."""

    def __init__(self, t0: float):
        self.t0, self.label, self._stop = t0, "", threading.Event()
        self.tty = sys.stderr.isatty()
        self._thread = None

    def start(self, label: str) -> None:
        self.label, self.t_stage = label, time.time()
        if self.tty:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        else:
            print(f"{label} ...", file=sys.stderr, flush=True)

    def _line(self) -> str:
        now = time.time()
        return f"{self.label}  {_fmt(now - self.t_stage)}  (run {_fmt(now - self.t0)})"

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            print("\r" + self._line(), end="", file=sys.stderr, flush=True)

    def end(self, status: str) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            print("\r" + " " * 80 + "\r", end="", file=sys.stderr)
        print(f"{self._line()}  {status}", file=sys.stderr, flush=True)


def _fmt(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


# ------------------------------------------------------------------ the loop
_HINTS = {  # what a stage's exception usually means, for the one-line summary
    "ConfigError": "a config value the stage cannot use",
    "ModelLoadError": "the model could not be loaded",
    "EmbeddedModelError": "the embedded model could not be prepared",
    "RunFolderError": "an artifact of an earlier stage or round is missing or corrupted",
    "FileNotFoundError": "an artifact of an earlier stage or round is missing",
    "FloatingPointError": "NaN or inf appeared (see README, 'When things go wrong')",
    "TooFewKept": "filter starvation: the filter kept fewer than min_train completions",
    "CalibrationError": "filter starvation: no dose tried kept enough completions",
    "DeadKernelError": "the notebook's kernel died (killed, or out of memory?)",
}


def _failure(rnd: int, stage: str, out: Path, ename: str, evalue: str, cell=None) -> str:
    lines = " ".join(str(evalue).strip().splitlines())[:2000]
    hint = _HINTS.get(ename)
    if "No space left on device" in lines or "Errno 28" in lines:
        hint = "the disk is full: free space and re-run"
    where = f"  executed notebook: {out}" + (f" (cell {cell})" if cell is not None else "")
    return (f"round {rnd:02d} {stage} failed: {ename}: {lines}\n" + (f"  ({hint})\n" if hint else "") + where +
            f"\n  finished stages are kept: fix the cause and re-run the same command to resume at round {rnd:02d} {stage}")


def run_stage(run_dir: Path, rnd: int, stage: str, kernel: str) -> None:
    """Execute one stage notebook into the round folder; raise LoopError on a failing cell."""
    import papermill as pm

    if stage not in STAGES:
        raise RunFolderError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    src = notebook_dir() / f"{stage}.ipynb"
    out = round_dir(run_dir, rnd) / f"{stage}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(src), str(out), parameters={"run_dir": str(run_dir.resolve()), "round": rnd},
                            kernel_name=kernel, language="python", progress_bar=False, log_output=False, cwd=str(REPO_ROOT))
    except pm.PapermillExecutionError as e:
        raise LoopError(_failure(rnd, stage, out, e.ename, e.evalue, e.exec_count)) from None
    except OSError:
        raise  # writing the executed notebook failed (a full disk): the CLI says so
    except Exception as e:  # the kernel died or did not start: not a cell error, still a failed stage
        raise LoopError(_failure(rnd, stage, out, type(e).__name__, str(e) or repr(e))) from None


def stop_record(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "stop.json"
    return read_json(p, "stop record") if p.exists() else None


def after_round(run_dir: Path, rnd: int) -> dict | None:
    """Rebuild metrics and report; return a stop record if the round asked the loop to stop."""
    try:
        from . import report
    except ImportError:  # the report module arrives with the eval stage
        return None
    report.write_metrics(run_dir)
    report.write_report(run_dir)
    eval_path = round_dir(run_dir, rnd) / "eval.json"
    if eval_path.exists():
        stop = read_json(eval_path, "eval results").get("stop")
        if stop:
            rec = {"round": rnd, **stop}
            atomic_write_json(Path(run_dir) / "stop.json", rec)
            return rec
    return None


def run_loop(run_dir: Path | str, cfg: C.Config, rounds: int, *, override: bool = False,
             stages: tuple[str, ...] = STAGES) -> Path:
    """Run (or resume) ``rounds`` rounds of the loop in ``run_dir``.

    Raises ConfigError (bad rounds, changed config), ModelLoadError (before anything is
    written), RunFolderError (folder in use, corrupted files) or LoopError (a stage failed;
    its marker is not written, so the same call resumes there).
    """
    from .models import check_model

    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise C.ConfigError(f"rounds: expected an integer in 1..{MAX_ROUNDS}, got {rounds!r}")
    run_dir = Path(run_dir)
    check_model(cfg.model, trust_remote_code=cfg.trust_remote_code)  # before anything is written
    with run_lock(run_dir):
        clean_temp_files(run_dir)
        init_run(run_dir, cfg, override=override)
        _loop(run_dir, rounds, stages)
    return run_dir


def _loop(run_dir: Path, rounds: int, stages: tuple[str, ...]) -> None:
    kernel = kernel_name()
    present = [s for s in stages if (notebook_dir() / f"{s}.ipynb").exists()]
    t0 = time.time()
    tick = Ticker(t0)
    for rnd in range(rounds):
        stop = stop_record(run_dir)
        if stop and stop.get("round", 0) < rnd:
            print(f"the loop stopped after round {stop['round']:02d}: {stop.get('reason')}", file=sys.stderr)
            break
        for stage in present:
            if is_done(run_dir, rnd, stage):
                continue
            invalidate_after(run_dir, rnd, stage)  # what was built on this stage's old output is stale
            tick.start(f"[round {rnd + 1}/{rounds}] {stage}")
            t = time.time()
            try:
                run_stage(run_dir, rnd, stage, kernel)
            except BaseException:
                tick.end("FAILED")
                raise
            mark_done(run_dir, rnd, stage, {"seconds": round(time.time() - t, 2)})
            tick.end("done")
            if stage == "02_generate":  # a dose at a bound, below target or diverged: say so here too
                from .generate import warn_dose

                warn_dose(round_dir(run_dir, rnd))
        stop = after_round(run_dir, rnd)
        if stop:
            print(f"stopping after round {rnd:02d}: {stop.get('reason')}", file=sys.stderr)
            break
