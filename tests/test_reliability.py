"""Fault injection: every way a long run can go wrong ends in a clear message and a run
folder from which the same command continues (issue #6).

Foundation-level tests come first (seconds each, no kernel); the driver tests that start
notebook kernels are few and use fake one-cell stages; the end-to-end tests on the `tiny`
preset (kill -9 during 04_heal and resume, NaN, starvation, coherence floor, truncated
adapter) are at the end.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from conftest import FAKE_OUTPUTS, fake_round, write_nb
import torch

from steerheal_utils import config as C
from steerheal_utils import contract, markers
from steerheal_utils import embedded as E
from steerheal_utils import models as M
from steerheal_utils import runfolder as R
from steerheal_utils import stage
from steerheal_utils.cli import explain
from steerheal_utils.vector import SteeringVector

REPO = Path(__file__).resolve().parent.parent


def cli_env(tmp_path: Path, notebooks: Path | None = None, cache: Path | None = None) -> dict:
    # One thread per kernel: tiny models are overhead-bound, and the machine is shared.
    env = {**os.environ, "STEERHEAL_CACHE": str(cache or tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if notebooks is not None:
        env["STEERHEAL_NOTEBOOKS"] = str(notebooks)
    return env


def run_cli(args, tmp_path, notebooks=None, cache=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "steerheal_utils", *args], capture_output=True, text=True,
                          env=cli_env(tmp_path, notebooks, cache), timeout=timeout, cwd=REPO)


def assert_one_clear_error(r, *needles, code=1):
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-3000:])


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# ====================================================================== papermill parameters
def test_stage_parameters_wrong_type_unknown_name_out_of_range(tmp_path):
    C.save_config(C.resolve("tiny"), tmp_path / "config.yaml")
    base = {"run_dir": str(tmp_path), "round": 0}
    bad = [({"round": "1"}, "round"), ({"round": True}, "round"), ({"round": 100}, "round"),
           ({"run_dir": None}, "run_dir"), ({"top_p": 2.0}, "top_p: 2.0 is out of range"),
           ({"temprature": 0.5}, "Did you mean temperature"), ({"lora_r": "four"}, "lora_r: expected an integer"),
           ({"kl_agg": "median"}, "kl_agg: 'median' is not one of"), ({"layers": "x"}, "layers[0]")]
    for extra, msg in bad:
        with pytest.raises(C.ConfigError, match=msg.replace("[", r"\[")):
            stage.open_stage("02_generate", {**base, **extra})
    # a missing preset for a new run folder is a config error too
    with pytest.raises(C.ConfigError, match="unknown preset"):
        stage.open_stage("01_vector", {"run_dir": str(tmp_path / "new"), "round": 0, "preset": "huge"})
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_rerun_of_open_stage_cell_ignores_the_notebooks_own_variables(tmp_path):
    """In JupyterLab the namespace also holds ctx, rows...: a re-run must not call them unknown keys,
    while a fresh kernel (papermill) still refuses an unknown name."""
    C.save_config(C.resolve("tiny"), tmp_path / "config.yaml")
    ns = {"run_dir": str(tmp_path), "round": 0}
    ctx = stage.open_stage("03_filter", ns)
    ns.update(ctx=ctx, rows=[{"a": 1}], n_kept=3)
    again = stage.open_stage("03_filter", ns)
    assert again.cfg == ctx.cfg
    with pytest.raises(C.ConfigError, match="rows"):
        stage.open_stage("03_filter", {"run_dir": str(tmp_path), "round": 0, "rows": [1]})


def test_papermill_injected_bad_parameter_fails_before_any_model_loads(tmp_path, monkeypatch):
    """The real 01_vector notebook, a bad value injected by papermill: the stage stops at
    open_stage, with ConfigError naming the key, and writes nothing."""
    import papermill as pm

    from steerheal_utils.driver import kernel_name

    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))  # kernel_name() extends it
    kernel = kernel_name()
    run = tmp_path / "run"
    C.save_config(C.resolve("tiny"), run / "config.yaml")
    out = tmp_path / "out.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as ei:
        pm.execute_notebook(str(REPO / "notebooks" / "01_vector.ipynb"), str(out), kernel_name=kernel,
                            parameters={"run_dir": str(run), "round": 0, "n_contexts": 1}, progress_bar=False)
    assert ei.value.ename == "ConfigError" and "n_contexts: 1 is out of range" in ei.value.evalue
    assert not (run / "round_00" / "vector.safetensors").exists()
    nb = nbformat.read(out, as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert len(failed) == 1 and "open_stage" in failed[0].source


def test_hand_run_in_a_kernel_needs_an_existing_run_dir_and_a_fixed_hash_seed(tmp_path, monkeypatch):
    """Papermill stands in for JupyterLab: a kernel started without the driver."""
    import papermill as pm

    from steerheal_utils.driver import init_run, kernel_name

    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))
    seeded = kernel_name()  # PYTHONHASHSEED=0, as the driver's kernels
    nb = str(REPO / "notebooks" / "01_vector.ipynb")
    with pytest.raises(pm.PapermillExecutionError) as ei:
        pm.execute_notebook(nb, str(tmp_path / "a.ipynb"), kernel_name=seeded, progress_bar=False,
                            parameters={"run_dir": str(tmp_path / "runs" / "tpyo"), "round": 0})
    assert ei.value.ename == "ConfigError" and "tpyo does not exist" in ei.value.evalue
    assert not (tmp_path / "runs").exists()
    run = tmp_path / "run"
    init_run(run, C.resolve("tiny"))
    monkeypatch.setenv("PYTHONHASHSEED", "random")  # what a plain JupyterLab kernel has
    with pytest.raises(pm.PapermillExecutionError) as ei:
        pm.execute_notebook(nb, str(tmp_path / "b.ipynb"), kernel_name="python3", progress_bar=False,
                            parameters={"run_dir": str(run), "round": 0})
    assert ei.value.ename == "ConfigError" and "PYTHONHASHSEED=0" in ei.value.evalue
    assert not (run / "round_00" / "vector.safetensors").exists()


# ====================================================================== model load errors
@pytest.mark.parametrize("model, needles", [
    ("org/no-such-model-xyz", ["'org/no-such-model-xyz'", "no network? or a misspelt id", "smollm2-135m-instruct", "local folder"]),
    ("/nonexistent/folder/model", ["'/nonexistent/folder/model'", "no such folder", "smollm2-135m-instruct"]),
    ("tiny:gpt2", ["'tiny:gpt2'", "tiny:llama"]),
])
def test_unloadable_model_gives_one_message_and_writes_nothing(tmp_path, model, needles):
    run = tmp_path / "run"
    r = run_cli(["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run), "--set", f"model={model}"], tmp_path)
    assert_one_clear_error(r, "model error:", *needles)
    assert not run.exists()  # checked before the run folder (and its config) was created


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(M.ModelLoadError, match="no config.json"):
        M.check_model(str(tmp_path / "weights"))


def test_gated_and_remote_code_errors_are_explained():
    gated = M._explain_load_error("google/gemma-3-4b-it", OSError("You are trying to access a gated repo. 401 Client Error"))
    assert "gated" in gated and "hf auth login" in gated and "smollm2-135m-instruct" in gated
    remote = M._explain_load_error("x/y", ValueError("requires you to execute code; set trust_remote_code=True"))
    assert "trust_remote_code=true only if you trust it" in remote


def test_trust_remote_code_is_off_by_default_and_passed_through(tmp_path, monkeypatch):
    import transformers

    assert C.Config().trust_remote_code is False
    assert all(C.resolve(p).trust_remote_code is False for p in C.PRESETS)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")  # only safetensors folders get as far as transformers
    seen = []

    class Stop(Exception):
        pass

    def fake(*args, **kw):
        seen.append(kw.get("trust_remote_code", "absent"))
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    for cfg in (C.resolve("tiny", {"model": str(folder)}), C.resolve("tiny", {"model": str(folder), "trust_remote_code": True})):
        with pytest.raises(M.ModelLoadError):
            M.load_round_model(cfg, None, 0)
        with pytest.raises(M.ModelLoadError):
            M.check_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    assert seen == [False, False, True, True]


def test_cli_explains_known_failures_and_keeps_traces_for_bugs():
    from steerheal_utils.driver import LoopError

    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "/runs/x/metrics.csv"
    assert "disk full while writing /runs/x/metrics.csv" in explain(full) and "re-run the same command" in explain(full)
    assert explain(FloatingPointError("loss is nan")).startswith("numerical error (NaN or inf): loss is nan")
    assert explain(R.RunFolderError("corrupted x")) == "run folder error: corrupted x"
    assert explain(E.EmbeddedModelError("bad hash")).startswith("model error:")
    assert explain(LoopError("round 00 04_heal failed")) == "error: round 00 04_heal failed"
    assert explain(KeyError("bug")) is None and explain(TypeError("bug")) is None


def test_rounds_out_of_range_is_a_config_error(tmp_path):
    r = run_cli(["run", "--preset", "tiny", "--rounds", "101", "--run-dir", str(tmp_path / "r")], tmp_path)
    assert_one_clear_error(r, "rounds", "1..100", code=2)
    assert not (tmp_path / "r").exists()


# ====================================================================== atomic writes, ENOSPC
class _FullDisk:
    """A file object that writes half of what it is given, then reports a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_enospc_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    target = tmp_path / "round_00" / "eval.json"
    R.atomic_write_json(target, {"old": True})
    if where == "write":
        real = os.fdopen
        monkeypatch.setattr(R.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    else:
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(R.os, "fsync", fsync)
    with pytest.raises(OSError) as ei:
        R.atomic_write_json(target, {"new": "x" * 10000})
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(target)  # the message says where
    assert json.loads(target.read_text()) == {"old": True}
    assert temp_leftovers(tmp_path) == []
    monkeypatch.undo()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = C.resolve("tiny")
    R.atomic_write_bytes(contract.path(tmp_path, 0, "vector"), b"v")
    before = markers.input_snapshot(tmp_path, 0, "01_vector", cfg)
    monkeypatch.setattr(R.os, "fsync", full)
    with pytest.raises(OSError):  # a record's write fails the same way: the stage stays not-done
        markers.seal(tmp_path, 0, "01_vector", cfg, inputs_before=before)
    assert not R.is_done(tmp_path, 0, "01_vector") and temp_leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "round_00" / "adapter"
    with R.atomic_dir(target) as d:
        (d / "adapter_model.safetensors").write_bytes(b"old")
    # ENOSPC while the new folder is being written
    with pytest.raises(OSError):
        with R.atomic_dir(target) as d:
            (d / "adapter_model.safetensors").write_bytes(b"new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    assert temp_leftovers(tmp_path) == []
    # the second rename fails: the previous folder is put back
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(R.os, "replace", flaky)
    with pytest.raises(OSError):
        with R.atomic_dir(target) as d:
            (d / "adapter_model.safetensors").write_bytes(b"new")
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    assert temp_leftovers(tmp_path) == []


def test_clean_temp_files_removes_only_interrupted_writes(tmp_path):
    rd = tmp_path / "round_00"
    (rd / "adapter").mkdir(parents=True)
    mine = [rd / ".completions.jsonl.shtmp-ab12cd_9.tmp", rd / ".done" / ".04_heal.json.shtmp-zzzzzzzz.tmp",
            tmp_path / ".metrics.csv.shtmp-k3j4h5g6.tmp", rd / ".adapter.shtmp-123-456.old.tmp"]
    for p in mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if p.name.endswith("old.tmp") else p.write_text("half")
    (rd / ".adapter.shtmp-q1w2e3r4.tmp").mkdir()
    (rd / ".adapter.shtmp-q1w2e3r4.tmp" / "adapter_model.safetensors").write_text("half")
    # a user's files named like temporary files of other tools are never touched
    keep = [rd / "completions.jsonl", tmp_path / "notes.tmp", tmp_path / "elsewhere" / ".x.shtmp-abcdefgh.tmp",
            tmp_path / ".notes.12345678.tmp", rd / ".mine.123-456.old.tmp", rd / ".draft.ab12cd_9.tmp"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("keep")
    removed = R.clean_temp_files(tmp_path)
    assert len(removed) == 5
    assert all(not p.exists() for p in mine) and not (rd / ".adapter.shtmp-q1w2e3r4.tmp").exists()
    assert all(p.exists() for p in keep) and (rd / "adapter").is_dir()


def test_temp_names_of_atomic_writes_are_what_the_cleaner_removes(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(R.os, "replace", lambda a, b: (seen.extend([Path(a).name, Path(b).name]), real(a, b))[1])
    R.atomic_write_text(tmp_path / "round_00" / "x.json", "{}")
    with R.atomic_dir(tmp_path / "round_00" / "adapter") as d:
        (d / "w").write_text("1")
    with R.atomic_dir(tmp_path / "round_00" / "adapter") as d:  # replacing: the old folder moves aside first
        (d / "w").write_text("2")
    hidden = [n for n in seen if n.startswith(".")]  # two temp files/folders, the old folder, a temp folder
    assert len(hidden) == 4 and all(R._TEMP_NAME.match(n) for n in hidden), seen


def test_corrupt_json_and_jsonl_name_the_file(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text('{"care": 0.1, "auth')  # truncated
    with pytest.raises(R.RunFolderError, match=f"corrupted eval results {p}"):
        R.read_json(p, "eval results")
    q = tmp_path / "completions.jsonl"
    q.write_bytes(b'{"id": 1}\n{"id": \xff\xfe')
    with pytest.raises(R.RunFolderError, match=str(q)):
        R.read_jsonl(q, "completions")


# ====================================================================== run folder markers and lock
def _run_of_two_rounds(tmp_path, **over):
    from steerheal_utils.driver import init_run

    run = tmp_path / "run"
    cfg = C.resolve("tiny", over)
    init_run(run, cfg)
    fake_round(run, 0, cfg)
    fake_round(run, 1, cfg)
    return run, cfg


def _states(run) -> dict:
    chk = markers.Checker(run)
    return {(r, s): chk.status(r, s).state for r in chk.rounds() for s in R.STAGES}


def test_sealed_records_hold_and_a_missing_output_is_named(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    assert set(_states(run).values()) == {"ok"} and markers.rounds_that_hold(run) == [0, 1]
    rec = json.loads(R.marker_path(run, 0, "05_eval").read_text())
    assert set(rec["inputs"]) == {"round_00/adapter/weights.safetensors", "round_00/vector.safetensors",
                                  "round_00/generate.json"}
    assert set(rec["outputs"]) == {"round_00/eval.json", "round_00/eval_rows.jsonl"} and rec["config"]["coh_floor"] == 0.0
    (run / "round_00" / "eval.json").unlink()
    st = markers.Checker(run).status(0, "05_eval")
    assert (st.state, st.reason) == ("broken", "round_00/eval.json is missing")
    # round 1's eval was built on round 0's (its deltas pair with round 0's base rows), so it no
    # longer holds either: neither round reaches the report
    assert markers.rounds_that_hold(run) == []
    assert markers.Checker(run).status(1, "05_eval").state == "stale"


def test_a_changed_file_makes_what_was_built_on_it_stale(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    p = run / "round_00" / "completions.jsonl"
    p.write_text(p.read_text()[:5])  # cut
    chk = markers.Checker(run)
    assert chk.status(0, "03_filter").state == "broken"
    assert "round_00/completions.jsonl changed since 03_filter wrote it" in chk.status(0, "03_filter").reason
    assert chk.status(0, "04_heal").reason.startswith("it was built on round 00 03_filter, which does not hold")
    assert [chk.status(1, s).state for s in R.STAGES] == ["stale"] * 5  # every later round stood on round 0's adapter
    assert chk.status(0, "02_generate").holds and markers.rounds_that_hold(run) == []
    # 03 redone with a different result: its own record holds again, 04 read the old file
    fake_round(run, 0, cfg, ["03_filter"], tag=" (redone)")
    chk = markers.Checker(run)
    assert chk.status(0, "03_filter").state == "ok"
    assert chk.status(0, "04_heal").reason == "round_00/completions.jsonl changed since 04_heal read it"


def test_a_redone_step_with_the_same_result_leaves_the_rest_standing(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    R.clear_done(run, 0, "02_generate")
    assert _states(run)[0, "03_filter"] == "stale"
    fake_round(run, 0, cfg, ["02_generate"])  # same bytes again
    assert set(_states(run).values()) == {"ok"}


def test_a_config_change_applies_from_its_round_on(tmp_path):
    from steerheal_utils.driver import init_run

    run, cfg = _run_of_two_rounds(tmp_path)
    R.clear_done(run, 1, "05_eval")  # round 1 is not finished
    new = C.resolve("tiny", {"lr": 1e-2})
    init_run(run, new, override=True)
    hist = R.read_config_history(run)
    assert [e["from_round"] for e in hist] == [0, 1] and hist[1]["changes"] == ["lr: 0.0001 -> 0.01"]
    assert R.round_config(run, 0).lr == 1e-4 and R.round_config(run, 1).lr == 1e-2 and C.load_config(run / "config.yaml") == new
    st = _states(run)
    assert all(st[0, s] == "ok" for s in R.STAGES)  # finished rounds keep the config they were made with
    assert st[1, "01_vector"] == st[1, "03_filter"] == "ok"  # steps that do not use lr
    why = markers.Checker(run).status(1, "04_heal").reason
    assert st[1, "04_heal"] == "stale" and why == "the config changed (lr: 0.0001 -> 0.01)"
    assert markers.rounds_that_hold(run) == [0]


def test_a_knob_added_after_a_step_ran_changes_nothing_while_it_has_its_default(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    # a record sealed before the knob existed: the key is simply not in it
    for rnd in (0, 1):
        mp = R.marker_path(run, rnd, "02_generate")
        rec = json.loads(mp.read_text())
        assert rec["config"].pop("axis_prompts") == C.default("axis_prompts")
        mp.write_text(json.dumps(rec))
    assert set(_states(run).values()) == {"ok"} and markers.rounds_that_hold(run) == [0, 1]
    # the same missing key with a value other than its default is a change
    from steerheal_utils.driver import init_run

    R.clear_done(run, 1, "05_eval")
    init_run(run, C.resolve("tiny", {"axis_prompts": "love_prompts.jsonl"}), override=True)
    st = markers.Checker(run).status(1, "02_generate")
    assert st.state == "stale" and "axis_prompts" in st.reason, st.reason


def test_legacy_markers_hold_and_are_adopted_not_trusted_blindly(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    for s in R.STAGES:
        R.atomic_write_json(R.marker_path(run, 0, s), {"stage": s, "round": 0, "finished": 1.0, "seconds": 2.0})
    (run / "round_00" / "generated.jsonl").unlink()  # the old layout had no separate 02 file
    assert [markers.Checker(run).status(0, s).state for s in R.STAGES] == ["legacy"] * 5
    for s in R.STAGES:
        markers.adopt(run, 0, s, cfg)
    assert set(_states(run).values()) == {"ok"}
    assert json.loads(R.marker_path(run, 0, "04_heal").read_text())["by"] == "adopted"
    R.atomic_write_json(R.marker_path(run, 1, "04_heal"), {"stage": "04_heal"})
    (run / "round_01" / "heal.json").unlink()
    with pytest.raises(R.RunFolderError, match="round_01/heal.json missing"):
        markers.adopt(run, 1, "04_heal", cfg)


def test_the_eval_being_run_draws_its_own_round_before_it_is_sealed(tmp_path):
    """05's notebook plots the trajectory so far, its own round included, before the driver seals it."""
    run, cfg = _run_of_two_rounds(tmp_path)
    R.clear_done(run, 1, "05_eval")
    assert markers.rounds_that_hold(run) == [0]
    stage.open_stage("05_eval", {"run_dir": str(run), "round": 1})
    assert markers.rounds_that_hold(run) == [0, 1]
    stage.open_stage("04_heal", {"run_dir": str(run), "round": 1})  # any other step: only what holds
    assert markers.rounds_that_hold(run) == [0]


def test_seal_refuses_a_missing_output_or_an_input_changed_meanwhile(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    before = markers.input_snapshot(run, 0, "04_heal", cfg)
    (run / "round_00" / "heal_q1.json").unlink()
    with pytest.raises(R.RunFolderError, match="finished without writing round_00/heal_q1.json"):
        markers.seal(run, 0, "04_heal", cfg, inputs_before=before)
    R.atomic_write_text(run / "round_00" / "heal_q1.json", "{}")
    R.atomic_write_text(run / "round_00" / "completions.jsonl", "changed\n")
    with pytest.raises(R.RunFolderError, match="round_00/completions.jsonl changed while the step ran"):
        markers.seal(run, 0, "04_heal", cfg, inputs_before=before)


def test_a_corrupted_marker_or_a_changed_vignette_file_is_noticed(tmp_path):
    vign = tmp_path / "v.jsonl"
    vign.write_text('{"id": 1}\n')
    run, cfg = _run_of_two_rounds(tmp_path, vignettes=str(vign))
    assert f"vignettes:{vign}" in json.loads(R.marker_path(run, 0, "05_eval").read_text())["inputs"]
    vign.write_text('{"id": 2}\n')
    assert markers.Checker(run).status(0, "05_eval").reason == f"vignettes:{vign} changed since 05_eval read it"
    R.marker_path(run, 1, "01_vector").write_text('{"stage": "01_vect')
    assert markers.Checker(run).status(1, "01_vector").reason == "its marker round_01/.done/01_vector.json is corrupted"


def test_one_driver_per_run_folder_and_a_dead_holder_frees_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with R.run_lock(a):
        with R.run_lock(b):  # another folder: independent
            pass
        with pytest.raises(R.RunFolderError, match=f"in use by another steerheal process \\(pid {os.getpid()}\\)"):
            with R.run_lock(a):
                pass
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from steerheal_utils.runfolder import run_lock
        with run_lock({str(a)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(R.RunFolderError, match=f"pid {holder.pid}"):
            with R.run_lock(a):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with R.run_lock(a):  # SIGKILL released it: the same command can resume
        pass


# ====================================================================== inputs checked once, in one place
def _main(args, capsys) -> tuple[int, str]:
    from steerheal_utils.cli import main

    code = main(args)
    return code, capsys.readouterr().err


def test_nan_and_inf_are_refused_by_the_config(tmp_path, capsys):
    for item, key in (("lr=nan", "lr"), ("temperature=nan", "temperature"), ("calib_hi=.inf", "calib_hi"),
                      ("lam_round_pow=-.inf", "lam_round_pow")):
        with pytest.raises(C.ConfigError, match=f"{key}: expected a finite number"):
            C.resolve("tiny", [item])
    code, err = _main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--set", "lr=nan"], capsys)
    assert code == 2 and err == "config error: lr: expected a finite number, got nan\n"
    assert not (tmp_path / "r").exists()
    bad = tmp_path / "nan.yaml"  # a saved NaN (an older version let it through) is named, not compared as "nan -> nan"
    bad.write_text("lr: .nan\n")
    with pytest.raises(C.ConfigError, match=f"{bad}: lr: expected a finite number"):
        C.load_config(bad)


@pytest.mark.parametrize("content, needle", [
    ("- 1\n- 2\n", "holds a list"), ("hello\n", "holds a str ('hello')"), ("", "is empty"),
    ("a: [\n", "is not valid YAML"), ("1: 2\n", "unknown config key '1'")])
def test_config_files_that_are_not_a_mapping_are_one_line_errors(tmp_path, capsys, content, needle):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    code, err = _main(["run", "--config", str(f), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith(f"config error: {f}") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_run_dir_that_is_a_file_and_a_damaged_config_yaml_are_one_line_errors(tmp_path, capsys):
    from steerheal_utils.driver import init_run

    f = tmp_path / "afile"
    f.write_text("x")
    code, err = _main(["run", "--preset", "tiny", "--run-dir", str(f)], capsys)
    assert code == 2 and err == f"config error: --run-dir {f} is a file, not a run folder: give a folder (new or existing)\n"
    run = tmp_path / "run"
    init_run(run, C.resolve("tiny"))
    args = ["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)]
    for content, needle in (("", "is empty"), ("tiny\n", "holds a str ('tiny')"),
                            ((run / "config.yaml").read_text().replace("seed: 0", "seed: 7"),
                             "differs from the last entry of config_history.jsonl (edited by hand?): seed: 0 -> 7")):
        (run / "config.yaml").write_text(content)
        code, err = _main(args, capsys)
        assert code == 2 and needle in err and "--override-config" in err and "different config" not in err, err
    # --override-config writes the config back (recorded in the history as such)
    init_run(run, C.resolve("tiny"), override=True)
    assert C.load_config(run / "config.yaml") == C.resolve("tiny")
    assert R.read_config_history(run)[-1]["changes"] == ["config.yaml written again"]


def test_paths_are_resolved_once_against_the_callers_directory(tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "models" / "good").mkdir(parents=True)
    (work / "v.jsonl").write_text("{}\n")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    cfg = C.resolve("tiny", {"model": "models/good", "vignettes": "v.jsonl"})
    assert cfg.model == str(work / "models" / "good") and cfg.vignettes == str(work / "v.jsonl")
    C.check_files(cfg)
    C.save_config(cfg, tmp_path / "c.yaml")
    monkeypatch.chdir(elsewhere)  # a stage with another working directory sees the same files
    assert C.load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(C.ConfigError, match=f"vignettes: no such file {elsewhere / 'v.jsonl'}"):
        C.check_files(C.resolve("tiny", {"vignettes": "v.jsonl"}))
    assert C.resolve("tiny", {"model": "org/name"}).model == "org/name"  # an HF id that is not a folder here
    assert C.resolve("tiny", {"model": "./org"}).model == str(elsewhere / "org")  # a path: named in full in errors


def test_a_missing_file_named_by_the_config_stops_the_run_before_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _main(["run", "--preset", "tiny", "--run-dir", "r", "--set", "vignettes=v.jsonl"], capsys)
    assert code == 2 and err == f"config error: vignettes: no such file {tmp_path / 'v.jsonl'}\n"
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_relative_model_path_is_the_callers_in_every_stage(tmp_path):
    """Before: `--set model=models/good` from another folder passed the check (the caller's working
    directory) and failed in 01 (the notebook's): "hub cannot be reached"."""
    model, tok = M.tiny_model("llama", seed=3)
    good = tmp_path / "work" / "models" / "good"
    model.save_pretrained(good, safe_serialization=True)
    tok.save_pretrained(good)
    d = tmp_path / "nbs"
    d.mkdir()
    (d / "01_vector.ipynb").write_bytes((REPO / "notebooks" / "01_vector.ipynb").read_bytes())
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", *TINY, "--run-dir", str(run), "--set", "model=models/good"],
                       capture_output=True, text=True, env=cli_env(tmp_path, d), cwd=tmp_path / "work", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert C.load_config(run / "config.yaml").model == str(good)
    assert SteeringVector.load(run / "round_00" / "vector.safetensors").meta["model"] == str(good)


def test_model_folder_with_only_pickled_weights_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    with pytest.raises(M.ModelLoadError, match="no \\*.safetensors weights \\(found pytorch_model.bin: pickled"):
        M.check_model(str(folder))
    with pytest.raises(M.ModelLoadError, match="pickled weights"):
        M.load_model(str(folder))
    code, err = _main(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--set", f"model={folder}"], capsys)
    assert code == 1 and err.startswith("model error:") and "pytorch_model.bin" in err and "Traceback" not in err
    assert not sentinel.exists() and not (tmp_path / "r").exists()


def test_notebook_run_dir_that_does_not_exist_is_an_error_not_a_new_run(tmp_path):
    with pytest.raises(C.ConfigError, match=f"run_dir: {tmp_path / 'typo'} does not exist"):
        stage.open_stage("01_vector", {"run_dir": str(tmp_path / "typo"), "round": 0})
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.ConfigError, match="has no config.yaml"):
        stage.open_stage("01_vector", {"run_dir": str(tmp_path / "empty"), "round": 0})
    ctx = stage.open_stage("01_vector", {"run_dir": str(tmp_path / "new"), "round": 0, "preset": "tiny"})  # asked for
    assert ctx.cfg == C.resolve("tiny") and R.read_config_history(tmp_path / "new")[0]["from_round"] == 0


def test_a_hand_run_on_a_finished_step_writes_to_scratch_only(tmp_path):
    run, cfg = _run_of_two_rounds(tmp_path)
    R.clear_done(run, 1, "03_filter")
    states, files = _states(run), {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ctx = stage.open_stage("02_generate", {"run_dir": str(run), "round": 0})
    assert ctx.mode == "explore" and ctx.explore_dir.parent == run / "round_00" / "explore"
    assert ctx.artifact("generated") == ctx.explore_dir / "generated.jsonl"  # outputs: scratch
    assert ctx.artifact("vector") == run / "round_00" / "vector.safetensors"  # inputs: the journal
    assert ctx.path("x.txt") == ctx.explore_dir / "x.txt"
    with pytest.raises(contract.ContractError, match="02_generate does not declare 'completions'"):
        ctx.artifact("completions")
    with pytest.raises(contract.ContractError, match="'vector' of round 1"):
        ctx.artifact("vector", 1)
    R.atomic_write_text(ctx.artifact("generated"), "explored\n")
    ctx3 = stage.open_stage("03_filter", {"run_dir": str(run), "round": 0})
    assert ctx3.artifact("generated") == ctx.artifact("generated")  # the next step explores on from there
    other = stage.open_stage("02_generate", {"run_dir": str(run), "round": 0, "dose": 0.5})
    assert other.explore_dir != ctx.explore_dir and other.cfg.dose == 0.5
    later = stage.open_stage("03_filter", {"run_dir": str(run), "round": 1})  # no record: the journal, as before
    assert later.mode == "journal" and later.artifact("completions") == run / "round_01" / "completions.jsonl"
    assert _states(run) == states  # exploring changed no record...
    assert all(p.read_bytes() == b for p, b in files.items() if p.name != ".lock")  # ...and no file of the journal
    with pytest.raises(C.ConfigError, match="replace=True takes no config keys"):
        stage.open_stage("02_generate", {"run_dir": str(run), "round": 0, "replace": True, "dose": 0.5})


# ====================================================================== paths cannot escape the run folder
def test_names_cannot_escape_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "round_00").mkdir(parents=True)
    os.symlink(tmp_path, run / "round_00" / "link")
    for name in ("../config.yaml", "../../x", "/etc/passwd", "link/evil", "", "a/../../b"):
        with pytest.raises(R.RunFolderError):
            R.safe_child(run / "round_00", name)
    assert R.safe_child(run / "round_00", "adapter/adapter_config.json") == run / "round_00" / "adapter" / "adapter_config.json"
    for bad in (-1, 100, "1", 1.0, True):
        with pytest.raises(R.RunFolderError):
            R.round_dir(run, bad)
    for bad in ("../../../tmp/evil", "06_extra", "01_vector/../../x"):
        with pytest.raises(R.RunFolderError):
            R.marker_path(run, 0, bad)
    C.save_config(C.resolve("tiny"), run / "config.yaml")
    ctx = stage.open_stage("05_eval", {"run_dir": str(run), "round": 0})
    assert ctx.path("eval.json") == run / "round_00" / "eval.json"
    with pytest.raises(R.RunFolderError):
        ctx.path("../../outside.json")
    with pytest.raises(ValueError, match="unknown stage"):
        stage.open_stage("../../x", {"run_dir": str(run), "round": 0})


def test_driver_refuses_unknown_stage_names(tmp_path):
    from steerheal_utils.driver import run_stage

    with pytest.raises(R.RunFolderError, match="unknown stage"):
        run_stage(tmp_path, 0, "../../evil", "python3")


# ====================================================================== safetensors only; corrupted artifacts
@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model, _ = M.tiny_model("llama", seed=0)
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(d)
    return d


class _Sentinel:
    """Unpickling this touches a file: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_adapter_pickle_is_never_loaded(tmp_path, adapter_folder):
    sentinel = tmp_path / "PWNED"
    run = tmp_path / "run"
    binonly = run / "round_00" / "adapter"
    binonly.mkdir(parents=True)
    (binonly / "adapter_config.json").write_bytes((adapter_folder / "adapter_config.json").read_bytes())
    (binonly / "adapter_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    with pytest.raises(R.RunFolderError, match="adapter_model.bin: pickled weights are never loaded"):
        M.adapter_dirs(run, 1)
    with pytest.raises(R.RunFolderError, match="no adapter_model.safetensors"):
        M.bake_adapters(M.tiny_model("llama")[0], [binonly])
    assert not sentinel.exists()
    # (Why the check exists: peft 0.21 falls back to adapter_model.bin even with use_safetensors=True.)
    # Both present: the safetensors file is what gets used, the pickle is not touched.
    both = _copy_adapter(adapter_folder, tmp_path / "both")
    (both / "adapter_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))
    baked = M.bake_adapters(M.tiny_model("llama")[0], [both])
    assert not sentinel.exists() and type(baked).__name__ == "PeftModel"


def test_truncated_or_nan_adapter_names_the_file(tmp_path, adapter_folder):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    d = _copy_adapter(adapter_folder, run / "round_00" / "adapter")
    f = d / "adapter_model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(R.RunFolderError) as ei:
        M.adapter_dirs(run, 1)
    msg = str(ei.value)
    assert f"corrupted adapter file {f}" in msg and "04_heal.json" in msg and "re-run the same command" in msg
    with pytest.raises(R.RunFolderError, match="corrupted adapter file"):
        M.bake_adapters(M.tiny_model("llama")[0], [d])
    tensors = load_file(adapter_folder / "adapter_model.safetensors")
    k = sorted(tensors)[0]
    tensors[k][0, 0] = float("nan")
    save_file(tensors, f)
    with pytest.raises(R.RunFolderError, match=f"{k} has NaN or inf"):
        M.adapter_dirs(run, 1)
    f.unlink()
    with pytest.raises(R.RunFolderError, match="no adapter_model.safetensors"):
        M.adapter_dirs(run, 1)
    f.write_bytes(good)
    assert M.adapter_dirs(run, 1) == [d]
    with pytest.raises(R.RunFolderError, match="round 1 has no adapter folder"):
        M.adapter_dirs(run, 2)


def test_vector_file_is_safetensors_only_and_checked(tmp_path):
    sv = SteeringVector({1: torch.ones(8), 2: torch.arange(8.0)}, {1: 3.0, 2: 4.0}, {"round": 0})
    p = tmp_path / "vector.safetensors"
    sv.save(p)
    assert SteeringVector.load(p).layers == [1, 2]
    good = p.read_bytes()
    p.write_bytes(good[:-7])
    with pytest.raises(ValueError, match=f"{p} is not a readable safetensors"):
        SteeringVector.load(p)
    sentinel = tmp_path / "PWNED"
    p.write_bytes(pickle.dumps(_Sentinel(sentinel)))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        SteeringVector.load(p)
    assert not sentinel.exists()
    SteeringVector({1: torch.tensor([1.0, float("nan")])}, {1: 3.0}).save(p)
    with pytest.raises(ValueError, match=r"layers \[1\] have NaN or inf"):
        SteeringVector.load(p)
    SteeringVector({1: torch.ones(2)}, {1: float("inf")}).save(p)
    with pytest.raises(ValueError, match="NaN or inf"):
        SteeringVector.load(p)


# ====================================================================== embedded model: hashes, concurrent first use
def _fake_converted(cache: Path) -> Path:
    out = cache / "models" / E.NAME
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}')
    (out / "model.safetensors").write_bytes(b"weights" * 100)
    E._write_ready(out, E._manifest(out))
    return out


def test_embedded_files_are_checked_against_recorded_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    out = _fake_converted(tmp_path / "cache")
    assert E.ensure_embedded_model() == out
    (out / "model.safetensors").write_bytes(b"weights" * 99)  # truncated / modified
    with pytest.raises(E.EmbeddedModelError, match=f"{out / 'model.safetensors'} has sha256 .* expected .* Delete {out}"):
        E.ensure_embedded_model()
    with pytest.raises(M.ModelLoadError, match="could not prepare the embedded model"):
        M.check_model(E.NAME)
    (out / "model.safetensors").unlink()
    with pytest.raises(E.EmbeddedModelError, match="sha256 missing"):
        E.ensure_embedded_model()


def test_embedded_tampered_cache_via_cli_is_one_message(tmp_path):
    cache = tmp_path / "cache"
    out = _fake_converted(cache)
    (out / "config.json").write_text('{"model_type": "evil"}')
    r = run_cli(["run", "--rounds", "1", "--run-dir", str(tmp_path / "run")], tmp_path, cache=cache)
    assert_one_clear_error(r, "model error:", "config.json has sha256", "Delete")
    assert not (tmp_path / "run").exists()


def test_embedded_gguf_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / E.GGUF_FILE
    fake.write_bytes(b"GGUF not the pinned one")
    monkeypatch.setattr(E, "_installed_gguf", lambda: fake)
    monkeypatch.setattr(E, "_convert", lambda *a: pytest.fail("a file with the wrong hash was converted"))
    with pytest.raises(E.EmbeddedModelError, match=f"expected {E.GGUF_SHA256}: refusing"):
        E.ensure_embedded_model(progress=False)
    assert not E.model_dir().exists()


CONVERT_SCRIPT = """
import sys, time
from pathlib import Path
from steerheal_utils import embedded as E

log = Path(sys.argv[1])
gguf = Path(sys.argv[2])
E._installed_gguf = lambda: gguf
E.GGUF_SHA256 = E.sha256(gguf)
E._fetch_gguf = lambda dest: (_ for _ in ()).throw(AssertionError("no download in tests"))

def slow_convert(src, out):
    with open(log, "a") as f:
        f.write("start\\n")
    (out / "config.json").write_text("{}")
    time.sleep(2.0)  # the other process arrives meanwhile
    (out / "model.safetensors").write_bytes(b"w" * 1000)
    with open(log, "a") as f:
        f.write("end\\n")

E._convert = slow_convert
print(E.ensure_embedded_model(progress=False), flush=True)
"""


def test_concurrent_first_use_converts_once(tmp_path):
    """Two processes need the embedded model at once: one converts, the other waits and uses it;
    a half-converted folder of a process killed mid-conversion is cleaned up, never used."""
    cache = tmp_path / "cache"
    stale = cache / "models" / f".{E.NAME}.dead1234.tmp"  # a crashed conversion's leftovers
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    script = tmp_path / "convert.py"
    script.write_text(CONVERT_SCRIPT)
    gguf = tmp_path / E.GGUF_FILE
    gguf.write_bytes(b"fake gguf")
    log = tmp_path / "log"
    env = {**os.environ, "STEERHEAL_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, str(script), str(log), str(gguf)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    out = cache / "models" / E.NAME
    assert [o[0].strip() for o in outs] == [str(out)] * 2
    assert log.read_text() == "start\nend\n"  # converted exactly once
    assert sum("waiting for another process to finish converting" in o[1] for o in outs) == 1  # the waiter says so
    assert sorted(p.name for p in out.iterdir()) == ["READY", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"w" * 1000
    assert not stale.exists() and [p.name for p in (cache / "models").iterdir() if p.name.endswith(".tmp")] == []
    E.verify(out)


# ====================================================================== stage failures through the driver (fake stages)


FAULTY_STAGE = """
import errno, os, signal
from pathlib import Path
from steerheal_utils import runfolder, stage
ctx = stage.open_stage("01_vector", globals())
fault = Path({fault!r})
if fault.exists():
    kind = fault.read_text()
    def fsync(fd):
        if kind == "kill":  # the kernel dies in the middle of writing an artifact
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync = fsync
runfolder.atomic_write_bytes(ctx.path("vector.safetensors"), b"x" * 100000)
"""


@pytest.mark.parametrize("kind, needles", [
    ("full", ["round 00 01_vector failed: OSError", "No space left on device", "vector.safetensors", "the disk is full"]),
    ("kill", ["round 00 01_vector failed: DeadKernelError", "the notebook's kernel died"]),
])
def test_stage_fault_is_one_message_and_the_same_command_resumes(tmp_path, kind, needles):
    d = tmp_path / "nbs"
    d.mkdir()
    fault = tmp_path / "fault"
    fault.write_text(kind)
    write_nb(d / "01_vector.ipynb", FAULTY_STAGE.format(fault=str(fault)))
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)]
    r = run_cli(args, tmp_path, d)
    assert_one_clear_error(r, *needles, "re-run the same command to resume at round 00 01_vector")
    assert not R.is_done(run, 0, "01_vector") and not (run / "round_00" / "vector.safetensors").exists()
    if kind == "full":
        assert temp_leftovers(run) == []
    else:  # SIGKILL mid-write: a hidden temp file may stay until the next start
        assert all(R._TEMP_NAME.match(p.name) for p in temp_leftovers(run))
    fault.unlink()  # space freed / memory available again
    r = run_cli(args, tmp_path, d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert R.is_done(run, 0, "01_vector") and (run / "round_00" / "vector.safetensors").stat().st_size == 100000
    assert temp_leftovers(run) == []



INTERRUPTIBLE_STAGE = """
import time
from pathlib import Path
from steerheal_utils import stage
ctx = stage.open_stage("01_vector", globals())
if Path({slow!r}).exists():
    time.sleep(120)
"""


def test_ctrl_c_prints_one_message_and_the_same_command_resumes(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    slow = tmp_path / "slow"
    slow.write_text("1")
    write_nb(d / "01_vector.ipynb", INTERRUPTIBLE_STAGE.format(slow=str(slow)) + FAKE_OUTPUTS)
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)]
    # its own session: a terminal's Ctrl-C reaches the whole foreground process group
    proc = subprocess.Popen([sys.executable, "-m", "steerheal_utils", *args], env=cli_env(tmp_path, d), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run / "round_00" / "01_vector.ipynb").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        time.sleep(5.0)  # the kernel is up and in the cell
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err and "ERROR" not in err, err
    assert err.count("interrupted: re-run the same command to resume") == 1, err
    assert not R.is_done(run, 0, "01_vector")
    slow.unlink()
    r = run_cli(args, tmp_path, d)
    assert r.returncode == 0 and R.is_done(run, 0, "01_vector"), r.stderr[-3000:]


SLOW_STAGE = """
import time
from steerheal_utils import runfolder, stage
ctx = stage.open_stage("01_vector", globals())
time.sleep(20)  # long enough for a third command to start on a loaded machine
runfolder.atomic_write_text(ctx.path("done.txt"), str(ctx.run_dir))
""" + FAKE_OUTPUTS


def test_two_runs_at_once_do_not_interfere_and_one_folder_has_one_driver(tmp_path):
    """Two runs in different folders start together on a fresh shared cache (kernel spec made
    by both at once); a third command on the first folder is refused while it runs."""
    d = tmp_path / "nbs"
    d.mkdir()
    write_nb(d / "01_vector.ipynb", SLOW_STAGE)
    env = cli_env(tmp_path, d)
    runs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "steerheal_utils", *["run", "--preset", "tiny", "--rounds", "1"],
                               "--run-dir", str(run)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for run in runs]
    try:
        deadline = time.time() + 300
        while not (runs[0] / "round_00" / "01_vector.ipynb").exists():
            assert procs[0].poll() is None and time.time() < deadline, procs[0].stderr.read()[-3000:]
            time.sleep(0.2)
        third = run_cli(["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(runs[0])], tmp_path, d)
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert_one_clear_error(third, "run folder error:", f"{runs[0]} is in use by another steerheal process")
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    for run in runs:
        assert (run / "round_00" / "done.txt").read_text() == str(run.resolve())
        assert R.is_done(run, 0, "01_vector")


# ====================================================================== end to end on the tiny preset
# One uninterrupted 1-round run is the reference; the fault tests start from copies of its
# finished stages where the fault is about a later stage, so each costs only what it tests.
TINY = ["run", "--preset", "tiny", "--rounds", "1"]
def metrics(run: Path) -> list[dict]:
    """metrics.csv without its wall-clock column (the one thing a re-run cannot repeat)."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    run = base / "run"
    r = run_cli([*TINY, "--run-dir", str(run)], base, cache=base / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(R.is_done(run, 0, s) for s in R.STAGES)
    return run


def copy_until(ref: Path, dst: Path, last: str) -> Path:
    """A run folder holding the reference's config and round 0 up to and including stage ``last``."""
    import shutil

    dst.mkdir(parents=True)
    for name in ("config", "config_history"):
        shutil.copy2(contract.run_path(ref, name), contract.run_path(dst, name))
    shutil.copytree(ref / "round_00", dst / "round_00")
    for s in R.STAGES[R.STAGES.index(last) + 1:]:
        R.clear_done(dst, 0, s)
        contract.journal_path(dst, 0, s).unlink(missing_ok=True)
        for name in contract.step(s).writes:
            p = contract.path(dst, 0, name)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


@pytest.mark.slow
def test_kill_during_heal_resumes_to_the_same_metrics(tmp_path, reference):
    """SIGKILL the whole driver process group while 04_heal runs; the same command resumes at
    04_heal, leaves 01-03 untouched and ends with the reference's metrics.csv."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "steerheal_utils", *TINY, "--run-dir", str(run)]
    env = cli_env(tmp_path)
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: killpg hits the driver and all it started
    try:
        deadline = time.time() + 900
        heal_nb = run / "round_00" / "04_heal.ipynb"
        while not heal_nb.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(4.0)  # the 04_heal kernel is up and working
        assert proc.poll() is None and not R.is_done(run, 0, "04_heal"), "04_heal finished before the kill"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [R.is_done(run, 0, s) for s in R.STAGES] == [True, True, True, False, False]
    stamps = {s: R.marker_path(run, 0, s).stat().st_mtime_ns for s in R.STAGES[:3]}
    files = {p: p.stat().st_mtime_ns for p in (run / "round_00").iterdir()
             if p.name in ("vector.safetensors", "completions.jsonl", "01_vector.ipynb", "03_filter.ipynb")}
    time.sleep(2.0)  # the orphaned kernel notices its parent is gone within a second and exits
    r = run_cli([*TINY, "--run-dir", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "01_vector" not in r.stderr and "04_heal" in r.stderr  # resumed at the interrupted stage
    assert {s: R.marker_path(run, 0, s).stat().st_mtime_ns for s in R.STAGES[:3]} == stamps
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert all(R.is_done(run, 0, s) for s in R.STAGES) and temp_leftovers(run) == []
    assert metrics(run) == metrics(reference)
    a, b = (d / "round_00" / "adapter" / "adapter_model.safetensors" for d in (run, reference))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_nan_in_heal_stops_the_round_with_nothing_marked(tmp_path, reference):
    """A learning rate that genuinely overflows: the heal loss turns NaN on the second step."""
    run = copy_until(reference, tmp_path / "run", "03_filter")
    r = run_cli([*TINY, "--run-dir", str(run), "--set", "lr=1e30", "--set", "epochs=2", "--override-config"], tmp_path)
    assert_one_clear_error(r, "round 00 04_heal failed: FloatingPointError", "NaN or inf appeared",
                           str(run / "round_00" / "04_heal.ipynb"))
    assert "nan" in r.stderr.lower() or "inf" in r.stderr.lower()
    assert [R.is_done(run, 0, s) for s in R.STAGES] == [True, True, True, False, False]
    assert not (run / "round_00" / "adapter").exists() and not (run / "round_00" / "heal.json").exists()
    assert temp_leftovers(run) == []


@pytest.mark.slow
def test_filter_starvation_is_a_clear_message_with_counts(tmp_path, reference):
    run = copy_until(reference, tmp_path / "run", "02_generate")
    # min_train is a filter key, which 02 uses too (it filters every sample): 02 runs again first
    # (same rows), then 03 stops the round
    r = run_cli([*TINY, "--run-dir", str(run), "--set", "min_train=1000", "--override-config"], tmp_path)
    assert_one_clear_error(r, "round 00 03_filter failed: TooFewKept", "filter starvation", "min_train=1000",
                           "round 00 02_generate: the config changed (min_train: 1 -> 1000): running it again")
    assert not R.is_done(run, 0, "03_filter") and not (run / "round_00" / "adapter").exists()
    assert temp_leftovers(run) == []


@pytest.mark.slow
def test_coherence_floor_stops_the_loop_and_records_why(tmp_path, reference):
    run = copy_until(reference, tmp_path / "run", "04_heal")
    args = ["run", "--preset", "tiny", "--rounds", "3", "--run-dir", str(run), "--set", "coh_floor=1.0"]
    r = run_cli([*args, "--override-config"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopping after round 00" in r.stderr and "coh_floor" in r.stderr
    stop = json.loads((run / "stop.json").read_text())
    assert stop["round"] == 0 and "coh_floor 1.0" in stop["reason"]
    healed = [m for m in metrics(run) if m["condition"] == "healed"]
    assert [m["stop_reason"] for m in healed] == [stop["reason"]]
    assert "The loop stopped" in (run / "report.html").read_text()
    assert not (run / "round_01").exists()
    r = run_cli(args, tmp_path)  # the same command again: still stopped, nothing new runs
    assert r.returncode == 0 and "stopp" in r.stderr and not (run / "round_01").exists()


def _ran(stderr: str) -> list[str]:
    """The stages a run executed, from its progress lines."""
    return re.findall(r"\] (0\d_\w+) \.\.\.", stderr)


def _copy_run(ref: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(ref, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# (file in round_00, damage, the stage that wrote it, what the run says, the stages it runs again)
DAMAGE = [
    ("vector.safetensors", "delete", "01_vector", "is missing", ["01_vector"]),
    # 02 again gives the same rows but new timings in generate.json, which 05 reads: 05 runs again too
    ("generate.json", "delete", "02_generate", "is missing", ["02_generate", "05_eval"]),
    ("completions.jsonl", "cut", "03_filter", "changed since 03_filter wrote it", ["03_filter"]),
    ("filter.json", "corrupt", "03_filter", "changed since 03_filter wrote it", ["03_filter"]),
    ("adapter/adapter_model.safetensors", "cut", "04_heal", "changed since 04_heal wrote it", ["04_heal"]),
    # the adapter folder deleted and 05 asked to run again: 05 skipped 'healed' and dropped its row
    ("adapter", "delete", "04_heal", "is missing", ["04_heal", "05_eval"]),
    ("eval.json", "delete", "05_eval", "is missing", ["05_eval"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, how, stage, why, redone", DAMAGE, ids=[d[0].split("/")[-1] for d in DAMAGE])
def test_a_damaged_artifact_is_named_and_its_stage_redone(tmp_path, reference, name, how, stage, why, redone):
    """Before: exit 0 with changed or missing numbers (eval.json deleted: 7 metrics rows became 2;
    completions cut: n_generated / n_kept changed; ...). Now: `report` names the file and the stage
    and exits 1; `run` says so, redoes the stage, and ends with the reference's files and metrics."""
    run = _copy_run(reference, tmp_path / "run")
    f = run / "round_00" / name
    if how == "delete" and f.is_dir():
        import shutil

        shutil.rmtree(f)
        R.clear_done(run, 0, "05_eval")
    elif how == "delete":
        f.unlink()
    elif how == "cut":
        lines = f.read_bytes().splitlines(keepends=True)
        f.write_bytes(b"".join(lines[: len(lines) // 2]) if len(lines) > 2 else f.read_bytes()[:-100])
    else:
        f.write_bytes(f.read_bytes()[:-20])
    said = f"round 00 {stage}: round_00/{name}{'/adapter_config.json' if f.name == 'adapter' else ''} {why}"
    if stage in ("04_heal", "05_eval"):
        r = run_cli(["report", str(run)], tmp_path)
        assert_one_clear_error(r, f"run folder error: {said}", "left out of the report")
    r = run_cli([*TINY, "--run-dir", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{said}: running it again" in r.stderr and _ran(r.stderr) == redone, r.stderr[-3000:]
    if f.is_file() and not name.endswith(".json"):  # .json files carry their own timings
        assert f.read_bytes() == (reference / "round_00" / name).read_bytes()
    assert metrics(run) == metrics(reference)
    assert markers.Checker(run).round_holds(0)


@pytest.mark.slow
def test_a_round_that_no_longer_holds_is_left_out_of_metrics_and_the_report(tmp_path, reference):
    """Before: remove round 0's 04 marker, re-run with --rounds 1 --set lr=1e-2 --override-config:
    metrics.csv and the report kept round 1's rows from the old adapter (exit 0)."""
    run = _copy_run(reference, tmp_path / "run")
    r = run_cli(["run", "--preset", "tiny", "--rounds", "2", "--run-dir", str(run)], tmp_path)
    assert r.returncode == 0 and _ran(r.stderr) == list(R.STAGES), r.stderr[-3000:]
    assert {m["round"] for m in metrics(run)} == {"0", "1"}
    R.clear_done(run, 0, "04_heal")
    r = run_cli([*TINY, "--run-dir", str(run), "--set", "lr=1e-2", "--override-config"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config changed from round 00 on (lr: 0.0001 -> 0.01)" in r.stderr and _ran(r.stderr) == ["04_heal", "05_eval"]
    assert "round 01 is left out of metrics.csv and the report: round 01 01_vector: round_00/adapter" in r.stderr
    rows = metrics(run)
    assert {m["round"] for m in rows} == {"0"} and rows != metrics(reference)  # round 0 healed with the new lr
    hist = R.read_config_history(run)
    assert (hist[-1]["from_round"], hist[-1]["changes"]) == (0, ["lr: 0.0001 -> 0.01"])
    r = run_cli(["report", str(run)], tmp_path)
    assert_one_clear_error(r, "run folder error: round 01 01_vector: round_00/adapter/adapter_model.safetensors "
                              "changed since 01_vector read it", "--rounds 2")
    assert {m["round"] for m in metrics(run)} == {"0"}


@pytest.mark.slow
def test_rerunning_02_by_hand_in_a_finished_run_touches_nothing_of_the_run(tmp_path, reference, monkeypatch):
    """The hazard: 02_generate run by hand (papermill standing in for JupyterLab) on a finished run
    folder rewrote completions.jsonl, stripped 03's scores and kept every marker. Now it writes to
    round_00/explore/; with the same seeds it reproduces the driver's rows byte for byte (hand runs
    are seeded like driver runs); replace=True rewrites the journal's copy and records it."""
    import papermill as pm

    from steerheal_utils.driver import kernel_name

    run = _copy_run(reference, tmp_path / "run")
    monkeypatch.setenv("JUPYTER_PATH", os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    kernel = kernel_name()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    nb = str(REPO / "notebooks" / "02_generate.ipynb")
    for extra in ({}, {"calib_target": 0.5}):  # as it is, and with a changed parameter
        pm.execute_notebook(nb, str(tmp_path / "hand.ipynb"), kernel_name=kernel, progress_bar=False,
                            parameters={"run_dir": str(run), "round": 0, **extra})
        assert all(p.read_bytes() == b for p, b in before.items()), "the hand run wrote into the journal"
    explored = sorted((run / "round_00" / "explore").iterdir())
    assert len(explored) == 2
    same = [d for d in explored if json.loads((d / "explore.json").read_text())["overrides"] == {}][0]
    assert (same / "generated.jsonl").read_bytes() == (run / "round_00" / "generated.jsonl").read_bytes()
    r = run_cli([*TINY, "--run-dir", str(run)], tmp_path)
    assert r.returncode == 0 and _ran(r.stderr) == [], r.stderr[-3000:]
    assert metrics(run) == metrics(reference)
    pm.execute_notebook(nb, str(tmp_path / "replace.ipynb"), kernel_name=kernel, progress_bar=False,
                        parameters={"run_dir": str(run), "round": 0, "replace": True})
    rec = json.loads(R.marker_path(run, 0, "02_generate").read_text())
    assert rec["by"] == "hand (replace=True)" and rec["finished"] > json.loads(before[R.marker_path(run, 0, "02_generate")])["finished"]
    assert (run / "round_00" / "generated.jsonl").read_bytes() == before[run / "round_00" / "generated.jsonl"]
    r = run_cli([*TINY, "--run-dir", str(run)], tmp_path)  # same rows: only 05 (reads 02's timings) runs again
    assert r.returncode == 0 and _ran(r.stderr) == ["05_eval"], r.stderr[-3000:]
    assert metrics(run) == metrics(reference)
