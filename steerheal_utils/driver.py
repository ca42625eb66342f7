"""The loop driver: execute the stage notebooks with papermill, round after round.

``steerheal run --preset P --rounds N --run-dir DIR [--set key=value ...]``

- Each stage notebook is executed into ``DIR/round_NN/<stage>.ipynb`` with only
  ``run_dir`` and ``round`` as parameters; everything else comes from ``DIR/config.yaml``.
- A stage is marked done (``round_NN/.done/<stage>.json``) after its notebook succeeded;
  re-running the same command skips finished stages and resumes at the first unfinished one.
- A different config for an existing run folder is refused unless ``--override-config``.
- The notebooks run in a kernel that is this very Python interpreter.
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
from .runfolder import STAGES, atomic_write_json, is_done, mark_done, round_dir

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
    want = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"steerheal ({sys.executable})", "language": "python",
            "env": {"PYTHONUNBUFFERED": "1"}}
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
def run_stage(run_dir: Path, rnd: int, stage: str, kernel: str) -> None:
    """Execute one stage notebook into the round folder; raise LoopError on a failing cell."""
    import papermill as pm

    src = notebook_dir() / f"{stage}.ipynb"
    out = round_dir(run_dir, rnd) / f"{stage}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(src), str(out), parameters={"run_dir": str(run_dir.resolve()), "round": rnd},
                            kernel_name=kernel, language="python", progress_bar=False, log_output=False, cwd=str(REPO_ROOT))
    except pm.PapermillExecutionError as e:
        evalue = str(e.evalue).strip().splitlines()
        raise LoopError(f"round {rnd:02d} {stage} failed: {e.ename}: {' '.join(evalue)[:2000]}\n"
                        f"  executed notebook: {out} (cell {e.exec_count})") from None


def stop_record(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "stop.json"
    return json.loads(p.read_text()) if p.exists() else None


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
        stop = json.loads(eval_path.read_text()).get("stop")
        if stop:
            rec = {"round": rnd, **stop}
            atomic_write_json(Path(run_dir) / "stop.json", rec)
            return rec
    return None


def run_loop(run_dir: Path | str, cfg: C.Config, rounds: int, *, override: bool = False,
             stages: tuple[str, ...] = STAGES) -> Path:
    """Run (or resume) ``rounds`` rounds of the loop in ``run_dir``."""
    run_dir = Path(run_dir)
    init_run(run_dir, cfg, override=override)
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
            tick.start(f"[round {rnd + 1}/{rounds}] {stage}")
            t = time.time()
            try:
                run_stage(run_dir, rnd, stage, kernel)
            except BaseException:
                tick.end("FAILED")
                raise
            mark_done(run_dir, rnd, stage, {"seconds": round(time.time() - t, 2)})
            tick.end("done")
        stop = after_round(run_dir, rnd)
        if stop:
            print(f"stopping after round {rnd:02d}: {stop.get('reason')}", file=sys.stderr)
            break
    return run_dir
