"""The loop driver on the tiny preset: run folder contract, resume, refusals, failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import FAKE_OUTPUTS, write_nb

from steerheal_utils import config as C
from steerheal_utils import stage
from steerheal_utils.runfolder import is_done, marker_path
from steerheal_utils.vector import SteeringVector

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, env_nb: Path | None, tmp_path: Path):
    env = {**__import__("os").environ, "STEERHEAL_CACHE": str(tmp_path / "cache")}
    if env_nb is not None:
        env["STEERHEAL_NOTEBOOKS"] = str(env_nb)
    return subprocess.run([sys.executable, "-m", "steerheal_utils", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture
def only_vector_nb(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    shutil.copy(REPO / "notebooks" / "01_vector.ipynb", d)
    return d


def test_tiny_round_writes_the_contract_and_resumes(tmp_path, only_vector_nb):
    run = tmp_path / "run"
    r = run_cli(["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)], only_vector_nb, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "config.yaml").exists()
    nb = nbformat.read(run / "round_00" / "01_vector.ipynb", as_version=4)
    assert nb.metadata["papermill"]["parameters"] == {"run_dir": str(run.resolve()), "round": 0}
    sv = SteeringVector.load(run / "round_00" / "vector.safetensors")
    assert sv.meta["round"] == 0 and sv.meta["model"] == "tiny:llama" and sv.meta["n_contexts"] == 8
    assert "persona_hash" in sv.meta and sv.layers == C.resolve("tiny").steered_layers(4)
    meta = __import__("yaml").safe_load((run / "config.yaml").read_text())["_meta"]
    assert meta["libraries"]["torch"] and "git_commit" in meta





def test_resume_skips_finished_stages_and_continues(tmp_path):
    """Stages that log each execution: a re-run executes nothing, more rounds add only new ones."""
    d = tmp_path / "nbs"
    d.mkdir()
    for name in ("01_vector", "02_generate"):
        write_nb(d / f"{name}.ipynb", f"from steerheal_utils import stage\nctx = stage.open_stage('{name}', globals())\n"
                 f"open(ctx.run_dir / 'log.txt', 'a').write(f'{name} {{ctx.round}}\\n')\n" + FAKE_OUTPUTS)
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)]
    assert run_cli(args, d, tmp_path).returncode == 0
    assert (run / "log.txt").read_text().split("\n")[:-1] == ["01_vector 0", "02_generate 0"]
    stamp = marker_path(run, 0, "01_vector").stat().st_mtime_ns
    assert run_cli(args, d, tmp_path).returncode == 0
    assert (run / "log.txt").read_text().count("\n") == 2 and marker_path(run, 0, "01_vector").stat().st_mtime_ns == stamp
    args[4] = "3"
    r = run_cli(args, d, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (run / "log.txt").read_text().split("\n")[:-1] == [
        "01_vector 0", "02_generate 0", "01_vector 1", "02_generate 1", "01_vector 2", "02_generate 2"]
    # A different config is refused with a message naming the change.
    r = run_cli([*args, "--set", "seed=5"], d, tmp_path)
    assert r.returncode == 2 and "seed: 0 -> 5" in r.stderr and "--override-config" in r.stderr


@pytest.mark.slow
def test_override_config_is_recorded_and_applies_from_the_first_unfinished_round(tmp_path):
    """--override-config appends to config_history.jsonl instead of rewriting the past: the
    finished round keeps its config (and its records hold); the next round runs with the new one."""
    d = tmp_path / "nbs"
    d.mkdir()
    for name in stage.contract.STAGES:
        write_nb(d / f"{name}.ipynb", f"from steerheal_utils import stage\nctx = stage.open_stage('{name}', globals())\n"
                 f"open(ctx.run_dir / 'log.txt', 'a').write(f'{name} {{ctx.round}} {{ctx.cfg.seed}}\\n')\n" + FAKE_OUTPUTS)
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)]
    assert run_cli(args, d, tmp_path).returncode == 0
    args[4] = "2"
    r = run_cli([*args, "--set", "seed=5", "--override-config"], d, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "config changed from round 01 on (seed: 0 -> 5)" in r.stderr
    log = (run / "log.txt").read_text().split("\n")[:-1]
    assert log == [f"{s} 0 0" for s in stage.contract.STAGES] + [f"{s} 1 5" for s in stage.contract.STAGES]
    hist = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [(h["from_round"], h["changes"], h["config"]["seed"]) for h in hist] == [(0, None, 0), (1, ["seed: 0 -> 5"], 5)]
    assert C.load_config(run / "config.yaml").seed == 5
    assert json.loads(marker_path(run, 0, "01_vector").read_text())["config"]["seed"] == 0
    assert json.loads(marker_path(run, 1, "01_vector").read_text())["config"]["seed"] == 5


def test_bad_set_fails_fast(tmp_path):
    r = run_cli(["run", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--set", "lora_r=-3"], None, tmp_path)
    assert r.returncode == 2 and "lora_r" in r.stderr and "out of range" in r.stderr
    assert not (tmp_path / "r").exists()  # failed before anything was written or loaded


def test_failing_cell_names_notebook_and_error(tmp_path):
    d = tmp_path / "nbs"
    d.mkdir()
    write_nb(d / "01_vector.ipynb", "raise ValueError('the widget exploded')")
    run = tmp_path / "run"
    r = run_cli(["run", "--preset", "tiny", "--rounds", "1", "--run-dir", str(run)], d, tmp_path)
    assert r.returncode == 1
    assert "01_vector" in r.stderr and "ValueError" in r.stderr and "the widget exploded" in r.stderr
    assert str(run / "round_00" / "01_vector.ipynb") in r.stderr
    assert not is_done(run, 0, "01_vector")


def test_notebook_parameters_are_validated_like_the_config(tmp_path):
    C.save_config(C.resolve("tiny"), tmp_path / "config.yaml")
    ok = stage.open_stage("01_vector", {"run_dir": str(tmp_path), "round": 1, "json": json})
    assert ok.round == 1 and ok.cfg.model == "tiny:llama"
    over = stage.open_stage("02_generate", {"run_dir": str(tmp_path), "round": 0, "dose": 0.2})
    assert over.cfg.dose == 0.2 and over.overrides == {"dose": 0.2}
    with pytest.raises(C.ConfigError, match="unknown config key 'dosee'"):
        stage.open_stage("02_generate", {"run_dir": str(tmp_path), "round": 0, "dosee": 0.2})
    with pytest.raises(C.ConfigError, match="epochs"):
        stage.open_stage("04_heal", {"run_dir": str(tmp_path), "round": 0, "epochs": "many"})
    with pytest.raises(C.ConfigError, match="round"):
        stage.open_stage("04_heal", {"run_dir": str(tmp_path), "round": -1})


def test_threads_knob_sets_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        C.save_config(C.resolve("tiny", ["threads=1"]), tmp_path / "config.yaml")
        stage.open_stage("01_vector", {"run_dir": str(tmp_path), "round": 0})
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        stage.open_stage("01_vector", {"run_dir": str(tmp_path), "round": 0, "threads": 0})  # 0 leaves torch alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_stage_seeds_differ_and_are_stable():
    a = stage.stage_seed(0, 0, "02_generate")
    assert a == stage.stage_seed(0, 0, "02_generate")
    assert len({a, stage.stage_seed(0, 1, "02_generate"), stage.stage_seed(1, 0, "02_generate"),
                stage.stage_seed(0, 0, "04_heal")}) == 4


def test_a_new_artifact_needs_only_the_table_and_the_step_that_writes_it(tmp_path, monkeypatch, capsys):
    """Declare an artifact in the contract and write it in its step: the driver records its hash,
    a run notices when it is gone and redoes the step, and the docs list it. Nothing else changes."""
    import dataclasses

    from steerheal_utils import contract
    from steerheal_utils.driver import run_loop

    d = tmp_path / "nbs"
    d.mkdir()
    write_nb(d / "01_vector.ipynb", "from steerheal_utils import runfolder, stage\n"
             "ctx = stage.open_stage('01_vector', globals())\n"
             "runfolder.atomic_write_text(ctx.path('notes.txt'), 'what 01 noticed')\n" + FAKE_OUTPUTS)
    monkeypatch.setenv("STEERHEAL_NOTEBOOKS", str(d))
    monkeypatch.setenv("STEERHEAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JUPYTER_PATH", __import__("os").environ.get("JUPYTER_PATH", ""))
    monkeypatch.setitem(contract.ARTIFACTS, "notes", contract.Artifact("notes", "notes.txt", "what the vector step noticed"))
    monkeypatch.setitem(contract.STEPS, "01_vector", dataclasses.replace(contract.STEPS["01_vector"], writes=("vector", "notes")))
    run = tmp_path / "run"
    run_loop(run, C.resolve("tiny"), 1)
    assert "round_00/notes.txt" in json.loads(marker_path(run, 0, "01_vector").read_text())["outputs"]
    assert "round_NN/notes.txt" in contract.run_folder_tree() and "`notes` = `notes.txt`" in contract.stage_graph_markdown()
    capsys.readouterr()
    (run / "round_00" / "notes.txt").unlink()
    run_loop(run, C.resolve("tiny"), 1)
    assert "round 00 01_vector: round_00/notes.txt is missing: running it again" in capsys.readouterr().err
    assert (run / "round_00" / "notes.txt").read_text() == "what 01 noticed"
