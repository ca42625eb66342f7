"""Shared fixtures: tiny random-init models of real architectures around a real tokenizer."""

import os
import sys
from pathlib import Path

import nbformat

import pytest
import torch

# Keep test runs hermetic: no hub access, and a cache that tests may write to.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models are overhead-bound: one thread is as fast, deterministic, and does not thrash
# when the machine is shared (two threads made tiny-model tests ~12x slower under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama():
    from steerheal_utils.models import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3():
    from steerheal_utils.models import tiny_model

    return tiny_model("gemma3", seed=0)


@pytest.fixture(params=["llama", "gemma3"])
def tiny(request, tiny_llama, tiny_gemma3):
    """Both architectures, one test each."""
    return {"llama": tiny_llama, "gemma3": tiny_gemma3}[request.param]


@pytest.fixture
def python_exe():
    return sys.executable


def write_nb(path: Path, code: str) -> None:
    """A stage notebook of one code cell after the parameters cell (fake stages for driver tests)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('run_dir = "x"\nround = 0')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)


# Fake stages must still write what the contract says their step writes, or the driver refuses
# to mark them done: this line does it (dummy bytes; a folder artifact gets one file). The eval
# record gets an empty ``conditions`` so that the report after the run reads it as this version's.
FAKE_OUTPUTS = (
    "from steerheal_utils import contract as _c, runfolder as _r\n"
    "for _n in _c.step(ctx.stage).writes:\n"
    "    _p = ctx.artifact(_n)\n"
    "    _extra = ', \"conditions\": {}' if _n == 'eval' else ''\n"
    "    _r.atomic_write_text(_p / 'x' if _c.artifact(_n).kind != 'file' else _p, '{\"fake\": \"%s\"%s}\\n' % (_n, _extra))\n")


def fake_round(run: Path, rnd: int, cfg, stages=None, tag: str = "") -> None:
    """Write every declared output of ``stages`` of round ``rnd`` (text naming it) and seal each
    step, as the driver does after a notebook succeeded: a run folder without any model."""
    from steerheal_utils import contract, markers
    from steerheal_utils.runfolder import atomic_write_text

    for s in stages or contract.STAGES:
        before = markers.input_snapshot(run, rnd, s, cfg)
        for n in contract.step(s).writes:
            p = contract.path(run, rnd, n)
            if contract.artifact(n).kind == "file":
                atomic_write_text(p, f"{n} of round {rnd}{tag}\n")
            else:
                atomic_write_text(p / "weights.safetensors", f"{n} of round {rnd}{tag}\n")
        markers.seal(run, rnd, s, cfg, inputs_before=before)
