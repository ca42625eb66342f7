"""Bring a run folder made by an older steerheal up to this version's names: ``steerheal upgrade DIR``.

What 05 evaluates (base, prompted, steered, random_NN, healed) used to be called a "stage", the
word that also named a pipeline step. It is now a *condition*. A run folder written before the
rename keeps the old names, which this version's readers refuse (:func:`contract.read_eval`)
rather than misread; :func:`upgrade` renames them in place:

- ``round_NN/eval.json``: the key ``stages`` -> ``conditions`` (same position), the note
  ``read from eval_stages/...`` and the ``ci_method`` prose;
- ``round_NN/eval_rows.jsonl``: each row's ``stage`` -> ``condition``;
- ``round_NN/eval_stages/`` -> ``round_NN/eval_conditions/`` (the saved results and their
  fingerprints move as they are);
- ``metrics.csv`` (and a study folder's ``runs.csv`` / ``summary.csv``): the column ``stage`` -> ``condition``;
- ``shared_from.json`` (study runs): ``eval_stages`` -> ``eval_conditions``;
- every step record (``round_NN/.done/*.json``) that hashed a rewritten file gets the new hash,
  so a record that held before still holds and nothing is recomputed.

Everything else stays byte-identical. Each file is written atomically, the step records before
the files they describe, so an upgrade stopped half-way is finished by running it again; running
it on an upgraded folder changes nothing. A study (or sweep) folder is upgraded run by run. Each
run's ``.lock`` is held meanwhile: a folder a run is still writing is refused.

Example:
    >>> from steerheal_utils.upgrade import upgrade
    >>> upgrade("runs/made_last_week")        # doctest: +SKIP
    ['runs/made_last_week/round_00/eval.json', ...]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path

from . import contract
from .runfolder import RunFolderError, _fsync_dir, atomic_write_text, run_lock

OLD_CACHE_DIR = "eval_stages"  # round_NN/<this>/: the eval cache's folder before the rename
NEW_CACHE_DIR = contract.artifact("eval_cache").file
# prose an older eval record carries, and what this version writes in its place (evaluate/evidence.py, step.py)
OLD_PROSE = {"the same draws for every stage (seed": "the same draws for every condition (seed",
             "deltas are stage - base": "deltas are condition - base",
             f"read from {OLD_CACHE_DIR}/": f"read from {NEW_CACHE_DIR}/"}
STUDY_TABLES = ("runs.csv", "summary.csv")  # a study's outputs with a per-condition column


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _renamed_key(obj: dict, old: str, new: str) -> dict:
    """``obj`` with key ``old`` called ``new``, at the same position (JSON keeps the order)."""
    return {new if k == old else k: v for k, v in obj.items()}


def _prose(text: str) -> str:
    for old, new in OLD_PROSE.items():
        text = text.replace(old, new)
    return text


def _eval_record(text: str) -> str | None:
    doc = json.loads(text)
    if not isinstance(doc, dict) or "stages" not in doc or "conditions" in doc:
        return None
    doc = _renamed_key(doc, "stages", "conditions")
    if isinstance(doc.get("notes"), list):
        doc["notes"] = [_prose(n) if isinstance(n, str) else n for n in doc["notes"]]
    if isinstance(doc.get("ci_method"), str):
        doc["ci_method"] = _prose(doc["ci_method"])
    return json.dumps(doc, indent=2) + "\n"  # as runfolder.atomic_write_json writes it (byte for byte)


def _eval_rows(text: str) -> str | None:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not any("stage" in r and "condition" not in r for r in rows):
        return None
    return "".join(json.dumps(_renamed_key(r, "stage", "condition")) + "\n" for r in rows)  # as atomic_write_jsonl


def _csv_header(text: str) -> str | None:
    """The CSV with its header cell ``stage`` called ``condition``; the rows as they are."""
    first, sep, rest = text.partition("\n")
    cells = next(csv.reader(io.StringIO(first)))
    if "stage" not in cells or "condition" in cells:
        return None
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(["condition" if c == "stage" else c for c in cells])
    return buf.getvalue() + sep + rest


def _shared_from(text: str) -> str | None:
    doc = json.loads(text)
    if not isinstance(doc, dict) or OLD_CACHE_DIR not in doc or NEW_CACHE_DIR in doc:
        return None
    return json.dumps(_renamed_key(doc, OLD_CACHE_DIR, NEW_CACHE_DIR), indent=2) + "\n"


def _planned(run: Path) -> dict[Path, str]:
    """Every file of ``run`` whose old-named content changes: path -> its new text."""
    todo: list[tuple[Path, object]] = [(contract.run_path(run, "metrics"), _csv_header), (run / "shared_from.json", _shared_from)]
    for rd in sorted(run.glob("round_[0-9][0-9]")):
        rnd = int(rd.name[6:])
        todo += [(contract.path(run, rnd, "eval"), _eval_record), (contract.path(run, rnd, "eval_rows"), _eval_rows)]
    out = {}
    for p, convert in todo:
        if p.is_file():
            try:
                new = convert(p.read_text())
            except (ValueError, StopIteration) as e:
                raise RunFolderError(f"{p} cannot be read ({e}): not upgraded; repair or remove it first") from None
            if new is not None:
                out[p] = new
    return out


def _records(run: Path, hashes: dict[str, tuple[str, str]]) -> dict[Path, str]:
    """Step records with an entry for a rewritten file: path -> the record with the new hash.

    ``hashes``: run-relative path -> (sha256 before, sha256 after). Only an entry that matched the
    file before is changed, so a record that did not hold still does not."""
    out = {}
    for p in sorted(run.glob(f"round_[0-9][0-9]/{contract.MARKER_DIR}/*.json")):
        try:
            rec = json.loads(p.read_text())
        except ValueError:
            continue  # a damaged record: the driver reports it; nothing of ours to fix in it
        changed = False
        for part in ("inputs", "outputs"):
            snap = rec.get(part)
            if not isinstance(snap, dict):
                continue
            for rel, (old, new) in hashes.items():
                if snap.get(rel) == old:
                    snap[rel] = new
                    changed = True
        if changed:
            out[p] = json.dumps(rec, indent=2) + "\n"
    return out


def upgrade_run(run: Path | str) -> list[Path]:
    """Rename the old eval names in one run folder (see the module docstring); returns the paths
    written or moved (empty when the folder already uses this version's names)."""
    run = Path(run)
    done: list[Path] = []
    with run_lock(run):
        plan = _planned(run)
        hashes = {p.relative_to(run).as_posix(): (_sha(p.read_bytes()), _sha(text.encode())) for p, text in plan.items()}
        for p, text in {**_records(run, hashes), **plan}.items():  # records first: a stop half-way is finished by a re-run
            atomic_write_text(p, text)
            done.append(p)
        for rd in sorted(run.glob("round_[0-9][0-9]")):
            old, new = rd / OLD_CACHE_DIR, rd / NEW_CACHE_DIR
            if not old.is_dir():
                continue
            if not new.exists():
                os.rename(old, new)
            else:  # both (a run resumed on this version before the upgrade): keep the newer results
                for f in sorted(old.iterdir()):
                    if not (new / f.name).exists():
                        os.rename(f, new / f.name)
                for f in sorted(old.iterdir()):
                    f.unlink()
                old.rmdir()
            _fsync_dir(rd)
            done.append(new)
    return done


def runs_under(folder: Path | str) -> list[Path]:
    """``folder`` itself when it is a run folder, else every run folder below it (a study, a sweep)."""
    folder = Path(folder)
    if (folder / "config.yaml").is_file() or any(folder.glob("round_[0-9][0-9]")):
        return [folder]
    return sorted({p.parent for p in folder.rglob("round_[0-9][0-9]") if p.is_dir()})


def upgrade(folder: Path | str) -> list[Path]:
    """Upgrade a run folder, or every run under a study or sweep folder (and the study's
    ``runs.csv`` / ``summary.csv`` columns); returns what was written or moved.

    Raises RunFolderError when ``folder`` holds no run, or a run is in use by another process.
    """
    folder = Path(folder)
    runs = runs_under(folder)
    if not runs:
        raise RunFolderError(f"{folder} holds no run folder (no round_NN/ inside): nothing to upgrade")
    done = [p for run in runs for p in upgrade_run(run)]
    for name in STUDY_TABLES:
        for p in sorted(folder.rglob(name)):
            if not any(run in p.parents for run in runs) and (new := _csv_header(p.read_text())) is not None:
                atomic_write_text(p, new)
                done.append(p)
    return done


def add_cli(p: argparse.ArgumentParser) -> None:
    """``steerheal upgrade FOLDER`` (the subparser ``cli`` made for it)."""
    p.add_argument("folder", help="a run folder, or a study/sweep folder (every run below it)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    done = upgrade(args.folder)
    for p in done:
        print(f"upgraded {p}", file=sys.stderr)
    print(f"{len(done)} files upgraded in {args.folder}" if done else f"{args.folder} already uses this version's names",
          file=sys.stderr)
    return 0
