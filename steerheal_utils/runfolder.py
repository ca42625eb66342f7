"""Writing a run folder so that a crash never leaves half a file; its lock; its config history.

What lives where is declared in :mod:`steerheal_utils.contract` (the run folder's layout is
generated from it); what proves a step's files are the ones it wrote is in
:mod:`steerheal_utils.markers`.

Every artifact is written to a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on POSIX), so a reader sees the old file or the new one.
A crash (even SIGKILL) can leave only hidden ``.<name>.shtmp-*.tmp`` leftovers, which the
driver removes on the next start (:func:`clean_temp_files`, under the run folder's lock);
nothing else is ever removed by it.

Config history: ``config.yaml`` holds the config the next step runs with;
``config_history.jsonl`` holds every config the run has used, one JSON line each with the
round it applies from (``--override-config`` appends; nothing is rewritten).
:func:`round_config` gives the config in force for a round.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .contract import STAGES, marker_path, round_dir  # noqa: F401  (re-exported: the names callers know)

_UMASK = os.umask(0)
os.umask(_UMASK)

TEMP_TAG = ".shtmp-"  # in every temporary name this module makes, and only those are ever cleaned


class RunFolderError(RuntimeError):
    """A run folder that is missing, inconsistent or unsafe to write."""


def safe_child(parent: Path | str, name: str | os.PathLike) -> Path:
    """``parent/name``, refusing names that would escape ``parent`` (``..``, absolute paths, symlinks).

    Every place that joins a name it did not choose itself (a stage, a file name from a
    caller) into the run folder goes through here; the run folder itself is the user's choice.
    """
    name = os.fspath(name)
    if not name or "\x00" in name:
        raise RunFolderError(f"{name!r} is not a valid file name")
    real = Path(parent).resolve()
    child = (real / name).resolve()
    if child == real or real not in child.parents:
        raise RunFolderError(f"{name!r} would write outside {parent}")
    return Path(parent) / name


# ------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a part.

    On any error (a full disk raises ``OSError(ENOSPC)`` from write, flush or fsync) the
    temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_TAG}", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _explain_disk_full(e, path)
        raise
    _fsync_dir(path.parent)


def _explain_disk_full(e: BaseException, path: Path) -> None:
    """Add where it happened to a bare ``[Errno 28] No space left on device``."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC and not e.filename:
        e.filename = str(path)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def atomic_write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on error it is removed.

    Example:
        >>> with atomic_dir(run / "round_00" / "adapter") as tmp:   # doctest: +SKIP
        ...     model.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TEMP_TAG}", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    old = None
    try:
        yield tmp
        for f in tmp.rglob("*"):  # libraries (peft, safetensors) may write 0600 files: artifacts are shared
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)
        if path.exists():
            # Two renames, not one: os.replace cannot replace a non-empty folder. A crash
            # between them leaves the old folder under a hidden .old name and no `path`;
            # the stage that owns `path` is then not marked done and runs again.
            old = path.with_name(f".{path.name}{TEMP_TAG}{os.getpid()}-{time.time_ns()}.old.tmp")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)  # put the previous version back
        _explain_disk_full(e, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


_REDO = ("Re-run the same `steerheal run` command: it finds the step whose file this is, says so and redoes it "
         "(and every step built on it).")


def read_json(path: Path | str, what: str | None = None) -> Any:
    """Load JSON with an error that names the file and what it should have been."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"missing {what or 'file'}: {path}. {_REDO}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"corrupted {what or 'file'} {path}: {e}. {_REDO}") from None


def read_cached(path: Path | str, fingerprint: str, keys: Iterable[str] = ()) -> dict | None:
    """A saved result (a JSON object with a ``fingerprint``) when its fingerprint is ``fingerprint``
    and it has every key in ``keys``; None when it is missing, unreadable, stale or incomplete (the
    caller then computes it again, so a damaged cache costs time, never a wrong number)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("fingerprint") != fingerprint or any(k not in doc for k in keys):
        return None
    return doc


def read_jsonl(path: Path | str, what: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"missing {what or 'file'}: {path}. {_REDO}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunFolderError(f"corrupted {what or 'file'} {path}: {e}. {_REDO}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RunFolderError(f"corrupted {what or 'file'} {path} line {i}: {e}. {_REDO}") from None
    return rows


# ------------------------------------------------------------------ stage markers (sealed by markers.seal)
def is_done(run_dir: Path | str, rnd: int, stage: str) -> bool:
    """A marker exists (whether it still holds is :class:`markers.Checker`'s question)."""
    return marker_path(run_dir, rnd, stage).exists()


def clear_done(run_dir: Path | str, rnd: int, stage: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        marker_path(run_dir, rnd, stage).unlink()


# ------------------------------------------------------------------ one writer per run folder
@contextlib.contextmanager
def run_lock(run_dir: Path | str) -> Iterator[None]:
    """Hold ``run_dir/.lock`` for as long as a driver works in the folder.

    A second driver on the same folder is refused at once (two writers would interleave
    stages); runs in different folders never touch each other's lock. The kernel drops the
    lock when the holder dies, so a killed run never blocks its own resume.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunFolderError(f"{run_dir} is in use by another steerheal process (pid {holder}); "
                                 "wait for it to finish or use another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def clean_temp_files(run_dir: Path | str) -> list[Path]:
    """Remove leftovers of interrupted atomic writes in ``run_dir`` and its ``round_NN`` folders.

    Only names made by :func:`atomic_write_bytes` / :func:`atomic_dir` are touched
    (``.<name>.shtmp-<8 random chars>.tmp``, ``.<name>.shtmp-<pid>-<ns>.old.tmp``: a user's
    ``.notes.12345678.tmp`` is left alone), and only while holding :func:`run_lock`: nobody
    else is writing then. Returns what was removed.
    """
    run_dir = Path(run_dir)
    found = [p for p in run_dir.iterdir() if _TEMP_NAME.match(p.name)] if run_dir.is_dir() else []
    for d in sorted(run_dir.glob("round_[0-9][0-9]")):
        found += [p for p in d.rglob(".*.tmp") if _TEMP_NAME.match(p.name)]
    removed = []
    for p in sorted(found, key=lambda p: len(p.parts)):  # parents first; their children go with them
        if any(q in p.parents for q in removed):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_TAG) + r"([a-z0-9_]{8}|\d+-\d+\.old)\.tmp$")


# ------------------------------------------------------------------ config history
def read_config_history(run_dir: Path | str) -> list[dict]:
    """Entries of ``config_history.jsonl`` in the order they were appended ([] when there is none)."""
    from .contract import run_path

    p = run_path(run_dir, "config_history")
    if not p.exists():
        return []
    rows = read_jsonl(p, "config history")
    for i, e in enumerate(rows, 1):
        if not isinstance(e, dict) or not isinstance(e.get("config"), dict) or not isinstance(e.get("from_round"), int):
            raise RunFolderError(f"corrupted config history {p} line {i}: each line needs from_round and config")
    return rows


def _history_config(entry: dict, where: Path):
    from . import config as C

    try:
        return C.validate(entry["config"])
    except C.ConfigError as e:
        raise RunFolderError(f"corrupted config history {where}: an entry does not validate ({e})") from None


def round_config(run_dir: Path | str, rnd: int):
    """The config in force for round ``rnd``: the last appended history entry that applies from
    ``rnd`` or earlier (a later override supersedes every earlier one from its round on).
    A run folder without a history (made by an older version) has only ``config.yaml``."""
    from . import config as C
    from .contract import run_path

    hist = read_config_history(run_dir)
    for e in reversed(hist):
        if e["from_round"] <= rnd:
            return _history_config(e, run_path(run_dir, "config_history"))
    return C.load_config(run_path(run_dir, "config"))


def latest_config(run_dir: Path | str):
    """The config the next step runs with (the history's last entry, else config.yaml); None in a new folder."""
    from . import config as C
    from .contract import run_path

    hist = read_config_history(run_dir)
    if hist:
        return _history_config(hist[-1], run_path(run_dir, "config_history"))
    p = run_path(run_dir, "config")
    return C.load_config(p) if p.exists() else None


def record_config(run_dir: Path | str, cfg, from_round: int, meta: dict, changes: list[str] | None = None) -> None:
    """Append ``cfg`` to the history (applying from ``from_round``) and write it as ``config.yaml``.

    A folder that has a config.yaml but no history (an older version made it) gets its first
    entry from that file first, so the past stays on record.
    """
    from . import config as C
    from .contract import run_path

    run_dir = Path(run_dir)
    hist_path, cfg_path = run_path(run_dir, "config_history"), run_path(run_dir, "config")
    hist = read_config_history(run_dir)
    if not hist and cfg_path.exists() and changes is not None:
        with contextlib.suppress(C.ConfigError):
            hist.append({"from_round": 0, "time": None, "changes": None, "note": "config.yaml of an older run folder",
                         "config": C.load_config(cfg_path).to_dict()})
    hist.append({"from_round": from_round, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes,
                 "git_commit": meta.get("git_commit"), "config": cfg.to_dict()})
    atomic_write_jsonl(hist_path, hist)
    C.save_config(cfg, cfg_path, {**meta, "history": f"{hist_path.name} ({len(hist)} entries; this config applies "
                                               f"from round {from_round})"})
