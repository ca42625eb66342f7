"""The loop driver: execute the stage notebooks with papermill, round after round.

``steerheal run --preset P --rounds N --run-dir DIR [--set key=value ...]``

- Each stage notebook is executed into ``DIR/round_NN/<stage>.ipynb`` with only
  ``run_dir`` and ``round`` as parameters; the config comes from the run folder's config
  history (:func:`runfolder.round_config`).
- After a stage's notebook succeeded, its record ``round_NN/.done/<stage>.json`` is sealed
  (:func:`markers.seal`: hashes of what it read and wrote, the config it used). Re-running
  the same command skips every stage whose record holds; a stage whose record does not hold
  (an output missing or changed, an input or the config changed since) is run again, and
  the run says why.
- A different config for an existing run folder is refused unless ``--override-config``,
  which appends it to ``config_history.jsonl``, applying from the first round not finished.
- The notebooks run in a kernel that is this very Python interpreter.

Failure model: a stage's artifacts are written atomically by the stage, and its record only
after its notebook succeeded, so a run killed at any point (even SIGKILL) resumes at the
interrupted stage. One driver per run folder (a lock); leftovers of interrupted writes are
removed on start. The model and the files the config names are checked before the first
stage, so a typo costs seconds, not a kernel start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from . import config as C
from . import contract, markers
from .runfolder import (STAGES, RunFolderError, atomic_write_json, clean_temp_files, latest_config, read_json,
                        record_config, run_lock)

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


def check_run_dir(run_dir: Path | str) -> Path:
    """``run_dir`` as a Path; a ConfigError (one line) when it names something that is not a folder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise C.ConfigError(f"--run-dir {run_dir} is a file, not a run folder: give a folder (new or existing)")
    return run_dir


def _model_identity(name: str) -> dict:
    """The base model's id and revision (not only its cache path): see export.model_identity."""
    from .export import model_identity

    return model_identity(name)


def init_run(run_dir: Path | str, cfg: C.Config, *, override: bool = False) -> None:
    """Create ``run_dir/config.yaml`` and its history, or check that an existing run has ``cfg``.

    With ``override``, a different ``cfg`` is appended to ``config_history.jsonl``, applying from
    the first round that is not finished (finished rounds keep the config they were made with).
    """
    run_dir = check_run_dir(run_dir)
    cfg_path = contract.run_path(run_dir, "config")
    try:
        old = latest_config(run_dir)
    except C.ConfigError:  # an emptied or damaged config.yaml
        if not override:
            raise
        old = None
    if old is None and not cfg_path.exists():  # a new run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        record_config(run_dir, cfg, 0, {**provenance(), "model": _model_identity(cfg.model)})
        return
    problems = []
    try:
        on_disk = C.load_config(cfg_path)
    except C.ConfigError as e:
        on_disk, problems = None, [str(e)]
    if old is not None and on_disk is not None and C.config_diff(old, on_disk):
        problems = [f"{cfg_path} differs from the last entry of config_history.jsonl (edited by hand?): "
                    + "; ".join(C.config_diff(old, on_disk))]
    diff = C.config_diff(old, cfg) if old is not None else []
    if not override:
        if problems:
            raise C.ConfigError(problems[0] + ". Pass --override-config to record the config given on the command "
                                "line (it applies from the first round not finished).")
        if diff:
            raise C.ConfigError(
                f"{run_dir} was started with a different config:\n  " + "\n  ".join(diff) +
                "\nUse another --run-dir, repeat the original settings, or pass --override-config "
                "to continue this run with the new ones (finished rounds keep theirs; the change is recorded "
                "in config_history.jsonl).")
        return
    if not diff and not problems:
        return
    start = markers.first_incomplete_round(run_dir)  # under the configs the rounds were made with
    record_config(run_dir, cfg, start, {**provenance(), "model": _model_identity(cfg.model)}, diff or ["config.yaml written again"])
    print(f"config changed from round {start:02d} on ({'; '.join(diff) or 'config.yaml written again'}); "
          "recorded in config_history.jsonl", file=sys.stderr)


# ------------------------------------------------------------------ kernel
def kernel_name() -> str:
    """A kernelspec for this interpreter, made visible to papermill through JUPYTER_PATH."""
    from .embedded import cache_root

    tag = hashlib.sha256(sys.executable.encode()).hexdigest()[:10]
    name = f"steerheal-{tag}"
    base = cache_root() / "jupyter"
    spec = base / "kernels" / name / "kernel.json"
    want = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=CRITICAL"],  # no kernel-side noise (e.g. on Ctrl-C): cell errors reach the notebook
            "display_name": f"steerheal ({sys.executable})", "language": "python",
            # A fixed hash seed: set and dict-of-str iteration orders are then the same in
            # every kernel, so a resumed run repeats exactly what an uninterrupted one does.
            "env": {"PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0"}}
    try:
        same = json.loads(spec.read_text()) == want
    except (OSError, ValueError):  # missing, or damaged: written again
        same = False
    if not same:
        atomic_write_json(spec, want)
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(base) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(base), paths) if p)
    return name


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

    from .stage import DRIVER_ENV, driver_token

    contract.step(stage)  # an unknown name is refused before anything runs
    src = notebook_dir() / f"{stage}.ipynb"
    out = contract.journal_path(run_dir, rnd, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The kernel inherits this: open_stage then knows the driver runs it (journal, not scratch).
    os.environ[DRIVER_ENV] = driver_token(run_dir, rnd, stage)
    try:
        pm.execute_notebook(str(src), str(out), parameters={"run_dir": str(run_dir.resolve()), "round": rnd},
                            kernel_name=kernel, language="python", progress_bar=False, log_output=False, cwd=str(REPO_ROOT),
                            # no widget state in the journal: readers without a kernel then see each widget's
                            # static copy (figstatic.WithStatic), not a blank view that needs a CDN
                            store_widget_state=False)
    except pm.PapermillExecutionError as e:
        raise LoopError(_failure(rnd, stage, out, e.ename, e.evalue, e.exec_count)) from None
    except (OSError, KeyboardInterrupt):
        raise  # writing the executed notebook failed (a full disk), or Ctrl-C: the CLI says so
    except Exception as e:  # the kernel died or did not start: not a cell error, still a failed stage
        raise LoopError(_failure(rnd, stage, out, type(e).__name__, str(e) or repr(e))) from None
    finally:
        os.environ.pop(DRIVER_ENV, None)


def stop_record(run_dir: Path) -> dict | None:
    p = contract.run_path(run_dir, "stop")
    return read_json(p, "stop record") if p.exists() else None


def _round_stop(run_dir: Path, chk: markers.Checker, rnd: int) -> dict | None:
    """The stop a round's eval asked for, if its record holds."""
    if not chk.status(rnd, "05_eval").holds:
        return None
    stop = read_json(contract.path(run_dir, rnd, "eval"), "eval results").get("stop")
    return {"round": rnd, **stop} if stop else None


def after_round(run_dir: Path, rnd: int) -> dict | None:
    """Rebuild metrics and report; return a stop record if the round asked the loop to stop.

    ``stop.json`` mirrors the eval: written when round ``rnd`` asks to stop, removed when a
    redone round no longer does.
    """
    from . import report

    report.write_metrics(run_dir)
    report.write_report(run_dir)
    rec = _round_stop(run_dir, markers.Checker(run_dir), rnd)
    if rec:
        atomic_write_json(contract.run_path(run_dir, "stop"), rec)
        return rec
    old = stop_record(run_dir)
    if old and old.get("round", 0) >= rnd:
        contract.run_path(run_dir, "stop").unlink()
    return None


def run_loop(run_dir: Path | str, cfg: C.Config, rounds: int, *, override: bool = False,
             stages: tuple[str, ...] | None = None) -> Path:
    """Run (or resume) ``rounds`` rounds of the loop in ``run_dir``.

    Raises ConfigError (bad rounds, changed config, a missing file the config names),
    ModelLoadError (before anything is written), RunFolderError (folder in use, corrupted
    files) or LoopError (a stage failed; its record is not written, so the same call
    resumes there).
    """
    from .models import check_model

    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise C.ConfigError(f"rounds: expected an integer in 1..{MAX_ROUNDS}, got {rounds!r}")
    run_dir = check_run_dir(run_dir)
    if stages is None:  # the steps of the config's loop (01-05, or 01, 06_online, 05)
        stages = contract.loop_stages(cfg.loop)
    if cfg.loop == "online":
        from .online import checkpoints

        if rounds > checkpoints(cfg):
            _say(f"loop=online: online_steps={cfg.online_steps} at online_every={cfg.online_every} makes "
                 f"{checkpoints(cfg)} checkpoints: running {checkpoints(cfg)} rounds, not {rounds}")
            rounds = checkpoints(cfg)
    C.check_files(cfg)
    check_model(cfg.model, trust_remote_code=cfg.trust_remote_code)  # before anything is written
    from .preflight import check

    check(cfg)  # the vignette file's rows, layers within the model's depth: before any stage runs
    with run_lock(run_dir):
        clean_temp_files(run_dir)
        init_run(run_dir, cfg, override=override)
        _loop(run_dir, rounds, stages)
    return run_dir


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loop(run_dir: Path, rounds: int, stages: tuple[str, ...]) -> None:
    kernel = kernel_name()
    present = [s for s in stages if (notebook_dir() / f"{s}.ipynb").exists()]
    from .progress import Ticker

    t0 = time.time()
    tick = Ticker(t0)
    try:
        _rounds(run_dir, rounds, present, kernel, tick)
    finally:
        tick.close()


def _rounds(run_dir: Path, rounds: int, present: list[str], kernel: str, tick) -> None:
    from .progress import stage_seconds

    chk = markers.Checker(run_dir)
    for rnd in range(rounds):
        stop = next((s for s in (_round_stop(run_dir, chk, r) for r in range(rnd)) if s), None)
        if stop:
            _say(f"the loop stopped after round {stop['round']:02d}: {stop.get('reason')}")
            break
        for stage in present:
            st = chk.status(rnd, stage)
            if st.state == "ok":
                continue
            if st.state == "legacy":
                try:
                    markers.adopt(run_dir, rnd, stage, chk.config(rnd))
                    _say(f"{st.label}: marker written by an older steerheal (no hashes): its files are recorded as "
                         "they are now (not verified)")
                    chk.forget()
                    continue
                except RunFolderError as e:
                    _say(f"{st.label}: marker written by an older steerheal, and {e}: running it again")
            elif st.state != "missing":
                _say(f"{st.label}: {st.reason}: running it again")
            cfg = chk.config(rnd)
            before = markers.input_snapshot(run_dir, rnd, stage, cfg)
            # rounds are named as their folders are (round_00), with the count
            tick.start(f"[round_{rnd:02d} ({rnd + 1} of {rounds})] {stage}", stage_seconds(run_dir, rnd, stage))
            t = time.time()
            try:
                run_stage(run_dir, rnd, stage, kernel)
                markers.seal(run_dir, rnd, stage, cfg, inputs_before=before, seconds=time.time() - t)
            except BaseException:
                tick.end("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "interrupted")
                raise
            chk.forget()
            tick.end("done")
            if stage == "02_generate":  # a dose at a bound, below target or diverged: say so here too
                from .generate.step import warn_dose

                warn_dose(run_dir, rnd)
        stop = after_round(run_dir, rnd)
        chk.forget()
        if stop:
            _say(f"stopping after round {rnd:02d}: {stop.get('reason')}")
            break
    left_out(run_dir, chk)


def left_out(run_dir: Path, chk: markers.Checker | None = None) -> list[markers.Status]:
    """Say which rounds are left out of metrics.csv and the report because a record of theirs
    no longer holds (a round merely not finished yet is not mentioned)."""
    chk = chk or markers.Checker(run_dir)
    out = []
    for r in chk.rounds():
        if chk.status(r, "05_eval").holds:
            continue
        bad = next((st for st in (chk.status(r, s) for s in chk.stages(r)) if st.state in ("broken", "stale")), None)
        if bad is not None:
            _say(f"round {r:02d} is left out of metrics.csv and the report: {bad.label}: {bad.reason} "
                 f"(`--rounds {r + 1}` redoes it)")
            out.append(bad)
    return out
