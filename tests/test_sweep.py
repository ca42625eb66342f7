"""Sweeps and their engines: grid expansion and names, status from the step records, retries and
Slurm-style requeue through the engines (fake commands, seconds), the shared cache under two jobs
starting together, and a 2 seeds x 2 arms tiny sweep through each engine with a job killed
mid-stage and retried by the engine (slow)."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steerheal_utils import cli, contract
from steerheal_utils import embedded as E
from steerheal_utils.config import ConfigError
from steerheal_utils.runfolder import atomic_write_json, atomic_write_text, round_config
from steerheal_utils.tools import executors as X
from steerheal_utils.tools import sweep as S

from conftest import fake_round

REPO = Path(__file__).resolve().parent.parent


# ====================================================================== grid and names
def test_grid_expands_to_readable_names_independent_of_axis_order():
    a = S.expand(S.Spec(preset="tiny", rounds=1, grid=S.parse_grid(["seed=0,1", "kl_agg=rmse,mean"])))
    b = S.expand(S.Spec(preset="tiny", rounds=1, grid=S.parse_grid(["kl_agg=rmse,mean", "seed=0,1"])))
    assert sorted(r.name for r in a) == sorted(r.name for r in b) == [
        "kl_agg=mean,seed=0", "kl_agg=mean,seed=1", "kl_agg=rmse,seed=0", "kl_agg=rmse,seed=1"]
    by = {r.name: r for r in a}
    assert (by["kl_agg=mean,seed=1"].cfg.kl_agg, by["kl_agg=mean,seed=1"].cfg.seed) == ("mean", 1)
    assert by["kl_agg=rmse,seed=0"].overrides == {"kl_agg": "rmse", "seed": 0}
    # adding a value renames nothing that existed
    c = S.expand(S.Spec(preset="tiny", grid=S.parse_grid(["seed=0,1,2", "kl_agg=rmse,mean"])))
    assert {r.name for r in a} < {r.name for r in c}


def test_names_come_from_typed_values_and_are_filesystem_safe():
    runs = S.expand(S.Spec(preset="tiny", common={"dose": 0.1},
                           grid={"lr": ["1e-4", 0.0002], "layers": [[1, 2]], "model": ["tiny:llama"]}))
    names = [r.name for r in runs]
    assert names[0].startswith("layers=_1_2_~") and ",lr=0.0001," in names[0] and ",lr=0.0002," in names[1]
    assert all(",model=tiny_llama~" in n for n in names)  # ':' is not kept; the hash keeps values apart
    assert runs[0].overrides == {"dose": 0.1, "lr": 0.0001, "layers": [1, 2], "model": "tiny:llama"}  # typed
    for n in names:
        assert "/" not in n and " " not in n and not n.startswith((".", "-"))
    assert S.safe_part("a/b") != S.safe_part("a_b") and S.safe_part("a/b") != S.safe_part("a:b")
    assert S.safe_part("a/b") == S.safe_part("a/b")  # stable: a hash of the value, not of the other runs
    long = S.run_name({"pos_persona": "x" * 400, "seed": "1"})
    assert len(long.encode()) <= S.MAX_NAME_BYTES and long != S.run_name({"pos_persona": "x" * 401, "seed": "1"})


def test_parse_grid_splits_outside_brackets_and_parses_yaml():
    assert S.parse_grid(["seed=0,1", "layers=[3,4],[5]", "kl_agg='a,b',mean"]) == {
        "seed": [0, 1], "layers": [[3, 4], [5]], "kl_agg": ["a,b", "mean"]}
    with pytest.raises(S.SweepError, match="given twice"):
        S.parse_grid(["seed=0", "seed=1"])
    with pytest.raises(S.SweepError, match="empty value"):
        S.parse_grid(["seed=0,"])
    with pytest.raises(S.SweepError, match="expects key=v1"):
        S.parse_grid(["seed"])


def test_named_axis_from_a_yaml_spec(tmp_path):
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text("preset: tiny\nrounds: 2\nset: {dose: 0.1}\n"
                         "grid:\n  seed: [0, 1]\n  arm:\n    rmse: {kl_agg: rmse}\n    nll: {reg: nll}\n")
    spec = S.load_spec(spec_file)
    runs = {r.name: r for r in S.expand(spec)}
    assert sorted(runs) == ["arm=nll,seed=0", "arm=nll,seed=1", "arm=rmse,seed=0", "arm=rmse,seed=1"]
    assert runs["arm=nll,seed=1"].overrides == {"dose": 0.1, "reg": "nll", "seed": 1}
    assert runs["arm=nll,seed=1"].cfg.reg == "nll" and runs["arm=rmse,seed=0"].cfg.kl_agg == "rmse"
    assert spec.rounds == 2


@pytest.mark.parametrize("spec, match", [
    (S.Spec(preset="tiny", grid={"sed": [0, 1]}), "'sed' is not a config key.*Did you mean seed"),
    (S.Spec(preset="tiny", grid={"seed": [0, -1]}), "run seed=-1: seed: -1 is out of range"),
    (S.Spec(preset="tiny", common={"seed": 3}, grid={"seed": [0, 1]}), "both a grid axis and a --set"),
    (S.Spec(preset="tiny", grid={"arm": {"a": {"seed": 1}}, "seed": [0]}), "sets \\['seed'\\], which another axis sets"),
    (S.Spec(preset="tiny", grid={"lr": ["1e-4", 0.0001]}), "both named 'lr=0.0001'"),
    (S.Spec(preset="nope"), "unknown preset"),
    (S.Spec(preset="tiny", rounds=0), "rounds: expected an integer"),
])
def test_bad_specs_are_one_line_errors_before_anything_is_written(spec, match):
    with pytest.raises(ConfigError, match=match):
        S.expand(spec)


def test_config_is_written_once_and_a_changed_one_refused(tmp_path):
    spec = S.Spec(preset="tiny", rounds=1, common={"dose": 0.1}, grid={"seed": [0, 1]})
    runs = S.expand(spec)
    S.init_runs(tmp_path, spec, runs)
    cfg_file = contract.run_path(tmp_path / "seed=0", "config")
    before = cfg_file.read_bytes()
    S.init_runs(tmp_path, spec, runs)  # the same spec again: nothing rewritten
    assert cfg_file.read_bytes() == before
    changed = S.Spec(preset="tiny", rounds=1, common={"dose": 0.2}, grid={"seed": [0, 1]})
    with pytest.raises(S.SweepError, match=r"run seed=0: .* was started with a different config:\n  dose: 0.1 -> 0.2"):
        S.init_runs(tmp_path, changed, S.expand(changed))
    rec = json.loads((tmp_path / "sweep.json").read_text())
    assert rec["runs"]["seed=1"] == {"rounds": 1, "labels": {"seed": "1"}, "overrides": {"dose": 0.1, "seed": 1}}


# ====================================================================== status from the step records
def test_status_reads_each_run_from_its_step_records(tmp_path, capsys):
    spec = S.Spec(preset="tiny", rounds=2, grid={"seed": [0, 1, 2, 3, 4, 5, 6]})
    S.init_runs(tmp_path, spec, S.expand(spec))
    run = {i: tmp_path / f"seed={i}" for i in range(7)}

    def rounds(i, n, last_stages=None):
        for r in range(n):
            fake_round(run[i], r, round_config(run[i], r), stages=last_stages if r == n - 1 else None)

    rounds(0, 2)                                            # done
    rounds(1, 2, contract.STAGES[:2])                       # failed at round 01 03_filter
    contract.journal_path(run[1], 1, "03_filter").write_text("{}")
    log1 = S.log_path(tmp_path, "seed=1")
    atomic_write_text(log1, "=== attempt\n[round 2/2] 03_filter ...\nerror: round 01 03_filter failed: TooFewKept: 0 kept\n"
                            "  finished stages are kept\n")
    rounds(2, 1, contract.STAGES[:3])                       # interrupted inside round 00 04_heal
    contract.journal_path(run[2], 0, "04_heal").write_text("{}")
    rounds(4, 1)                                            # a record that no longer holds
    atomic_write_text(contract.path(run[4], 0, "completions"), "edited by hand\n")
    rounds(5, 1)                                            # the loop stopped itself after round 0
    atomic_write_json(contract.run_path(run[5], "stop"), {"round": 0, "reason": "coherence below coh_floor"})
    rounds(6, 1, contract.STAGES[:1])                       # running now (this process is "the sweep")
    rec = json.loads((tmp_path / "sweep.json").read_text())
    me = {"sweep_pid": os.getpid(), "sweep_host": socket.gethostname()}
    rec["jobs"] = {"seed=1": {**me, "state": "failed", "attempts": 2, "detail": "exited with 1", "log": str(log1)},
                   "seed=6": {**me, "state": "running", "attempts": 1, "detail": "", "log": str(S.log_path(tmp_path, "seed=6"))}}
    S.write_record(tmp_path, rec)

    st = {s.name: s for s in S.status(tmp_path)}
    assert [(st[f"seed={i}"].state, st[f"seed={i}"].rounds_done, st[f"seed={i}"].at) for i in range(7)] == [
        ("done", 2, ""), ("failed", 1, "round 01 03_filter"), ("interrupted", 0, "round 00 04_heal"),
        ("pending", 0, "round 00 01_vector"), ("stale", 0, "round 00 03_filter"), ("stopped", 1, ""),
        ("running", 0, "round 00 02_generate")]
    assert st["seed=1"].note == (f"exited with 1 after 2 attempts; log {log1}; "
                                 "last error: error: round 01 03_filter failed: TooFewKept: 0 kept")
    assert "completions.jsonl changed since 03_filter wrote it" in st["seed=4"].note
    assert "coh_floor" in st["seed=5"].note

    code = cli.main(["sweep", "status", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # a run failed
    assert out[0].split() == ["run", "state", "rounds", "at", "note"]
    assert out[2].split()[:5] == ["seed=1", "failed", "1/2", "round", "01"] and str(log1) in out[2]
    assert out[-1] == "7 runs: 1 done, 1 failed, 1 interrupted, 1 pending, 1 running, 1 stale, 1 stopped"
    code = cli.main(["sweep", "status", "--json", str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[3] == {"name": "seed=3", "state": "pending", "rounds_done": 0, "rounds": 2, "at": "round 00 01_vector",
                       "note": ""}

    # a sweep process that is gone no longer counts as running: the record is only a claim
    rec["jobs"]["seed=6"]["sweep_pid"] = _dead_pid()
    S.write_record(tmp_path, rec)
    assert {s.name: s.state for s in S.status(tmp_path)}["seed=6"] == "pending"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_status_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert cli.main(["sweep", "status", str(tmp_path)]) == 2
    assert "is not a sweep folder (no sweep.json)" in capsys.readouterr().err


# ====================================================================== engines on fake commands (seconds)
FLAKY = "import os, sys\np = sys.argv[1]\nfirst = not os.path.exists(p)\nopen(p, 'a').close()\nsys.exit(3 if first else 0)\n"


def _engines(tmp_path, jobs=2):
    fast_local = X.LocalExecutor(jobs)
    fast_local.retry_delay_s, fast_local.poll_s = 0.2, 0.1
    sub = X.slurm_executor(tmp_path / "submitit" / "%j", cluster="local", time_min=10, max_running=jobs)
    sub.retry_delay_s, sub.poll_s = 0.2, 0.2
    return {"local": fast_local, "submitit-local": sub}


@pytest.mark.parametrize("engine", ["local", "submitit-local"])
def test_engine_starts_a_failed_job_again_up_to_retries(tmp_path, engine):
    ex = _engines(tmp_path)[engine]
    flaky = X.Job("flaky", (sys.executable, "-c", FLAKY, str(tmp_path / "flag")), tmp_path / "logs" / "flaky.log")
    broken = X.Job("broken", (sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"), tmp_path / "logs" / "broken.log")
    seen = []
    out = ex.run([flaky, broken], retries=1, say=seen.append, on_change=lambda o: None)
    assert (out["flaky"].state, out["flaky"].attempts) == ("done", 2)
    assert (out["broken"].state, out["broken"].attempts) == ("failed", 2)
    assert out["broken"].detail.startswith("exited with 3")
    assert flaky.log.read_text().count("\n=== ") == 2 and broken.log.read_text().count("\nboom\n") == 2
    assert any("FAILED broken after 2 attempts" in m for m in seen)
    assert len(out["flaky"].ids) == 2 and out["flaky"].ids[0] != out["flaky"].ids[1]


PREEMPTED_ONCE = ("import os, sys, time\np = sys.argv[1]\n"
                  "if not os.path.exists(p):\n    open(p, 'w').close()\n    time.sleep(120)\n")


def test_submitit_requeues_a_preempted_job_by_itself(tmp_path):
    """Slurm's path for preemption and time limits, under submitit's local executor: the controller
    signals the job (USR2) before its time is up; RunCommand.checkpoint resubmits the same command
    and submitit requeues it, with no retry of ours (retries=0)."""
    import submitit

    ex = submitit.LocalExecutor(tmp_path / "submitit", max_num_timeout=2)
    ex.update_parameters(timeout_min=0.5, signal_delay_s=20)  # the signal comes 10 s after each start
    job = X.Job("preempted", (sys.executable, "-c", PREEMPTED_ONCE, str(tmp_path / "flag")), tmp_path / "p.log")
    eng = X.SubmititExecutor(ex)
    eng.poll_s = 0.2
    out = eng.run([job], retries=0, say=lambda m: None)
    assert (out["preempted"].state, out["preempted"].attempts) == ("done", 1), out["preempted"].detail
    log = job.log.read_text()
    assert log.count("\n=== ") == 3 and "preempted or at the time limit: submitit requeues this job" in log


def _convert_script() -> str:
    """test_reliability's slow fake conversion (read, not imported: a job must start in well under a
    second), with a longer conversion so that two jobs starting together surely overlap."""
    import ast

    tree = ast.parse((REPO / "tests" / "test_reliability.py").read_text())
    text = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "CONVERT_SCRIPT")
    assert "time.sleep(2.0)" in text
    return text.replace("time.sleep(2.0)", "time.sleep(8.0)")


@pytest.mark.parametrize("engine", ["local", "submitit-local"])
def test_two_jobs_starting_together_convert_the_shared_cache_once(tmp_path, monkeypatch, engine):
    """The embedded model's first use under the engine: two jobs start together on a fresh shared cache
    (STEERHEAL_CACHE reaches them); one converts, the other waits on the lock and uses its folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("STEERHEAL_CACHE", str(cache))
    gguf = tmp_path / E.GGUF_FILE
    gguf.write_bytes(b"fake gguf")
    log = tmp_path / "convert.log"
    script = tmp_path / "convert.py"
    script.write_text(_convert_script())
    jobs = [X.Job(f"job{i}", (sys.executable, str(script), str(log), str(gguf)), tmp_path / f"job{i}.log")
            for i in range(2)]
    out = _engines(tmp_path)[engine].run(jobs, retries=0, say=lambda m: None)
    assert all(o.ok for o in out.values()), [j.log.read_text()[-2000:] for j in jobs]
    assert log.read_text() == "start\nend\n"  # converted exactly once
    logs = [j.log.read_text() for j in jobs]
    assert sum("waiting for another process to finish converting" in t for t in logs) == 1
    assert all(str(cache / "models" / E.NAME) in t for t in logs)
    E.verify(cache / "models" / E.NAME)


def test_slurm_executor_needs_valid_settings(tmp_path):
    with pytest.raises(ConfigError, match="--time: expected a positive integer"):
        X.slurm_executor(tmp_path, cluster="local", time_min=0)
    with pytest.raises(ConfigError, match="--jobs must be an integer of at least 1"):
        X.LocalExecutor(0)


def test_the_local_backend_imports_no_engine_package(tmp_path):
    code = ("import sys\nfrom pathlib import Path\nfrom steerheal_utils.tools import executors, sweep\n"
            "job = executors.Job('a', (sys.executable, '-c', 'pass'), Path(sys.argv[1]))\n"
            "out = executors.LocalExecutor(1).run([job], say=lambda m: None)\n"
            "print(out['a'].state, sorted(m for m in ('submitit', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.log")], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "done []"


# ====================================================================== tiny sweeps through each engine (slow)
FAST = ["--set", "dose=0.1", "--set", "eval_max_rows=7", "--set", "probe_max_items=4", "--set", "threads=1"]
GRID = ["--grid", "seed=0,1", "--grid", "kl_agg=rmse,mean"]
NAMES = ["kl_agg=mean,seed=0", "kl_agg=mean,seed=1", "kl_agg=rmse,seed=0", "kl_agg=rmse,seed=1"]
KILLED = {"local": "kl_agg=mean,seed=1", "slurm": "kl_agg=rmse,seed=0"}  # a different run per engine


def _sweep_killing_one_job(tmp: Path, backend: str) -> dict:
    """``sweep run`` (2 jobs at once, one retry) on a fresh cache; SIGKILL the driver of one run while
    its 04_heal is under way (a crashed node, an OOM kill), and let the engine start it again."""
    sweep_dir, victim = tmp / "sweep", KILLED[backend]
    env = {**os.environ, "STEERHEAL_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    engine = ["--backend", "slurm", "--cluster", "local", "--time", "60"] if backend == "slurm" else []
    cmd = [sys.executable, "-m", "steerheal_utils", "sweep", "run", str(sweep_dir), "--preset", "tiny", "--rounds", "1",
           *GRID, *FAST, "--jobs", "2", "--retries", "1", *engine]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = sweep_dir / victim
    heal_nb = contract.journal_path(run, 0, "04_heal")
    deadline = time.time() + 1200
    try:
        while not heal_nb.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # the stage's kernel is starting / working
        assert not contract.marker_path(run, 0, "04_heal").exists(), "04_heal finished before the kill"
        stamps = {s: contract.marker_path(run, 0, s).stat().st_mtime_ns for s in contract.STAGES[:3]}
        driver_pid = int(contract.run_path(run, "lock").read_text())
        os.kill(driver_pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"dir": sweep_dir, "victim": victim, "rc": proc.returncode, "stdout": stdout, "stderr": stderr,
            "stamps": stamps, "env": env}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    return _sweep_killing_one_job(tmp_path_factory.mktemp("local"), "local")


@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory):
    return _sweep_killing_one_job(tmp_path_factory.mktemp("slurm"), "slurm")


def _metrics(run: Path) -> list[dict]:
    with open(contract.run_path(run, "metrics"), newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.slow  # 4 tiny runs, 2 at a time: ~3 min on 2 shared cores
@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_tiny_sweep_runs_every_point_and_the_killed_job_resumes(backend, request):
    sw = request.getfixturevalue(f"{backend}_sweep")
    assert sw["rc"] == 0, sw["stderr"][-4000:]
    table = sw["stdout"].splitlines()
    assert [ln.split()[:3] for ln in table[1:5]] == [[n, "done", "1/1"] for n in NAMES]
    assert table[-1] == "4 runs: 4 done"
    rec = json.loads((sw["dir"] / "sweep.json").read_text())
    assert {n: (j["state"], j["attempts"]) for n, j in rec["jobs"].items()} == {
        n: ("done", 2 if n == sw["victim"] else 1) for n in NAMES}
    assert "killed by SIGKILL" in sw["stderr"] or "exited with" in sw["stderr"]  # the engine saw the failure
    assert f"{sw['victim']} failed" in sw["stderr"] and "starting it again" in sw["stderr"]
    # the second attempt resumed at 04_heal: 01-03 untouched, their records written once
    run = sw["dir"] / sw["victim"]
    assert {s: contract.marker_path(run, 0, s).stat().st_mtime_ns for s in contract.STAGES[:3]} == sw["stamps"]
    second = (sw["dir"] / "logs" / f"{sw['victim']}.log").read_text().split("\n=== ")[-1]
    assert "04_heal" in second and "01_vector" not in second and "03_filter" not in second
    for n in NAMES:  # each run's config was written once, from its grid point
        cfg = round_config(sw["dir"] / n, 0)
        assert f"kl_agg={cfg.kl_agg},seed={cfg.seed}" == n and cfg.dose == 0.1


@pytest.mark.slow  # reuses both sweeps
def test_engines_and_the_kill_do_not_change_results(local_sweep, slurm_sweep):
    """Each engine killed a different run; every run's metrics (wall-clock aside) match across engines,
    and the seed really changed the run."""
    assert local_sweep["rc"] == 0 and slurm_sweep["rc"] == 0
    for n in NAMES:
        assert _metrics(local_sweep["dir"] / n) == _metrics(slurm_sweep["dir"] / n), n
    assert _metrics(local_sweep["dir"] / NAMES[0]) != _metrics(local_sweep["dir"] / NAMES[1])


@pytest.mark.slow  # reuses the local sweep: a second invocation starts nothing
def test_running_a_finished_sweep_again_starts_no_job(local_sweep):
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "sweep", "run", str(local_sweep["dir"])],
                       env=local_sweep["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 runs, 4 finished, 0 to run" in r.stderr and "started" not in r.stderr
