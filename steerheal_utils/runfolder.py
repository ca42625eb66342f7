"""The run folder contract, and writing it so that a crash never leaves half a file.

Layout (other tools and tests read it)::

    DIR/config.yaml                  resolved config + provenance (_meta)
    DIR/metrics.csv                  one row per (round, stage), rebuilt from eval.json files
    DIR/report.html, trajectory.png  the run report
    DIR/round_NN/01_vector.ipynb ... executed stage notebooks (the lab journal)
    DIR/round_NN/vector.safetensors  steering vector (one tensor per layer)
    DIR/round_NN/completions.jsonl   generated rows with filter scores
    DIR/round_NN/adapter/            peft LoRA adapter of this round
    DIR/round_NN/eval.json           every eval of this round
    DIR/round_NN/.done/<stage>.json  completion marker, written last

Every artifact is written to a temporary name in the same folder and renamed into
place (``os.replace`` is atomic on POSIX), so a reader sees the old file or the new one.
A crash (even SIGKILL) can leave only hidden ``.<name>.*.tmp`` leftovers, which the driver
removes on the next start (:func:`clean_temp_files`, under the run folder's lock).
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

_UMASK = os.umask(0)
os.umask(_UMASK)

STAGES = ("01_vector", "02_generate", "03_filter", "04_heal", "05_eval")


class RunFolderError(RuntimeError):
    """A run folder that is missing, inconsistent or unsafe to write."""


def round_dir(run_dir: Path | str, rnd: int) -> Path:
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0 or rnd > 99:
        raise RunFolderError(f"round must be an integer in 0..99, got {rnd!r}")
    return Path(run_dir) / f"round_{rnd:02d}"


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
    old = None
    try:
        yield tmp
        if path.exists():
            # Two renames, not one: os.replace cannot replace a non-empty folder. A crash
            # between them leaves the old folder under a hidden .old name and no `path`;
            # the stage that owns `path` is then not marked done and runs again.
            old = path.with_name(f".{path.name}.{os.getpid()}-{time.time_ns()}.old.tmp")
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


_REDO = ("To redo the stage that wrote it, delete that stage's marker (round_NN/.done/<stage>.json) "
         "and re-run the same command: it and everything after it run again.")


def read_json(path: Path | str, what: str | None = None) -> Any:
    """Load JSON with an error that names the file and what it should have been."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"missing {what or 'file'}: {path}. {_REDO}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"corrupted {what or 'file'} {path}: {e}. {_REDO}") from None


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


# ------------------------------------------------------------------ stage markers
def marker_path(run_dir: Path | str, rnd: int, stage: str) -> Path:
    if stage not in STAGES:
        raise RunFolderError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return round_dir(run_dir, rnd) / ".done" / f"{stage}.json"


def is_done(run_dir: Path | str, rnd: int, stage: str) -> bool:
    return marker_path(run_dir, rnd, stage).exists()


def mark_done(run_dir: Path | str, rnd: int, stage: str, info: dict | None = None) -> None:
    """Record a finished stage. Call it last: everything the stage wrote is already in place."""
    atomic_write_json(marker_path(run_dir, rnd, stage), {"stage": stage, "round": rnd, "finished": time.time(), **(info or {})})


def clear_done(run_dir: Path | str, rnd: int, stage: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        marker_path(run_dir, rnd, stage).unlink()


def invalidate_after(run_dir: Path | str, rnd: int, stage: str) -> list[Path]:
    """Remove the markers of everything downstream of (``rnd``, ``stage``) before it runs again.

    A stage re-runs only when its marker is missing (a crash, or the user deleted it to redo
    it); every later stage of that round and every later round was built on its old output,
    so none of them may count as done any more. A ``stop.json`` from this round or later is
    removed too (the round's eval decides again). Returns the markers removed.
    """
    run_dir = Path(run_dir)
    removed = []
    later = STAGES[STAGES.index(stage) + 1:]
    for d in sorted(run_dir.glob("round_[0-9][0-9]")):
        r = int(d.name[-2:])
        for s in (later if r == rnd else STAGES if r > rnd else ()):
            m = marker_path(run_dir, r, s)
            if m.exists():
                m.unlink()
                removed.append(m)
    stop = run_dir / "stop.json"
    with contextlib.suppress(RunFolderError, AttributeError, TypeError):
        if stop.exists() and read_json(stop).get("round", 0) >= rnd:
            stop.unlink()
    return removed


def done_rounds(run_dir: Path | str) -> list[int]:
    """Rounds whose every existing stage marker is present, in order."""
    out = []
    for d in sorted(Path(run_dir).glob("round_[0-9][0-9]")):
        if (d / ".done" / "05_eval.json").exists():
            out.append(int(d.name[-2:]))
    return out


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
    (``.<name>.<8 random chars>.tmp``, ``.<name>.<pid>-<ns>.old.tmp``), and only while holding
    :func:`run_lock`: nobody else is writing then. Returns what was removed.
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


_TEMP_NAME = re.compile(r"^\..+\.([a-z0-9_]{8}|\d+-\d+\.old)\.tmp$")
