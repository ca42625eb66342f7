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
"""

from __future__ import annotations

import contextlib
import json
import os
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
    if not isinstance(rnd, int) or rnd < 0 or rnd > 99:
        raise RunFolderError(f"round must be an integer in 0..99, got {rnd!r}")
    return Path(run_dir) / f"round_{rnd:02d}"


def safe_child(parent: Path, name: str) -> Path:
    """``parent/name``, refusing names that would escape ``parent`` (``..``, absolute paths)."""
    parent = Path(parent).resolve()
    child = (parent / name).resolve()
    if child != parent and parent not in child.parents:
        raise RunFolderError(f"{name!r} would write outside {parent}")
    return child


# ------------------------------------------------------------------ atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path | str, what: str | None = None) -> Any:
    """Load JSON with an error that names the file and what it should have been."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"missing {what or 'file'}: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"corrupted {what or 'file'} {path}: {e}. Delete it and re-run the stage that writes it.") from None


def read_jsonl(path: Path | str, what: str | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"missing {what or 'file'}: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RunFolderError(f"corrupted {what or 'file'} {path} line {i}: {e}") from None
    return rows


# ------------------------------------------------------------------ stage markers
def marker_path(run_dir: Path | str, rnd: int, stage: str) -> Path:
    return round_dir(run_dir, rnd) / ".done" / f"{stage}.json"


def is_done(run_dir: Path | str, rnd: int, stage: str) -> bool:
    return marker_path(run_dir, rnd, stage).exists()


def mark_done(run_dir: Path | str, rnd: int, stage: str, info: dict | None = None) -> None:
    """Record a finished stage. Call it last: everything the stage wrote is already in place."""
    atomic_write_json(marker_path(run_dir, rnd, stage), {"stage": stage, "round": rnd, "finished": time.time(), **(info or {})})


def clear_done(run_dir: Path | str, rnd: int, stage: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        marker_path(run_dir, rnd, stage).unlink()


def done_rounds(run_dir: Path | str) -> list[int]:
    """Rounds whose every existing stage marker is present, in order."""
    out = []
    for d in sorted(Path(run_dir).glob("round_[0-9][0-9]")):
        if (d / ".done" / "05_eval.json").exists():
            out.append(int(d.name[-2:]))
    return out
