"""Copying round 0 between the arms of a seed.

Work shared between arms: round 0's 01_vector, 02_generate and 03_filter read only the base
model, the seed and config keys outside the heal section, which are equal across arms (checked:
:func:`.arms.check_shareable`). They run once per seed, in the first arm; their files and done markers
are copied into the other arms' ``round_00`` before those run (``shared_from.json`` lists what
was copied, with sha256). tests/test_study.py checks that a copied round is byte-identical to
one computed in its own run. Round 0's evals of the base, the controls (prompted, random vector)
and the steered model do not involve the arm's adapter either: 05_eval saves each model's result
with a fingerprint of its inputs (``evaluate.condition_fingerprint``), the study copies those of the
first arm, and the other arms' 05_eval reads them back because the fingerprints match.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from ... import contract
from ...embedded import sha256
from ...runfolder import STAGES, atomic_write_bytes, atomic_write_json, read_json, run_lock
from .arms import SHARED_STAGES, StudyError


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


def _share(first: Path, run: Path, log, stages: Sequence[str] = SHARED_STAGES) -> None:
    if share_round0(first, run, stages):
        log(f"study: copied round 0 {', '.join(stages)} from {first.name} into {run.name}")
    copied = share_round0_evals(first, run)
    if copied:
        log(f"study: copied round 0 evals of {', '.join(copied)} from {first.name} into {run.name}")
