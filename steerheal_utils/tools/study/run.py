"""Running the study's grid: one sweep through an executor, in two passes (round 0 of each seed's
first arm, then every run after round 0 was shared).

Parallel: the study is one sweep (:mod:`..sweep`, runs named ``arm=<arm>,seed=<seed>``) run
through an executor (``--backend local``: ``--jobs`` processes on this machine, default one per
core; ``--backend slurm``: one Slurm job per run through submitit). Each run is an ordinary
``steerheal run`` process, each on one torch thread (``threads=1`` in every run's config, whatever
``--jobs`` is, so results do not depend on it). On 2 cores this gains less than one might hope:
prefill and training split well over threads anyway and decoding is bound by memory bandwidth,
so what overlaps is mostly the per-stage overhead (kernel start, imports, model load, Python-side
filter scoring). Measured in the study: a later round took ~360 s per process with two running,
against ~230 s for one process on two threads, i.e. ~1.27x the throughput.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ...runfolder import atomic_write_json
from .arms import ARMS, COMMON, SCALES, StudyError, arm_overrides, check_shareable, run_name, shared_stages
from .share import _share


def study_spec(arms: Sequence[str], seeds: Sequence[int], rounds: int, *, scale: str = "full",
               preset: str = "default", extra: dict[str, Any] | None = None):
    """The study as a sweep spec (:class:`.sweep.Spec`): a named axis ``arm`` (label -> its one
    override) times the config axis ``seed``, every run with the scale's reduction, ``COMMON`` and
    ``extra``. Its configs are exactly :func:`arm_config`'s.

    Example:
        >>> study_spec(["rmse", "nll"], [0, 1], 2, preset="tiny").grid
        {'arm': {'rmse': {'kl_agg': 'rmse'}, 'nll': {'reg': 'nll'}}, 'seed': [0, 1]}
    """
    from ..sweep import Spec

    for arm in arms:
        arm_overrides(arm, 0, scale, extra)  # one-line errors for an unknown arm / scale / a clashing --set
    return Spec(preset=preset, rounds=rounds, common={**SCALES[scale], **COMMON, **(extra or {})},
                grid={"arm": {a: dict(ARMS[a]) for a in arms}, "seed": [int(s) for s in seeds]})


def adopt_old_names(study_dir: Path, arms: Sequence[str], seeds: Sequence[int], log=print) -> None:
    """Rename run folders of a study made before it was a sweep (``rmse-s0``) to their sweep names
    (``arm=rmse,seed=0``), so that an old study resumes instead of starting again."""
    for arm in arms:
        for seed in seeds:
            old, new = study_dir / f"{arm}-s{seed}", study_dir / run_name(arm, seed)
            if old.is_dir() and not new.exists():
                os.replace(old, new)
                log(f"study: renamed {old.name} to {new.name} (the study's runs are now named like a sweep's)")


def run_study(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int], rounds: int, *,
              scale: str = "full", preset: str = "default", extra: dict[str, Any] | None = None,
              executor=None, retries: int = 1, log=print) -> dict[str, str]:
    """Run (or resume) every arm x seed as one sweep (:mod:`.sweep`) through ``executor``; returns
    ``{run name: error message}`` for runs that failed.

    ``executor`` is an :class:`.executors.Executor` (default: ``LocalExecutor`` with one job per CPU
    core): local processes, or Slurm jobs through submitit. Two passes of the same sweep: first
    each seed's first arm runs round 0 only; then its 01-03 files and the evals of its
    arm-independent models are copied into the other arms' round_00 (:func:`share_round0`,
    :func:`share_round0_evals`) and every run goes to ``rounds`` rounds. A failed job is started
    again up to ``retries`` times (it resumes); a run that still fails is recorded
    (``study_error.json``) and the others go on; re-running the command retries it.
    ``steerheal sweep status <study_dir>`` shows where each run stands.
    """
    from .. import sweep as S
    from ..executors import LocalExecutor

    study_dir = Path(study_dir)
    executor = executor or LocalExecutor(os.cpu_count() or 1)
    spec = study_spec(arms, seeds, rounds, scale=scale, preset=preset, extra=extra)
    runs = S.expand(spec)
    for seed in seeds:
        check_shareable([r.cfg for r in runs if r.cfg.seed == seed])
    adopt_old_names(study_dir, arms, seeds, log)
    S.init_runs(study_dir, spec, runs)  # refuses a folder started with another config, before anything runs

    errors: dict[str, str] = {}

    def failed(name: str, msg: str) -> None:
        errors[name] = msg
        _record_error(study_dir / name, msg)
        log(f"study: FAILED {msg}")

    def collect(outcomes) -> None:
        for name, o in outcomes.items():
            if o.ok:
                (study_dir / name / "study_error.json").unlink(missing_ok=True)
            else:
                failed(name, f"{name} {o.state}: {o.detail} after {o.attempts} attempt(s); last lines of {o.log}:\n"
                             + _tail(o.log))

    cfg_of = {r.name: r.cfg for r in runs}
    firsts = {seed: run_name(arms[0], seed) for seed in seeds}
    collect(S.run_sweep(study_dir, replace(spec, rounds=1), executor, retries=retries, say=log,
                        only=set(firsts.values())))
    go = set()
    for seed in seeds:
        first = firsts[seed]
        for arm in arms:
            name = run_name(arm, seed)
            if first in errors:
                if name != first:
                    failed(name, f"{name}: not run, round 0 of {first} (shared with it) failed")
                continue
            if arm != arms[0]:
                try:
                    _share(study_dir / first, study_dir / name, log, shared_stages(cfg_of[first], cfg_of[name]))
                except (StudyError, OSError) as e:  # e.g. an inconsistent round_00: this run only
                    failed(name, f"{name}: sharing round 0 failed: {e}")
                    continue
            go.add(name)
    collect(S.run_sweep(study_dir, spec, executor, retries=retries, say=log, only=go))
    return errors


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _record_error(run: Path, msg: str) -> None:
    atomic_write_json(run / "study_error.json", {"error": msg, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
