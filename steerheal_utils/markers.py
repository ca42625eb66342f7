"""Step records that prove what they claim.

When a step has finished, the driver seals its record ``round_NN/.done/<step>.json``
(:func:`seal`): the sha256 of every input it read and every output it wrote (both as the
contract declares them), and the values of the config keys it uses. A record *holds* when

- every output is still there with the recorded hash (else: ``broken``),
- every input still has the hash the step read, the step that wrote the input holds, and the
  config in force for the round has the recorded values (else: ``stale``).

``steerheal run`` redoes a step whose record does not hold and says why; the report shows
only rounds whose records hold (:func:`rounds_that_hold`). A marker written before these
records existed (no ``schema``) is ``legacy``: it counts as holding, and ``run`` records the
files' hashes as they are now (:func:`adopt`), saying so.

Example:
    >>> chk = Checker("runs/tiny")                     # doctest: +SKIP
    >>> chk.status(1, "04_heal")                       # doctest: +SKIP
    Status(round=1, stage='04_heal', state='stale', reason='round_01/completions.jsonl changed since 04_heal read it ...')
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import contract
from .config import default
from .runfolder import RunFolderError, atomic_write_json, read_json, round_config

SCHEMA = 1
_NEW_IN_SCHEMA_1 = ("generated",)  # outputs an older layout did not write (03 rewrote 02's file in place)

_DIGESTS: dict[str, tuple[tuple, str]] = {}  # path -> (stat key, sha256): a file is hashed again only when it changed


def digest(path: Path | str) -> str:
    """sha256 of a file, remembered for as long as its size, mtime and inode stay the same."""
    path = Path(path)
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    hit = _DIGESTS.get(str(path))
    if hit and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _DIGESTS[str(path)] = (key, h.hexdigest())
    return h.hexdigest()


def _rel(run_dir: Path, p: Path) -> str:
    return p.relative_to(run_dir).as_posix()


def snapshot(run_dir: Path, p: Path, kind: str = "file") -> dict[str, str | None]:
    """``{run-relative path: sha256 or None when missing}``; a folder gives one entry per file
    (hidden names, i.e. temporary leftovers, excluded) and ``{"<dir>/": None}`` when missing."""
    run_dir = Path(run_dir)
    if kind == "file":
        return {_rel(run_dir, p): digest(p) if p.is_file() else None}
    if not p.is_dir():
        return {_rel(run_dir, p) + "/": None}
    out = {}
    for f in sorted(p.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts):
            out[_rel(run_dir, f)] = digest(f)
    return out or {_rel(run_dir, p) + "/": "empty"}


def input_snapshot(run_dir: Path | str, rnd: int, stage: str, cfg) -> dict[str, str | None]:
    """Hashes of everything step ``stage`` of round ``rnd`` reads: declared artifacts and the files
    named by its ``files`` config keys (e.g. a vignette JSONL)."""
    run_dir = Path(run_dir)
    out: dict[str, str | None] = {}
    for name, r in contract.inputs(stage, rnd):
        a = contract.artifact(name)
        out.update(snapshot(run_dir, contract.path(run_dir, r, name), a.kind))
    for key in contract.step(stage).files:
        value = getattr(cfg, key)
        if value:
            p = Path(value)
            out[f"{key}:{value}"] = digest(p) if p.is_file() else None
    return out


def output_snapshot(run_dir: Path | str, rnd: int, stage: str) -> dict[str, str | None]:
    run_dir = Path(run_dir)
    out: dict[str, str | None] = {}
    for name in contract.step(stage).writes:
        a = contract.artifact(name)
        if a.kind != "cache":
            out.update(snapshot(run_dir, contract.path(run_dir, rnd, name), a.kind))
    return out


def config_record(stage: str, cfg) -> dict[str, Any]:
    """The values of the config keys ``stage`` uses (NaN written as a string so that it compares)."""
    d = cfg.to_dict()
    return {k: _jsonable(d[k]) for k in contract.config_keys(stage)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def _missing(snap: dict[str, str | None]) -> list[str]:
    return [k for k, v in snap.items() if v is None]


# ------------------------------------------------------------------ sealing
def seal(run_dir: Path | str, rnd: int, stage: str, cfg, *, inputs_before: dict[str, str | None],
         seconds: float | None = None, by: str = "driver") -> dict:
    """Write the record of a finished step. Call it last, after every output is in place.

    Raises RunFolderError (nothing sealed) when a declared output is missing, or when an input
    changed while the step ran (the step read one version and the record would claim another).
    """
    run_dir = Path(run_dir)
    outputs = output_snapshot(run_dir, rnd, stage)
    missing = _missing(outputs)
    if missing:
        raise RunFolderError(f"round {rnd:02d} {stage} finished without writing {', '.join(missing)} (declared in "
                             "steerheal_utils/contract.py): not marked done; the step's code and the contract disagree")
    now = input_snapshot(run_dir, rnd, stage, cfg)
    changed = [k for k in now if now[k] != inputs_before.get(k)]
    if changed:
        raise RunFolderError(f"round {rnd:02d} {stage}: {', '.join(changed)} changed while the step ran (another "
                             "process wrote the run folder?): not marked done; re-run the same command to redo it")
    rec = {"stage": stage, "round": rnd, "schema": SCHEMA, "finished": time.time(), "by": by,
           "seconds": None if seconds is None else round(seconds, 2),
           "config": config_record(stage, cfg), "inputs": now, "outputs": outputs}
    atomic_write_json(contract.marker_path(run_dir, rnd, stage), rec)
    return rec


def adopt(run_dir: Path | str, rnd: int, stage: str, cfg) -> dict:
    """Turn a legacy marker into a record of the files as they are now (nothing is verified).

    Raises RunFolderError when a declared output is missing (the stage must run again then).
    """
    run_dir = Path(run_dir)
    old = read_json(contract.marker_path(run_dir, rnd, stage), "stage marker")
    outputs = output_snapshot(run_dir, rnd, stage)
    missing = [k for k in _missing(outputs) if not any(k == _rel(run_dir, contract.path(run_dir, rnd, n))
                                                       for n in _NEW_IN_SCHEMA_1)]
    if missing:
        raise RunFolderError(f"round {rnd:02d} {stage}: {', '.join(missing)} missing")
    rec = {**{k: old.get(k) for k in ("seconds", "finished")}, "stage": stage, "round": rnd, "schema": SCHEMA,
           "by": "adopted", "adopted": time.time(), "config": config_record(stage, cfg),
           "inputs": input_snapshot(run_dir, rnd, stage, cfg), "outputs": outputs}
    atomic_write_json(contract.marker_path(run_dir, rnd, stage), rec)
    return rec


# ------------------------------------------------------------------ checking
@dataclass(frozen=True)
class Status:
    round: int
    stage: str
    state: str  # ok | legacy | missing | broken | stale
    reason: str = ""

    @property
    def holds(self) -> bool:
        return self.state in ("ok", "legacy")

    @property
    def label(self) -> str:
        return f"round {self.round:02d} {self.stage}"


def _first_difference(recorded: dict, now: dict, who: str, verb: str) -> str | None:
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if a == b:
            continue
        name = k[:-1] if k.endswith("/") else k
        if b is None:
            return f"{name} is missing"
        if a is None:
            return f"{name} appeared after {who} {verb} it"
        return f"{name} changed since {who} {verb} it"
    return None


class Checker:
    """Statuses of a run folder's step records, each computed once (create a new Checker after
    anything was written). ``configs(rnd)`` gives the config in force for a round; default: the
    run folder's config history."""

    def __init__(self, run_dir: Path | str, configs=None):
        self.run_dir = Path(run_dir)
        self._configs = configs
        self._cfg_cache: dict[int, Any] = {}
        self._status: dict[tuple[int, str], Status] = {}

    def config(self, rnd: int):
        if rnd not in self._cfg_cache:
            if self._configs is not None:
                self._cfg_cache[rnd] = self._configs(rnd)
            else:
                self._cfg_cache[rnd] = round_config(self.run_dir, rnd)
        return self._cfg_cache[rnd]

    def loop(self, rnd: int) -> str:
        """The config's ``loop`` for round ``rnd`` (``rounds`` when the config cannot be read)."""
        try:
            return getattr(self.config(rnd), "loop", "rounds")
        except Exception:  # an unreadable config: _check says so; the order of steps is the round loop's
            return "rounds"

    def stages(self, rnd: int) -> tuple[str, ...]:
        """The steps of round ``rnd`` (``contract.loop_stages`` of its config's ``loop``)."""
        return contract.loop_stages(self.loop(rnd))

    def forget(self) -> None:
        """Drop computed statuses (after a step ran and sealed)."""
        self._status.clear()

    def rounds(self) -> list[int]:
        """Rounds that have a folder, in order."""
        out = []
        for d in sorted(self.run_dir.glob("round_[0-9][0-9]")):
            out.append(int(d.name[-2:]))
        return out

    def status(self, rnd: int, stage: str) -> Status:
        key = (rnd, stage)
        if key not in self._status:
            # A record depends only on earlier (round, step) records: fill those first, in order,
            # so that checking round 99 never recurses 500 records deep.
            for r in range(rnd + 1):
                for s in self.stages(r):
                    if (r, s) == key:
                        break
                    if (r, s) not in self._status:
                        self._status[r, s] = self._check(r, s)
            self._status[key] = self._check(rnd, stage)
        return self._status[key]

    def _check(self, rnd: int, stage: str) -> Status:
        mp = contract.marker_path(self.run_dir, rnd, stage)
        if not mp.exists():
            return Status(rnd, stage, "missing", "not run yet")
        try:
            rec = read_json(mp, "stage marker")
            if not isinstance(rec, dict):
                raise RunFolderError(f"corrupted stage marker {mp}: not a JSON object")
        except RunFolderError:
            return Status(rnd, stage, "broken", f"its marker {_rel(self.run_dir, mp)} is corrupted")
        for name, r in contract.inputs(stage, rnd):  # the steps it was built on must hold first
            up = self.status(r, contract.producer(name, self.loop(r)))
            if not up.holds:
                why = "has not run" if up.state == "missing" else f"does not hold ({up.reason})"
                return Status(rnd, stage, "stale", f"it was built on {up.label}, which {why}")
        if rec.get("schema") is None:
            return Status(rnd, stage, "legacy", "written before step records had hashes")
        if rec.get("schema") != SCHEMA or not all(isinstance(rec.get(k), dict) for k in ("inputs", "outputs", "config")):
            return Status(rnd, stage, "broken", f"its marker {_rel(self.run_dir, mp)} is not a step record this version reads")
        diff = _first_difference(rec["outputs"], output_snapshot(self.run_dir, rnd, stage), stage, "wrote")
        if diff:
            return Status(rnd, stage, "broken", diff)
        try:
            cfg = self.config(rnd)
        except Exception as e:  # an unreadable config / history: nothing can hold
            return Status(rnd, stage, "stale", f"the config for round {rnd} cannot be read ({e})")
        diff = _first_difference(rec["inputs"], input_snapshot(self.run_dir, rnd, stage, cfg), stage, "read")
        if diff:
            return Status(rnd, stage, "stale", diff)
        changed = config_changes(rec["config"], config_record(stage, cfg))
        if changed:
            return Status(rnd, stage, "stale", "the config changed (" + "; ".join(changed[:4]) +
                          (f"; {len(changed) - 4} more" if len(changed) > 4 else "") + ")")
        return Status(rnd, stage, "ok")

    def round_holds(self, rnd: int) -> bool:
        return all(self.status(rnd, s).holds for s in self.stages(rnd))

    def problems(self) -> list[Status]:
        """Records that exist but do not hold, in round and step order."""
        out = []
        for r in self.rounds():
            for s in self.stages(r):
                st = self.status(r, s)
                if st.state in ("broken", "stale"):
                    out.append(st)
        return out


_ABSENT = object()


def config_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each key whose value differs from the step record's.

    A key the record does not have is a knob added after the step ran. Every knob is added with
    the old behaviour as its default, so when its value now is that default the step did what
    it would do today, and the key does not count as a change (else adding a knob would make
    every earlier run redo its steps).

    Example:
        >>> config_changes({"dose": 0.1}, {"dose": 0.1, "axis_prompts": ""})
        []
        >>> config_changes({"dose": 0.1}, {"dose": 0.2, "axis_prompts": "love.jsonl"})
        ['dose: 0.1 -> 0.2', "axis_prompts: (not recorded) -> 'love.jsonl'"]
    """
    out = []
    for k, v in now.items():
        old = recorded.get(k, _ABSENT)
        if old is _ABSENT:
            if v != _jsonable(default(k)):
                out.append(f"{k}: (not recorded) -> {v!r}")
        elif old != v:
            out.append(f"{k}: {old!r} -> {v!r}")
    return out


def first_incomplete_round(run_dir: Path | str, configs=None) -> int:
    """The first round not every step of which holds (a config change applies from there on)."""
    chk = Checker(run_dir, configs)
    r = 0
    while r <= contract.MAX_ROUND and contract.round_dir(run_dir, r).is_dir() and chk.round_holds(r):
        r += 1
    return r


def rounds_that_hold(run_dir: Path | str) -> list[int]:
    """Rounds whose 05_eval record holds (hence everything it was built on), in order.

    A 05_eval running in this very process (the notebook draws the trajectory before the driver
    seals it) counts when everything it reads holds and its eval file exists.
    """
    chk = Checker(run_dir)
    out = [r for r in chk.rounds() if chk.status(r, "05_eval").holds]
    cur = _running_eval(Path(run_dir))
    if cur is not None and cur not in out and contract.path(run_dir, cur, "eval").exists() and all(
            chk.status(r, contract.producer(n, chk.loop(r))).holds for n, r in contract.inputs("05_eval", cur)):
        out = sorted(out + [cur])
    return out


def _running_eval(run_dir: Path) -> int | None:
    from . import stage

    ctx = stage.current()
    if ctx is None or ctx.stage != "05_eval" or ctx.mode not in ("driver", "journal", "replace"):
        return None
    try:
        same = os.path.samefile(ctx.run_dir, run_dir)
    except OSError:
        return None
    return ctx.round if same else None
