"""The matched-controls study (issue #7): does the KL aggregate matter, across seeds?

``python -m steerheal_utils study`` runs, then summarises, a grid of loop runs on the embedded
model: arms ``rmse`` (kl_agg=rmse), ``mean`` (kl_agg=mean) and ``nll`` (reg=nll, no barrier),
each for every seed, ``--rounds`` rounds, preset ``default``. Every arm gets the same config
apart from its one override: same reference (kl_ref), lam, data budget, and the same tau
*setting*: ``tau_mode=quantile`` for all (tau = the ``tau_quantile`` quantile of the
per-sequence D measured after the LR warm-up). An absolute tau is not comparable across
aggregates (brief section 1: the mean of a loop is ~4x smaller than its rmse), so a fixed
tau=0.5 would let the barrier bite for one aggregate and not the other; a calibrated tau
makes it bite on the same fraction of rows in both.

Work shared between arms: round 0's 01_vector, 02_generate and 03_filter read only the base
model, the seed and config keys outside the heal section, which are equal across arms (checked:
:func:`check_shareable`). They run once per seed, in the first arm; their files and done markers
are copied into the other arms' ``round_00`` before those run (``shared_from.json`` lists what
was copied, with sha256). tests/test_study.py checks that a copied round is byte-identical to
one computed in its own run. Round 0's evals of the base, the controls (prompted, random vector)
and the steered model do not involve the arm's adapter either: 05_eval saves each model's result
with a fingerprint of its inputs (``evaluate.condition_fingerprint``), the study copies those of the
first arm, and the other arms' 05_eval reads them back because the fingerprints match.

Parallel: the study is one sweep (:mod:`.sweep`, runs named ``arm=<arm>,seed=<seed>``) run
through an executor (``--backend local``: ``--jobs`` processes on this machine, default one per
core; ``--backend slurm``: one Slurm job per run through submitit). Each run is an ordinary
``steerheal run`` process, each on one torch thread (``threads=1`` in every run's config, whatever
``--jobs`` is, so results do not depend on it). On 2 cores this gains less than one might hope:
prefill and training split well over threads anyway and decoding is bound by memory bandwidth,
so what overlaps is mostly the per-stage overhead (kernel start, imports, model load, Python-side
filter scoring). Measured in the study: a later round took ~360 s per process with two running,
against ~230 s for one process on two threads, i.e. ~1.27x the throughput.

Resumable: every run resumes where it stopped (the driver skips finished stages), so
re-running the command continues the grid and then regenerates the outputs.

Outputs (``--out``, default docs/study/): runs.csv, summary.csv, trajectory.png,
ceo_outputs.json, study.json, results.md (see :func:`write_outputs`).

Kept-data loop rate: the fraction of a round's *kept* completions (the rows 04_heal trained on)
that a stricter copy of the filter's loop detectors (``heal.LOOP_REASONS``: degenerate_loop,
affect_loop, token_soup, drift, repetition, entropy_collapse) would drop. Each loop gate is
moved halfway from its 03 threshold toward the median score of the shipped coherent labelled
rows (data/filter_labelled.jsonl); narration, refusal, word-count and perplexity gates are off.
Kept rows passed the 03 gates, so this measures how close to looping the training data was.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import config as C
from .. import contract
from ..embedded import sha256
from ..runfolder import STAGES, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_jsonl, run_lock

ARMS: dict[str, dict[str, Any]] = {"rmse": {"kl_agg": "rmse"}, "mean": {"kl_agg": "mean"}, "nll": {"reg": "nll"},
                                   # prompt distillation: 02 samples with the persona prompt, no vector; rmse's heal
                                   "prompt": {"data_source": "prompt", "kl_agg": "rmse"}}
# config keys an arm may change besides the heal keys, and the round-0 stages it can then still share
ROUND0_SHARE: dict[str, tuple[str, ...]] = {"data_source": ("01_vector",)}
# tau_mode: see the module docstring (a calibrated tau for every arm). threads: runs go in parallel
# processes (--jobs), one core each; fixed at 1 whatever --jobs is, so the numbers do not depend on it.
COMMON: dict[str, Any] = {"tau_mode": "quantile", "threads": 1}

# ``full`` is the spec (preset default as it is). ``quick`` is a documented reduction, applied
# equally to every arm, for when the full grid does not fit a compute budget: a coarser dose search
# (a 3-dose grid, 16 probes per call), a smaller data budget per round (16 kept of at most 48), shorter held-out
# answers and a stratified half of the vignettes (66 of 132). Heal recipe (epochs, lr, LoRA) and
# tau are unchanged.
SCALES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": dict(calib_probes=16, calib_grid=3, calib_refine=2, n_keep=16, gen_budget=48, eval_max_rows=66,
                  heldout_max_new_tokens=32),
}
SHARED_STAGES = STAGES[:3]  # 01_vector, 02_generate, 03_filter
METRICS = ("axis_logodds", "auth_nats", "care_nats", "coherence")
CONTROL_CONDITIONS = ("base", "prompted", "random")  # arm-independent, round 0 ("random": the control band's summary)
DELTA_KEYS = tuple(f"delta_{m}" for m in METRICS)  # condition - base, paired (report.CI_COLUMNS)
CEO_ID = "heldout-ceo-logs"
SUMMARY_KEYS = (*METRICS, "kept_loop_rate", "kl_to_base")  # kl_to_base: healed, on the held-out answers


def is_control(condition: str) -> bool:
    """Arm-independent conditions: base, prompted, the band summary ``random`` and its members ``random_NN``."""
    from ..controls import is_control_name

    return condition in CONTROL_CONDITIONS or is_control_name(condition)


class StudyError(C.ConfigError):
    """A study setting that cannot work (unknown arm, arms that cannot share round 0, no runs to report)."""


# ------------------------------------------------------------------ configs
def run_name(arm: str, seed: int) -> str:
    """The run folder of one arm and seed: its sweep name, e.g. ``arm=rmse,seed=0``."""
    from .sweep import run_name as sweep_name

    return sweep_name({"arm": arm, "seed": str(int(seed))})


def arm_overrides(arm: str, seed: int, scale: str = "full", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides of one run: the scale's reduction, ``extra`` (the same for every arm), the
    common settings, the arm's one key, the seed."""
    if arm not in ARMS:
        raise StudyError(f"unknown arm {arm!r}; arms are {', '.join(ARMS)}")
    if scale not in SCALES:
        raise StudyError(f"unknown scale {scale!r}; scales are {', '.join(SCALES)}")
    clash = set(extra or {}) & ({"seed"} | {k for a in ARMS.values() for k in a})
    if clash:
        raise StudyError(f"--set {sorted(clash)}: the study sets these per arm / seed itself")
    return {**SCALES[scale], **COMMON, **(extra or {}), **ARMS[arm], "seed": int(seed)}


def arm_config(arm: str, seed: int, scale: str = "full", preset: str = "default",
               extra: dict[str, Any] | None = None) -> C.Config:
    return C.resolve(preset, arm_overrides(arm, seed, scale, extra))


def shared_stages(first: C.Config, other: C.Config) -> tuple[str, ...]:
    """The round-0 stages ``other`` can copy from ``first``: 01-03 when they differ only in heal (04)
    keys, fewer when they also differ in a key of :data:`ROUND0_SHARE` (``data_source``: 01 only);
    StudyError when they differ in any other key 01-03 read."""
    from ..heal.step import HEAL_KEYS

    diff = [k for k, v in first.to_dict().items() if other.to_dict()[k] != v]
    outside = [k for k in diff if k not in HEAL_KEYS and k not in ROUND0_SHARE]
    if outside:
        raise StudyError(f"arms differ in {outside}, which stages 01-03 read: round 0 cannot be shared")
    stages = SHARED_STAGES
    for k in diff:
        if k in ROUND0_SHARE:
            stages = tuple(s for s in stages if s in ROUND0_SHARE[k])
    return stages


def check_shareable(cfgs: Sequence[C.Config]) -> None:
    """Raise StudyError unless every config can share round 0 with the first (:func:`shared_stages`)."""
    for other in cfgs[1:]:
        shared_stages(cfgs[0], other)


# ------------------------------------------------------------------ sharing round 0
def shared_files(src_round: Path, stages: Sequence[str] = SHARED_STAGES) -> list[Path]:
    """Files of ``src_round`` written by ``stages`` (01-03, or its first ones; relative paths).

    The driver writes a stage's marker after everything the stage wrote and before the next
    stage starts, so 01-03's files are exactly those no newer than ``.done/03_filter.json``
    (04/05 never rewrite them). Hidden temporary leftovers are skipped.
    """
    marker = contract.marker_path(src_round.parent, 0, stages[-1])
    if not marker.exists():
        raise StudyError(f"{marker} is missing: round 0's {stages[-1]} has not finished in {src_round.parent}")
    limit = marker.stat().st_mtime_ns
    out = []
    for p in sorted(src_round.rglob("*")):
        rel = p.relative_to(src_round)
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if rel.parts[0] == contract.MARKER_DIR:
            if p.stem in stages:
                out.append(rel)
        elif p.stat().st_mtime_ns <= limit:
            out.append(rel)
    return out


def share_round0(src_run: Path, dst_run: Path, stages: Sequence[str] = SHARED_STAGES) -> dict | None:
    """Copy round 0's files and markers of ``stages`` (01-03, or 01 only: :func:`shared_stages`)
    from ``src_run`` into ``dst_run``.

    Skipped (returns None) when ``dst_run`` already has round 0's marker of the last of ``stages``. The copy is made in
    a scratch folder and renamed into place, so a crash leaves either no round_00 or a whole one;
    a partial round_00 without the 03 marker (a crash inside a stage there) is replaced. Writes
    ``dst_run/shared_from.json``.
    """
    src_run, dst_run = Path(src_run), Path(dst_run)
    dst_round = contract.round_dir(dst_run, 0)
    stages = tuple(stages)
    if contract.marker_path(dst_run, 0, stages[-1]).exists():
        return None
    src_round = contract.round_dir(src_run, 0)
    files = shared_files(src_round, stages)
    with run_lock(dst_run):
        scratch = dst_run / ".round_00.share.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        for rel in files:
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_round / rel, scratch / rel)  # copy2 keeps mtimes: the 03-marker rule still holds
        if dst_round.exists():
            late = [s for s in STAGES[len(stages):] if contract.marker_path(dst_run, 0, s).exists()]
            if late:
                raise StudyError(f"{dst_round} has {late} done but not {stages[-1]}: inconsistent, remove it")
            shutil.rmtree(dst_round)
        os.replace(scratch, dst_round)
        rec = {"source": str(src_run.resolve()), "round": 0, "stages": list(stages),
               "copied": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "files": {str(rel): sha256(dst_round / rel) for rel in files}}
        atomic_write_json(contract.run_path(dst_run, "shared_from"), rec)
    return rec


# ------------------------------------------------------------------ running the grid
def share_round0_evals(src_run: Path, dst_run: Path) -> list[str]:
    """Copy round 0's saved per-condition evals of the arm-independent models (base, prompted, random,
    steered: no adapter of the arm is active in them) from ``src_run`` into ``dst_run``.

    05_eval reads a copied condition back only when its fingerprint (config outside the heal keys,
    vector, dose, active adapters) matches what it would compute, so a copy can save work but
    never change a result. Returns the condition names copied; records them in ``shared_from.json``.
    """
    src = contract.path(src_run, 0, "eval_cache")
    dst = contract.path(dst_run, 0, "eval_cache")
    if contract.marker_path(dst_run, 0, STAGES[-1]).exists() or not src.is_dir():
        return []
    copied = []
    members = sorted(f.stem for f in src.glob("random_*.json"))  # the control band
    for name in ("base", "prompted", *members, "steered"):
        f = src / f"{name}.json"
        if f.exists() and not (dst / f.name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dst / f.name, f.read_bytes())
            copied.append(name)
    rec_path = contract.run_path(dst_run, "shared_from")
    if copied and rec_path.exists():
        rec = read_json(rec_path)
        rec["eval_conditions"] = sorted(set(rec.get("eval_conditions", [])) | set(copied))
        atomic_write_json(rec_path, rec)
    return copied


def study_spec(arms: Sequence[str], seeds: Sequence[int], rounds: int, *, scale: str = "full",
               preset: str = "default", extra: dict[str, Any] | None = None):
    """The study as a sweep spec (:class:`.sweep.Spec`): a named axis ``arm`` (label -> its one
    override) times the config axis ``seed``, every run with the scale's reduction, ``COMMON`` and
    ``extra``. Its configs are exactly :func:`arm_config`'s.

    Example:
        >>> study_spec(["rmse", "nll"], [0, 1], 2, preset="tiny").grid
        {'arm': {'rmse': {'kl_agg': 'rmse'}, 'nll': {'reg': 'nll'}}, 'seed': [0, 1]}
    """
    from .sweep import Spec

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
    from . import sweep as S
    from .executors import LocalExecutor

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


def _share(first: Path, run: Path, log, stages: Sequence[str] = SHARED_STAGES) -> None:
    if share_round0(first, run, stages):
        log(f"study: copied round 0 {', '.join(stages)} from {first.name} into {run.name}")
    copied = share_round0_evals(first, run)
    if copied:
        log(f"study: copied round 0 evals of {', '.join(copied)} from {first.name} into {run.name}")


def _run_commits(study_dir: Path, arms: Sequence[str], seeds: Sequence[int]) -> dict[str, list[str]]:
    """git commit -> the runs whose config.yaml records it (the code that computed them)."""
    import yaml

    out: dict[str, list[str]] = {}
    for arm in arms:
        for seed in seeds:
            path = Path(study_dir) / run_name(arm, seed) / "config.yaml"
            if path.exists():
                commit = (yaml.safe_load(path.read_text()).get("_meta") or {}).get("git_commit") or "unknown"
                out.setdefault(commit, []).append(run_name(arm, seed))
    return out


def _wall_span(spans: Sequence[tuple[float, float]]) -> float | None:
    return round(max(e for _, e in spans) - min(b for b, _ in spans), 1) if spans else None


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _record_error(run: Path, msg: str) -> None:
    atomic_write_json(run / "study_error.json", {"error": msg, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ------------------------------------------------------------------ the kept-data loop rate
def strict_loop_thresholds(th=None, labelled: Iterable[dict] | None = None):
    """03's thresholds with every loop gate moved halfway toward the median clean-text score.

    Args:
        th: the run's ``FilterThresholds`` (default: the config defaults).
        labelled: rows with ``completion`` and ``label``; default the shipped labelled set. Rows whose
            label starts with ``coherent`` give the clean reference (text scores only, so
            entropy_collapse's reference is 0).

    Returns:
        ``(strict FilterThresholds, {gate field: (03 value, clean median, strict value)})``.
    """
    import dataclasses

    from .. import filter as F

    th = th or F.FilterThresholds()
    rows = list(labelled) if labelled is not None else F.labelled_rows()
    clean = [F.text_scores(r["completion"]) for r in rows if str(r.get("label", "")).startswith("coherent")]
    if not clean:
        raise StudyError("no coherent labelled rows to take the clean reference from")
    gates = {g[1]: g[0] for g in F.GATES if g[0] != "tail_ppl"}  # perplexity is not a loop detector
    gates.update(max_exclaim_rate="exclaim_rate", max_script_mix="script_mix", max_char_repeat="char_repeat")
    new, table = {}, {}
    for field, key in gates.items():
        ref = statistics.median(s[key] for s in clean) if key in clean[0] else 0.0
        old = getattr(th, field)
        new[field] = (old + ref) / 2
        table[field] = (old, ref, new[field])
    return dataclasses.replace(th, strict=True, **new), table


def loop_reason(scores: dict, strict) -> str | None:
    """The loop reason a strict gate gives a scored row, or None (narration, refusal, length and
    perplexity gates switched off: only the loop detectors of ``filter.LOOP_REASONS`` count)."""
    from ..filter.gates import loop_reason as gate_loop_reason

    return gate_loop_reason(scores, strict, perplexity_gate=False)


def kept_loop_rate(rows: Sequence[dict], strict) -> float | None:
    """Fraction of ``keep`` rows flagged by :func:`loop_reason`; None when nothing was kept."""
    kept = [r for r in rows if r.get("keep") is True]
    if not kept:
        return None
    return sum(loop_reason(r, strict) is not None for r in kept) / len(kept)


# ------------------------------------------------------------------ collecting the runs
def _num(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def collect_runs(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Every metrics row of every run (report.metric_rows), with arm, seed and the kept-data loop rate."""
    from .. import filter as F
    from ..report import metric_rows

    out = []
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            if not (run / "config.yaml").exists():
                continue
            strict, _ = strict_loop_thresholds(F.FilterThresholds.from_config(C.load_config(run / "config.yaml")))
            rates: dict[int, float | None] = {}
            for row in metric_rows(run):
                rnd = row["round"]
                if rnd not in rates:
                    p = contract.path(run, rnd, "completions")
                    rates[rnd] = kept_loop_rate(read_jsonl(p, "completions"), strict) if p.exists() else None
                lr = rates[rnd] if row["condition"] in ("steered", "healed") else None
                out.append({"arm": arm, "seed": seed, **row, "kept_loop_rate": lr})
    return out


PIPELINE_KEYS = ("dose", "n_generated", "keep_rate", "labelled_precision", "labelled_degenerate_recall",
                 "q1_loop_steered", "q1_loop_healed_sampled", "q1_loop_healed_greedy",
                 "q1_ppl_steered", "q1_ppl_healed_sampled", "heal_nll_first", "heal_nll_last", "heal_hinge_frac")


def pipeline_rows(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Per arm, seed and round: what 02-04 did (the evidence for Q0 and Q1).

    From ``generate.json`` the dose and its flags (a bound, below target, diverged...); from
    ``filter.json`` the rows generated, the keep rate and the drop reasons, and the filter's
    precision / degenerate recall on the labelled set; from ``heal_q1.json`` the loop rate and median tail perplexity (under the base) of the steered
    samples vs the healed model's own sampled and greedy answers to the same prompts; from
    ``heal.json`` the NLL at the first and last step and the fraction of rows the barrier bit on.
    """
    out = []
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            for d in sorted(run.glob("round_[0-9][0-9]")):
                rnd = int(d.name[-2:])
                row: dict[str, Any] = {"arm": arm, "seed": seed, "round": rnd}
                gen, filt = contract.path(run, rnd, "generate_summary"), contract.path(run, rnd, "filter_summary")
                q1, healj = contract.path(run, rnd, "heal_q1"), contract.path(run, rnd, "heal_summary")
                if gen.exists():
                    g = read_json(gen)
                    row.update(dose=g.get("dose"), dose_flag=g.get("dose_flag") or "")
                if filt.exists():
                    f = read_json(filt)
                    row.update(n_generated=f.get("n"), keep_rate=(f["n_kept"] / f["n"]) if f.get("n") else None,
                               reasons=f.get("reasons") or {})
                    lab = f.get("labelled") or {}
                    row.update(labelled_precision=lab.get("precision"), labelled_degenerate_recall=lab.get("degenerate_recall"))
                if q1.exists():
                    sets = read_json(q1).get("sets", {})
                    for name, key in (("steered", "steered"), ("healed_sampled", "healed_sampled"), ("healed_greedy", "healed_greedy")):
                        row[f"q1_loop_{key}"] = sets.get(name, {}).get("loop_rate")
                    row["q1_ppl_steered"] = sets.get("steered", {}).get("tail_ppl_median")
                    row["q1_ppl_healed_sampled"] = sets.get("healed_sampled", {}).get("tail_ppl_median")
                if healj.exists():
                    h = read_json(healj).get("summary", {})
                    row.update(heal_nll_first=h.get("nll_first"), heal_nll_last=h.get("nll_last"),
                               heal_hinge_frac=h.get("hinge_frac_mean"))
                if len(row) > 3:
                    out.append(row)
    return out


def summarize_pipeline(rows: Sequence[dict]) -> list[dict]:
    """One row per (arm, round): mean / min / max over seeds of :data:`PIPELINE_KEYS`, drop reasons summed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["round"]), []).append(r)
    out = []
    for (arm, rnd), rs in groups.items():
        row: dict[str, Any] = {"arm": arm, "round": rnd, "n_seeds": len(rs)}
        for k in PIPELINE_KEYS:
            sp = spread([r.get(k) for r in rs])
            row.update({f"{k}_{m}": sp[m] for m in ("mean", "min", "max")})
        reasons: dict[str, int] = {}
        for r in rs:
            for why, n in (r.get("reasons") or {}).items():
                reasons[why] = reasons.get(why, 0) + n
        row["drop_reasons"] = "; ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]) if k != "keep")
        row["dose_flags"] = "; ".join(f"s{r['seed']}: {r['dose_flag']}" for r in rs if r.get("dose_flag"))
        out.append(row)
    return out


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample sd (ddof=1; None for one value), min, max and n of the finite values."""
    v = [x for x in (_num(x) for x in values) if x is not None]
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v), "n": len(v)}


def summarize(rows: Sequence[dict], keys: Sequence[str] = SUMMARY_KEYS) -> list[dict]:
    """One row per (arm, condition, round): mean / sd / min / max over seeds of ``keys``.

    The controls (base, prompted, random) do not depend on the arm: they are summarised once,
    as arm ``all``, from the first arm's run of each seed. The band's members (``random_NN``)
    are summarised through their band row ``random`` only (runs.csv keeps them).
    """
    first_arm = rows[0]["arm"] if rows else None
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if is_control(r["condition"]) and r["condition"] not in CONTROL_CONDITIONS:
            continue
        if r["condition"] in CONTROL_CONDITIONS:
            if r["arm"] != first_arm:
                continue
            key = ("all", r["condition"], r["round"])
        else:
            key = (r["arm"], r["condition"], r["round"])
        groups.setdefault(key, []).append(r)
    order = {s: i for i, s in enumerate((*CONTROL_CONDITIONS, "steered", "healed"))}
    out = []
    for (arm, condition, rnd), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "all", kv[0][0],
                                                                       order.get(kv[0][1], 9), kv[0][2])):
        row: dict[str, Any] = {"arm": arm, "condition": condition, "round": rnd, "n_seeds": len({r["seed"] for r in rs})}
        for k in keys:
            s = spread([r.get(k) for r in rs])
            row.update({f"{k}_{m}": s[m] for m in ("mean", "sd", "min", "max")})
        out.append(row)
    return out


def control_mismatch(rows: Sequence[dict]) -> float | None:
    """Largest |difference| of a control metric between arms of the same seed (0 when identical)."""
    ref: dict[tuple, float] = {}
    worst = None
    for r in rows:
        if not is_control(r["condition"]):
            continue
        for k in METRICS:
            v = _num(r.get(k))
            if v is None:
                continue
            key = (r["seed"], r["condition"], r["round"], k)
            if key in ref:
                worst = max(worst or 0.0, abs(ref[key] - v))
            else:
                ref[key] = v
    return worst


def _round_eval(run: Path, rnd: int, cache: dict) -> tuple[dict, dict[str, list[dict]]] | None:
    """A run's round: eval.json and its eval_rows.jsonl grouped by condition (cached per call of item_cis)."""
    key = (str(run), rnd)
    if key not in cache:
        ev, ev_rows = contract.path(run, rnd, "eval"), contract.path(run, rnd, "eval_rows")
        if ev.exists() and ev_rows.exists():
            record = contract.read_eval(run, rnd)  # refuses a record made by an older version
            by: dict[str, list[dict]] = {}
            for r in read_jsonl(ev_rows, "eval rows"):
                by.setdefault(r["condition"], []).append(r)
            cache[key] = (record, by)
        else:
            cache[key] = None
    return cache[key]


def item_cis(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int], summary: Sequence[dict], *, n_boot: int = 2000,
             level: float = 0.95, seed: int = 0) -> None:
    """Add the within-seed uncertainty to the summary rows: ``<k>_ci_lo`` / ``<k>_ci_hi`` for the
    :data:`METRICS` and their :data:`DELTA_KEYS` (condition - base), in place.

    The interval is an item bootstrap of the *mean over seeds*: every resample draws vignettes
    (and, separately, probe items) with replacement, recomputes each seed's metric on them, and
    averages over seeds; the percentile interval of those averages says how much the seed mean
    would move with other items of the same kind. When the seeds were scored on the same items
    (the usual case), one draw serves every seed and every model (paired); otherwise each seed
    gets its own draw. Deltas pair each model with its own run's base (round 0's for later
    rounds) on the same draws. The ``random`` row is the band mean (mean over its controls).
    The spread over seeds (sd, min, max) is what summarize() gives; the two answer different
    questions (other items vs another seed) and the tables show both.
    """
    from .. import evaluate as E
    from .. import stats

    cache: dict = {}
    humans: dict[str, dict[str, int]] = {}
    for row in summary:
        arm = arms[0] if row["arm"] == "all" else row["arm"]
        per_seed = []  # (ids, condition arrays/items, base arrays/items)
        for sd in seeds:
            run = Path(study_dir) / run_name(arm, sd)
            got = _round_eval(run, row["round"], cache)
            if got is None:
                continue
            ev, by = got
            names = sorted(n for n in by if n.startswith("random_")) if row["condition"] == "random" else [row["condition"]]
            if not names or any(n not in by for n in names):
                continue
            base = (ev["conditions"].get("base"), by.get("base")) if "base" in by else None
            if base is None:
                got0 = _round_eval(run, 0, cache)
                base = (got0[0]["conditions"].get("base"), got0[1].get("base")) if got0 and "base" in got0[1] else None
            vfile = C.load_config(run / "config.yaml").vignettes or ""
            if vfile not in humans:
                humans[vfile] = E.human_majority(E.load_vignettes(vfile or None))
            per_seed.append((ev, by, names, base, humans[vfile]))
        if not per_seed:
            continue
        ids0 = [r["id"] for r in per_seed[0][1][per_seed[0][2][0]]]
        joint = all([r["id"] for r in by[names[0]]] == ids0 for _, by, names, _, _ in per_seed)
        n_items = {len(ev["conditions"][names[0]].get("axis_items") or []) for ev, _, names, _, _ in per_seed}
        smp, dsmp = [], []
        for i, (ev, by, names, base, human) in enumerate(per_seed):
            ids = [r["id"] for r in by[names[0]]]
            vidx = stats.bootstrap_indices(len(ids), n_boot, seed if joint else seed + 7919 * (i + 1))
            n_p = len(ev["conditions"][names[0]].get("axis_items") or [])
            pidx = stats.bootstrap_indices(n_p, n_boot, (seed if len(n_items) == 1 else seed + 7919 * (i + 1)) + 1) \
                if n_p else None

            def samples(summ, recs):
                arr = stats.align(stats.vignette_arrays(recs, human), ids) if recs else None
                items = (summ or {}).get("axis_items")
                return stats.condition_samples(arr, items if items is not None and len(items) == n_p else None, vidx, pidx)

            s = stats.mean_over_seeds([samples(ev["conditions"][n], by[n]) for n in names])  # a band: mean over members
            smp.append(s)
            if base is not None and base[1] and row["condition"] != "base":
                b = samples(*base)
                dsmp.append({m: s[m] - b[m] for m in s if m in b})
        for key, group in (("", smp), ("delta_", dsmp)):
            if len(group) != len(per_seed):
                continue  # a seed without a base: no delta interval rather than one over fewer seeds
            mean = stats.mean_over_seeds(group)
            for m in METRICS:
                if m in mean:
                    row[f"{key}{m}_ci_lo"], row[f"{key}{m}_ci_hi"] = stats.percentile_ci(mean[m], level)


def ceo_outputs(study_dir: Path | str, arms: Sequence[str], seed: int) -> dict:
    """Per arm: the healed model's greedy answer to the CEO/logs held-out prompt, per round (eval.json)."""
    from ..report import load_evals

    out: dict[str, Any] = {"prompt_id": CEO_ID, "seed": seed, "prompt": None, "arms": {}}
    for arm in arms:
        run = Path(study_dir) / run_name(arm, seed)
        answers = {}
        for ev in load_evals(run) if run.exists() else []:
            for h in ev.get("heldout") or []:
                if h.get("id") == CEO_ID:
                    out["prompt"] = h.get("prompt")
                    answers[str(ev["round"])] = h.get("answer")
        out["arms"][arm] = answers
    return out


def run_timings(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """Stage seconds per run and round from the done markers; copied (shared) markers are listed apart."""
    runs = {}
    for arm in arms:
        for seed in seeds:
            run = Path(study_dir) / run_name(arm, seed)
            if not run.exists():
                continue
            shared_path = contract.run_path(run, "shared_from")
            shared = read_json(shared_path)["stages"] if shared_path.exists() else []
            per_round, own, span = {}, 0.0, []
            for d in sorted(run.glob("round_[0-9][0-9]")):
                r = int(d.name[-2:])
                secs = {}
                for m in sorted((d / contract.MARKER_DIR).glob("*.json")):
                    rec = read_json(m)
                    s = rec.get("seconds")
                    secs[m.stem] = s
                    if s is not None and not (r == 0 and m.stem in shared):
                        own += s
                        if rec.get("finished") is not None:
                            span.append((rec["finished"] - s, rec["finished"]))
                per_round[str(r)] = secs
            err = run / "study_error.json"
            runs[run.name] = {"stage_seconds": per_round, "shared_round0_stages": shared, "seconds_own": round(own, 1),
                              "stage_spans": span,
                              "error": read_json(err).get("error") if err.exists() else None,
                              "stop": read_json(contract.run_path(run, "stop"))
                              if contract.run_path(run, "stop").exists() else None}
    return runs


# ------------------------------------------------------------------ writing the outputs
def _csv(rows: Sequence[dict], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k]) for k in cols})
    return buf.getvalue()


def _fmt(s: dict, k: str, digits: int = 3, bold_if_nonzero: bool = False) -> str:
    """``mean [min, max] (CI lo, hi)``: spread over seeds, then the item-bootstrap CI of the mean (when known).

    ``bold_if_nonzero``: bold when the CI excludes 0 (a difference one may call a difference).
    """
    from ..stats import excludes_zero

    m, lo, hi = s.get(f"{k}_mean"), s.get(f"{k}_min"), s.get(f"{k}_max")
    if m is None:
        return "–"
    out = f"{m:.{digits}f}"
    if s.get("n_seeds", 1) > 1 and lo is not None and hi is not None and hi > lo:
        out += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    clo, chi = s.get(f"{k}_ci_lo"), s.get(f"{k}_ci_hi")
    if clo is not None and chi is not None and math.isfinite(clo) and math.isfinite(chi):
        out += f" (CI {clo:.{digits}f}, {chi:.{digits}f})"
        if bold_if_nonzero and excludes_zero(clo, chi):
            out = f"**{out}**"
    return out


def results_markdown(summary: Sequence[dict], ceo: dict, meta: dict, pipeline: Sequence[dict] = ()) -> str:
    """The README tables (eval at the first and last round, healed per arm, plus the controls; what
    02-04 did per round) and the CEO appendix."""
    rounds = sorted({r["round"] for r in summary if r["condition"] == "healed"})
    first, last = (rounds[0], rounds[-1]) if rounds else (0, 0)
    lines = [f"Scale `{meta['scale']}`, preset `{meta['preset']}`, {meta['rounds']} rounds, seeds "
             f"{', '.join(map(str, meta['seeds']))}; every cell is the mean over seeds [min, max] (CI: the "
             f"item-bootstrap interval of that mean, defined in `study.json`, `uncertainty`). `random` is the mean "
             f"of the control band (random rotations of the persona vector at KL-matched doses). "
             f"`kept loop` is the fraction of the round's kept (trained-on) rows that a stricter loop gate flags "
             f"(defined in `study.json`, `loop_rate_definition`); `KL to base` is the healed model's mean per-token "
             f"KL(healed || base) on its own greedy answers to the held-out prompts. Produced by `{meta['command']}`.", "",
             "| arm | condition | round | axis probe (log-odds care vs auth) | auth_nats | care_nats | coherence | kept loop | KL to base |",
             "|---|---|---|---|---|---|---|---|---|"]
    pick = [r for r in summary if r["condition"] in CONTROL_CONDITIONS]
    pick += [r for r in summary if r["condition"] == "steered" and r["round"] == first]
    pick += [r for r in summary if r["condition"] == "healed" and r["round"] in (first, last)]
    for r in pick:
        lines.append(f"| {r['arm']} | {r['condition']} | {r['round']} | {_fmt(r, 'axis_logodds')} | {_fmt(r, 'auth_nats')} | "
                     f"{_fmt(r, 'care_nats')} | {_fmt(r, 'coherence', 4)} | {_fmt(r, 'kept_loop_rate', 2)} | "
                     f"{_fmt(r, 'kl_to_base', 2)} |")
    deltas = [r for r in pick if r["condition"] != "base" and any(r.get(f"{k}_mean") is not None for k in DELTA_KEYS)]
    if deltas:
        lines += ["", "Difference from base (each run's condition minus its own base, paired on the same items; mean over "
                  "seeds [min, max] (CI)); **bold**: the CI excludes 0.", "",
                  "| arm | condition | round | Δ axis probe | Δ auth_nats | Δ care_nats | Δ coherence |", "|---|---|---|---|---|---|---|"]
        for r in deltas:
            lines.append(f"| {r['arm']} | {r['condition']} | {r['round']} | "
                         + " | ".join(_fmt(r, f"delta_{k}", 4 if k == "coherence" else 3, bold_if_nonzero=True)
                                      for k in ("axis_logodds", "auth_nats", "care_nats", "coherence")) + " |")
    if pipeline:
        lines += ["", "What 02-04 did per round (mean over seeds [min, max]; drop reasons summed over seeds). `keep` is "
                  "03's keep rate over every generated row; `Q1 loop` is the loop rate (heal.LOOP_REASONS at 03's "
                  "thresholds) of the steered samples vs the healed model's own sampled answers to the same prompts, "
                  "`Q1 tail ppl` their median tail perplexity under the base; `barrier` is the mean fraction of rows "
                  "per step whose KL aggregate was above tau.", "",
                  "| arm | round | dose | generated | keep | drop reasons | Q1 loop: steered -> healed | "
                  "Q1 tail ppl: steered -> healed | NLL first -> last | barrier |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(pipeline, key=lambda r: (list(meta["arms"]).index(r["arm"]) if r["arm"] in meta["arms"] else 9,
                                                 r["round"])):
            flagged = f" **{r['dose_flags']}**" if r.get("dose_flags") else ""
            lines.append(f"| {r['arm']} | {r['round']} | {_fmt(r, 'dose')}{flagged} | {_fmt(r, 'n_generated', 0)} | "
                         f"{_fmt(r, 'keep_rate', 2)} | {r['drop_reasons'] or '-'} | {_fmt(r, 'q1_loop_steered', 2)} -> "
                         f"{_fmt(r, 'q1_loop_healed_sampled', 2)} | {_fmt(r, 'q1_ppl_steered', 1)} -> "
                         f"{_fmt(r, 'q1_ppl_healed_sampled', 1)} | {_fmt(r, 'heal_nll_first', 2)} -> "
                         f"{_fmt(r, 'heal_nll_last', 2)} | {_fmt(r, 'heal_hinge_frac', 2)} |")
    lines += ["", f"Outputs over the loop: the healed model's greedy answer to the held-out prompt "
              f"`{ceo['prompt_id']}` (seed {ceo['seed']}), per round.", "", f"> **Prompt:** {ceo.get('prompt') or ''}", ""]
    if ceo.get("base") is not None:
        lines += ["**base model**", "", "> " + _quote(ceo["base"]), ""]
    for arm, answers in ceo["arms"].items():
        for rnd, ans in sorted(answers.items(), key=lambda kv: int(kv[0])):
            lines += [f"**{arm}, round {rnd}**", "", "> " + _quote(ans), ""]
    return "\n".join(lines)


def _quote(text: str | None) -> str:
    return " ".join((text or "(empty)").split()).replace("|", "\\|")


def trajectory_png(summary: Sequence[dict], arms: Sequence[str]) -> bytes:
    """Per arm, healed mean over seeds with a min-max band, over rounds; controls as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colors = {"rmse": "#2ca02c", "mean": "#d62728", "nll": "#9467bd", "prompt": "#ff7f0e"}
    ref_style = {"base": ("black", "-"), "prompted": ("#1f77b4", "--"), "random": ("#7f7f7f", ":")}
    panels = (("axis_logodds", "axis probe log-odds (up = care)", False, False),
              ("care_nats", "care_nats (up = more care)", False, False),
              ("auth_nats", "auth_nats (down = less authority)", False, False),
              ("coherence", "1 - coherence (log; down = coherent)", True, True),
              ("kept_loop_rate", "kept-data loop rate (strict gate)", False, False),
              ("kl_to_base", "KL to base on held-out answers (nats/token)", False, False))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    rounds = sorted({r["round"] for r in summary if r["condition"] == "healed"}) or [0]
    for ax, (key, title, inv, logy) in zip(axes, panels):
        def tr(v):
            return None if v is None else max(1 - v, 1e-6) if inv else v
        for arm in arms:
            rs = sorted((r for r in summary if r["arm"] == arm and r["condition"] == "healed"), key=lambda r: r["round"])
            pts = [(r["round"], tr(r[f"{key}_mean"]), tr(r[f"{key}_min"]), tr(r[f"{key}_max"])) for r in rs
                   if r.get(f"{key}_mean") is not None]
            if pts:
                x, m, lo, hi = zip(*pts)
                ax.plot(x, m, "o-", color=colors.get(arm), label=f"{arm} (healed)")
                ax.fill_between(x, lo, hi, color=colors.get(arm), alpha=0.18, linewidth=0)
                ci = [(r["round"], tr(r[f"{key}_mean"]), tr(r.get(f"{key}_ci_lo")), tr(r.get(f"{key}_ci_hi"))) for r in rs
                      if r.get(f"{key}_mean") is not None and r.get(f"{key}_ci_lo") is not None]
                if ci:  # the item-bootstrap CI of the seed mean (1 - coherence swaps its bounds)
                    cx, cm, a, b = zip(*ci)
                    low, high = [min(u, v) for u, v in zip(a, b)], [max(u, v) for u, v in zip(a, b)]
                    ax.errorbar(cx, cm, yerr=[[max(mm - l, 0) for mm, l in zip(cm, low)],
                                              [max(h - mm, 0) for mm, h in zip(cm, high)]],
                                fmt="none", ecolor=colors.get(arm), capsize=3, lw=1)
        for condition, (c, ls) in ref_style.items():
            r = next((r for r in summary if r["condition"] == condition and r.get(f"{key}_mean") is not None), None)
            if r is not None:
                ax.axhline(tr(r[f"{key}_mean"]), color=c, ls=ls, lw=1.2, label=condition)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_xticks(rounds)  # integer rounds, also when there is only one
    axes[0].legend(fontsize=8)
    fig.suptitle("healed model per arm: mean over seeds, band = min-max over seeds, bars = item-bootstrap CI of the mean",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def base_ceo_answer(study_dir: Path, cfg: C.Config) -> str | None:
    """The base model's greedy answer to the CEO prompt, computed once and cached in the study folder."""
    path = Path(study_dir) / "base_heldout.json"
    if path.exists():
        return read_json(path).get("answers", {}).get(CEO_ID)
    from ..evaluate import heldout_answers, load_heldout
    from ..models import load_base

    model, tok = load_base(cfg)
    model.eval()
    recs = heldout_answers(model, tok, load_heldout(), cfg.heldout_max_new_tokens, cfg.batch_size)[0]
    atomic_write_json(path, {"model": cfg.model, "max_new_tokens": cfg.heldout_max_new_tokens,
                             "answers": {r["id"]: r["answer"] for r in recs}})
    return next((r["answer"] for r in recs if r["id"] == CEO_ID), None)


def labelled_flag_rates(strict) -> dict:
    """How often the strict loop gate flags the shipped labelled rows (text scores only), per label group."""
    from .. import filter as F

    groups: dict[str, list[bool]] = {}
    for r in F.labelled_rows():
        label = str(r.get("label", "?"))
        g = "coherent" if label.startswith("coherent") else "degenerate" if label.startswith("degenerate") else label
        groups.setdefault(g, []).append(loop_reason(F.text_scores(r["completion"]), strict) is not None)
    return {g: {"n": len(v), "flagged": sum(v) / len(v)} for g, v in sorted(groups.items())}


def check_run_configs(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int], scale: str,
                      preset: str = "default", extra: dict[str, Any] | None = None) -> None:
    """Raise StudyError if a run folder was made with another config than this study's (e.g. another
    --scale in the same --study-dir): its numbers would silently enter the tables."""
    for arm in arms:
        for seed in seeds:
            path = Path(study_dir) / run_name(arm, seed) / "config.yaml"
            if path.exists():
                diff = C.config_diff(C.load_config(path), arm_config(arm, seed, scale, preset, extra))
                if diff:
                    raise StudyError(f"{path.parent} was run with another config than this study's "
                                     f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): use the options it "
                                     "was run with, or another --study-dir")


def write_outputs(study_dir: Path | str, out: Path | str, arms: Sequence[str], seeds: Sequence[int], *,
                  rounds: int, scale: str, preset: str = "default", extra: dict[str, Any] | None = None,
                  command: str = "", errors: dict | None = None) -> dict:
    """Write runs.csv, summary.csv, trajectory.png, ceo_outputs.json, study.json and results.md into ``out``."""
    from .. import filter as F
    from ..driver import provenance
    from ..report import CSV_COLUMNS

    study_dir, out = Path(study_dir), Path(out)
    check_run_configs(study_dir, arms, seeds, scale, preset, extra)
    rows = collect_runs(study_dir, arms, seeds)
    if not rows:
        raise StudyError(f"no finished rounds under {study_dir} for arms {list(arms)} and seeds {list(seeds)}: "
                         "run the study first (without --report-only)")
    summary = summarize(rows, (*SUMMARY_KEYS, *DELTA_KEYS))
    cfg0 = arm_config(arms[0], seeds[0], scale, preset, extra)
    item_cis(study_dir, arms, seeds, summary, n_boot=cfg0.n_boot, level=cfg0.ci_level)
    atomic_write_text(out / "runs.csv", _csv(rows, ("arm", "seed", *CSV_COLUMNS, "kept_loop_rate")))
    cols = ["arm", "condition", "round", "n_seeds", *[f"{k}_{m}" for k in (*SUMMARY_KEYS, *DELTA_KEYS)
                                                  for m in ("mean", "sd", "min", "max")],
            *[f"{p}{k}_ci_{e}" for p in ("", "delta_") for k in METRICS for e in ("lo", "hi")]]
    atomic_write_text(out / "summary.csv", _csv(summary, cols))
    atomic_write_bytes(out / "trajectory.png", trajectory_png(summary, arms))

    ceo = ceo_outputs(study_dir, arms, seeds[0])
    ceo["base"] = base_ceo_answer(study_dir, cfg0)
    atomic_write_json(out / "ceo_outputs.json", ceo)

    strict, table = strict_loop_thresholds(F.FilterThresholds.from_config(cfg0))
    timings = run_timings(study_dir, arms, seeds)
    meta = {
        "scale": scale, "preset": preset, "rounds": rounds, "seeds": list(seeds), "arms": list(arms),
        "command": command or f"python -m steerheal_utils study --scale {scale}",
        "overrides": {"common": {**SCALES[scale], **COMMON, **(extra or {})}, "per_arm": {a: ARMS[a] for a in arms}, "seed": "seed=<seed>"},
        "spread": "summary.csv: sd is the sample standard deviation (ddof=1) over seeds; min/max over seeds. "
                  "results.md: mean [min, max].",
        "uncertainty": f"summary.csv <k>_ci_lo/_ci_hi (results.md: 'CI'): {cfg0.ci_level:.0%} percentile interval of "
                       f"the mean over seeds under an item bootstrap ({cfg0.n_boot} resamples of vignettes and, "
                       "separately, probe items, the same draws for every seed and model when they share items); "
                       "delta_<k>: condition - base of the same run, paired on the same draws (study.item_cis)",
        "controls": "base, prompted and random are arm-independent; summarised as arm 'all' from the first arm's run "
                    "of each seed",
        "control_max_abs_diff_between_arms": control_mismatch(rows),
        "loop_rate_definition": {
            "text": "fraction of a round's kept completions (keep=true, what 04_heal trained on) that a stricter copy "
                    "of the filter's loop detectors (heal.LOOP_REASONS) drops; each loop gate moved halfway from its "
                    "03 threshold toward the median score of the shipped coherent labelled rows; narration, refusal, "
                    "word-count and perplexity gates off",
            "gates": {k: {"filter": v[0], "clean_median": v[1], "strict": v[2]} for k, v in table.items()},
            "labelled_flag_rates_text_only": labelled_flag_rates(strict),
        },
        "runs": timings,
        "compute_seconds_total": round(sum(t["seconds_own"] for t in timings.values()), 1),
        "wall_seconds": _wall_span([sp for t in timings.values() for sp in t.pop("stage_spans")]),
        "timing_note": "compute_seconds_total sums every stage's own seconds (runs in parallel processes overlap); "
                       "wall_seconds is from the first stage's start to the last stage's end, pauses between "
                       "sittings included",
        "errors": errors or {n: t["error"] for n, t in timings.items() if t["error"]},
        "provenance": provenance(),  # of this report; the runs' own code is in run_git_commits
        "run_git_commits": _run_commits(study_dir, arms, seeds),
    }
    pipe = summarize_pipeline(pipeline_rows(study_dir, arms, seeds))
    atomic_write_text(out / "pipeline.csv", _csv(pipe, ["arm", "round", "n_seeds", *[f"{k}_{m}" for k in PIPELINE_KEYS
                                                                                      for m in ("mean", "min", "max")],
                                                        "drop_reasons", "dose_flags"]))
    atomic_write_json(out / "study.json", meta)
    atomic_write_text(out / "results.md", results_markdown(summary, ceo, meta, pipe) + "\n")
    return meta


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal study``: run (or resume) the matched-controls study, then regenerate its outputs."""
    p.add_argument("--study-dir", default="runs/study", help="where the run folders <arm>-s<seed> go (default runs/study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="arms: rmse (kl_agg=rmse), mean (kl_agg=mean), nll (reg=nll, no barrier), prompt (data_source=prompt: "
                        "training data from the persona-prompted model, no vector; rmse heal); default all")
    p.add_argument("--scale", default="full", choices=list(SCALES),
                   help="full = preset default as is (the issue's spec); quick = smaller data budget and half the "
                        "vignettes, equal for every arm (see steerheal_utils/tools/study.py SCALES)")
    p.add_argument("--preset", default="default", choices=list(C.PRESETS), help=argparse.SUPPRESS)  # --preset tiny is for tests
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override applied to every arm alike (recorded in study.json)")
    from .sweep import add_engine_args

    add_engine_args(p, local_jobs="one per CPU core")  # --backend local|slurm, --jobs, --retries, Slurm's options
    p.add_argument("--out", default="docs/study", help="where the compact results go (default docs/study)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the outputs from existing run folders")
    p.set_defaults(func=_cli_study)


def _cli_study(args) -> int:
    if len(set(args.arms)) != len(args.arms) or len(set(args.seeds)) != len(args.seeds):
        raise C.ConfigError("--arms and --seeds must not repeat a value")
    command = "python -m steerheal_utils study " + " ".join(
        [f"--scale {args.scale}", f"--rounds {args.rounds}", "--seeds " + " ".join(map(str, args.seeds)),
         "--arms " + " ".join(args.arms)] + ([f"--preset {args.preset}"] if args.preset != "default" else [])
        + [f"--set {s}" for s in args.set])
    extra = C.parse_overrides(args.set)
    t0 = time.time()
    errors = {}
    if not args.report_only:
        from .sweep import executor_from_args

        executor = executor_from_args(args, Path(args.study_dir), local_jobs=os.cpu_count() or 1)
        errors = run_study(args.study_dir, args.arms, args.seeds, args.rounds, scale=args.scale, preset=args.preset,
                           extra=extra, executor=executor, retries=args.retries,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = write_outputs(args.study_dir, args.out, args.arms, args.seeds, rounds=args.rounds, scale=args.scale,
                         preset=args.preset, extra=extra, command=command, errors=errors)
    print(json.dumps({"out": str(args.out), "runs": len(meta["runs"]), "compute_seconds_total": meta["compute_seconds_total"],
                      "wall_seconds_this_call": round(time.time() - t0, 1), "errors": list(meta["errors"])}))
    if meta["errors"]:
        print("some runs failed; their messages are in study.json 'errors'. Re-run the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0
