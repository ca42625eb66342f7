"""The study runner on the tiny preset: outputs, resume without new work, and that sharing round 0
between arms gives byte-identical files to computing them in the arm's own run.

The study is a sweep run through an executor: the shared fixture runs 2 arms x 2 seeds through
submitit's local executor (``--backend slurm --cluster local``: real processes under submitit's
own controller); the failed-run test runs it again through the local backend."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from steerheal_utils import config as C
from steerheal_utils import filter as F
from steerheal_utils.tools import study
from steerheal_utils.runfolder import STAGES


# the same for every arm: a fixed dose skips the dose search, fewer vignettes and probe items
FAST = ("--set", "dose=0.1", "--set", "eval_max_rows=7", "--set", "probe_max_items=4")
EXTRA = {"dose": 0.1, "eval_max_rows": 7, "probe_max_items": 4}


RMSE0, MEAN0, MEAN1 = study.run_name("rmse", 0), study.run_name("mean", 0), study.run_name("mean", 1)
SLURM_LOCAL = ("--backend", "slurm", "--cluster", "local", "--time", "30", "--jobs", "2")


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "STEERHEAL_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "steerheal_utils", "study", "--preset", "tiny", "--arms", "rmse", "mean",
                           "--seeds", "0", "1", "--rounds", "1", *SLURM_LOCAL, "--study-dir", str(tmp_path / "study"),
                           "--out", str(tmp_path / "out"), *FAST, *args], capture_output=True, text=True, env=env, timeout=900)


def markers(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.glob("round_*/.done/*.json"))}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    r = cli(tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


@pytest.mark.slow  # one tiny study (2 arms x 2 seeds x 1 round, submitit local): 11 min measured on the shared cores at load 10-17
def test_outputs_exist_with_their_columns(tiny_study):
    out = tiny_study / "out"
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {"arm", "seed", "round", "condition", "axis_logodds", "auth_nats", "care_nats", "coherence",
            "kept_loop_rate"} <= set(runs[0])
    assert {r["arm"] for r in runs} == {"rmse", "mean"}
    assert {r["condition"] for r in runs} >= {"base", "prompted", "random", "steered", "healed"}
    with open(out / "summary.csv") as f:
        summ = list(csv.DictReader(f))
    for k in ("axis_logodds", "auth_nats", "care_nats", "coherence", "kept_loop_rate"):
        assert {f"{k}_mean", f"{k}_sd", f"{k}_min", f"{k}_max"} <= set(summ[0])
    # within-seed uncertainty next to the spread over seeds: item-bootstrap CI of the seed mean, and of deltas vs base
    for r in summ:
        lo, hi, m = (float(r[f"auth_nats_{e}"]) for e in ("ci_lo", "ci_hi", "mean"))
        assert lo <= m <= hi, r["condition"]
        assert (r["delta_auth_nats_ci_lo"] == "") == (r["condition"] == "base")
    healed = next(r for r in summ if r["condition"] == "healed")
    assert float(healed["delta_auth_nats_ci_lo"]) <= float(healed["delta_auth_nats_mean"]) <= float(healed["delta_auth_nats_ci_hi"])
    # controls once, as arm "all"; healed per arm; kept loop rate only on steered/healed rows
    assert {(r["arm"], r["condition"]) for r in summ} == {("all", "base"), ("all", "prompted"), ("all", "random"),
                                                      ("rmse", "steered"), ("rmse", "healed"),
                                                      ("mean", "steered"), ("mean", "healed")}
    healed = [r for r in summ if r["condition"] == "healed"]
    assert all(r["kept_loop_rate_mean"] != "" and 0 <= float(r["kept_loop_rate_mean"]) <= 1 for r in healed)
    assert (out / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ceo = json.loads((out / "ceo_outputs.json").read_text())
    assert ceo["prompt_id"] == "heldout-ceo-logs" and set(ceo["arms"]) == {"rmse", "mean"}
    assert set(ceo["arms"]["rmse"]) == {"0"} and isinstance(ceo["base"], str)  # the first seed's answers
    meta = json.loads((out / "study.json").read_text())
    assert meta["scale"] == "full" and meta["seeds"] == [0, 1] and meta["arms"] == ["rmse", "mean"]
    assert meta["overrides"]["common"]["tau_mode"] == "quantile" and meta["overrides"]["common"]["dose"] == 0.1
    assert meta["control_max_abs_diff_between_arms"] == 0.0  # base/prompted/random do not depend on the arm
    assert meta["runs"][MEAN0]["shared_round0_stages"] == list(study.SHARED_STAGES)
    assert meta["runs"][RMSE0]["shared_round0_stages"] == []
    assert 0 < meta["wall_seconds"] and meta["compute_seconds_total"] > 0
    assert sorted(n for runs in meta["run_git_commits"].values() for n in runs) == sorted(
        study.run_name(a, s) for a in ("rmse", "mean") for s in (0, 1))
    assert meta["runs"][MEAN1]["shared_round0_stages"] == list(study.SHARED_STAGES)  # per seed, from rmse's run
    # round 0's arm-independent evals were copied from the first arm and read back, not recomputed
    shared = json.loads((tiny_study / "study" / MEAN0 / "shared_from.json").read_text())
    assert shared["eval_conditions"] == ["base", "prompted", "random_00", "random_01", "steered"]  # tiny: 2 controls
    notes = json.loads((tiny_study / "study" / MEAN0 / "round_00" / "eval.json").read_text())["notes"]
    assert {n.split(":")[0] for n in notes if "read from eval_conditions" in n} == {"base", "prompted", "random_00", "random_01",
                                                                               "steered"}
    # each run is its own process at threads=1, logged
    assert C.load_config(tiny_study / "study" / MEAN0 / "config.yaml").threads == 1
    assert "steerheal_utils run" in (tiny_study / "study" / "logs" / f"{MEAN0}.log").read_text()
    md = (out / "results.md").read_text()
    assert "| rmse | healed | 0 |" in md and "heldout-ceo-logs" in md
    assert "(CI " in md and "Difference from base" in md and "| all | random | 0 |" in md
    # Q0/Q1 evidence per arm and round: dose, keep rate, Q1 loop rates, heal NLL; nll has no barrier
    with open(out / "pipeline.csv") as f:
        pipe = {(r["arm"], r["round"]): r for r in csv.DictReader(f)}
    assert set(pipe) == {("rmse", "0"), ("mean", "0")}
    assert {p["n_seeds"] for p in pipe.values()} == {"2"}
    for r in pipe.values():
        assert float(r["dose_mean"]) == 0.1 and 0 <= float(r["keep_rate_mean"]) <= 1
        assert r["q1_loop_steered_mean"] != "" and r["heal_nll_last_mean"] != ""
    assert "| rmse | 0 | 0.100 |" in md and "Q1 loop" in md


@pytest.mark.slow  # one tiny study (2 arms x 2 seeds x 1 round, submitit local): 11 min measured on the shared cores at load 10-17
def test_second_invocation_does_no_stage_work(tiny_study):
    runs = [tiny_study / "study" / study.run_name(a, s) for a in ("rmse", "mean") for s in (0, 1)]
    before = [markers(r) for r in runs]
    assert all(len(b) == len(STAGES) for b in before)
    r = cli(tiny_study)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [markers(r) for r in runs] == before
    assert json.loads(r.stdout.strip().splitlines()[-1])["errors"] == []


@pytest.mark.slow  # one tiny study (2 arms x 2 seeds x 1 round, submitit local): 11 min measured on the shared cores at load 10-17
def test_shared_round0_is_byte_identical_to_its_own(tiny_study, tmp_path):
    """The arm that got round 0's 01-03 by copy has the same bytes an own computation gives."""
    from steerheal_utils.driver import run_loop

    copied = tiny_study / "study" / MEAN0
    rec = json.loads((copied / "shared_from.json").read_text())
    assert rec["source"].endswith(RMSE0) and "completions.jsonl" in rec["files"]
    assert "adapter/adapter_model.safetensors" not in rec["files"] and ".done/04_heal.json" not in rec["files"]
    own = tmp_path / "own"
    run_loop(own, study.arm_config("mean", 0, "full", "tiny", EXTRA), 1, stages=study.SHARED_STAGES)
    for name in ("completions.jsonl", "vector.safetensors"):
        assert (own / "round_00" / name).read_bytes() == (copied / "round_00" / name).read_bytes(), name


def test_arms_differ_only_in_their_heal_key():
    cfgs = [study.arm_config(a, 1, "quick") for a in study.ARMS]
    study.check_shareable(cfgs)
    diff = {k for c in cfgs[1:] for k in C.config_diff(cfgs[0], c)}
    assert {d.split(":")[0] for d in diff} == {"kl_agg", "reg", "data_source"}  # data_source: the prompt arm
    assert all(c.tau_mode == "quantile" and c.seed == 1 for c in cfgs)
    with pytest.raises(study.StudyError, match="max_new_tokens"):
        study.check_shareable([cfgs[0], C.validate({**cfgs[0].to_dict(), "max_new_tokens": 7})])


def test_strict_loop_gate_is_halfway_and_flags_a_near_loop():
    th = F.FilterThresholds()
    lab = [{"label": "coherent_x", "completion": "I would talk to my manager first and then decide what to do about it."}]
    strict, table = study.strict_loop_thresholds(th, lab)
    ref = F.text_scores(lab[0]["completion"])["min_window_distinct"]
    assert strict.min_window_distinct == pytest.approx((th.min_window_distinct + ref) / 2)
    assert strict.max_lrs_frac == pytest.approx(th.max_lrs_frac / 2 + F.text_scores(lab[0]["completion"])["lrs_frac"] / 2)
    assert table["max_ngram_repeat"][0] == th.max_ngram_repeat
    clean = {**F.text_scores("Tell the manager that the logs must stay, because people rely on the record being true "
                             "and honest about what happened."), "keep": True}
    near = {**clean, "ngram_repeat": 0.2}  # passes 03's 0.3 gate, not the strict ~0.15
    assert F.decide(near, th) == "keep" and study.loop_reason(near, strict) == "repetition"
    assert study.loop_reason(clean, strict) is None
    assert study.kept_loop_rate([clean, near, {**near, "keep": False}], strict) == 0.5
    assert study.kept_loop_rate([{**near, "keep": False}], strict) is None


def test_spread_and_summary_group_controls_once():
    assert study.spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert study.spread([None, ""])["n"] == 0
    rows = [{"arm": a, "seed": s, "round": 0, "condition": st, "axis_logodds": v, "auth_nats": -1.0, "care_nats": -2.0,
             "coherence": 0.9, "kept_loop_rate": None}
            for a in ("rmse", "mean") for s, v in ((0, 1.0), (1, 3.0)) for st in ("base", "healed")]
    summ = study.summarize(rows)
    assert [(r["arm"], r["condition"]) for r in summ] == [("all", "base"), ("mean", "healed"), ("rmse", "healed")]
    assert summ[0]["n_seeds"] == 2 and summ[0]["axis_logodds_mean"] == 2.0 and summ[0]["axis_logodds_max"] == 3.0
    assert study.control_mismatch(rows) == 0.0
    next(r for r in rows if (r["arm"], r["seed"], r["condition"]) == ("mean", 0, "base"))["axis_logodds"] = 1.5
    assert study.control_mismatch(rows) == pytest.approx(0.5)  # mean-s0's base now differs from rmse-s0's


@pytest.mark.slow  # reuses the tiny study; only process start-up and the outputs are new work
def test_a_failed_run_is_recorded_and_the_others_go_on(tiny_study, tmp_path):
    import shutil

    study_dir = tmp_path / "study"
    shutil.copytree(tiny_study / "study", study_dir)
    broken = study_dir / MEAN0
    shutil.rmtree(broken / "round_00")
    (broken / "round_00" / ".done").mkdir(parents=True)
    (broken / "round_00" / ".done" / "04_heal.json").write_text("{}")  # 04 done without 01-03: inconsistent
    rmse_before = markers(study_dir / RMSE0)
    env = {**__import__("os").environ, "STEERHEAL_CACHE": str(tiny_study / "cache")}
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "study", "--preset", "tiny", "--arms", "rmse", "mean",
                        "--seeds", "0", "--rounds", "1", "--study-dir", str(study_dir), "--out", str(tmp_path / "out"),
                        *FAST], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 1 and "Re-run the same command" in r.stderr
    meta = json.loads((tmp_path / "out" / "study.json").read_text())
    assert list(meta["errors"]) == [MEAN0] and "inconsistent" in meta["errors"][MEAN0]
    assert "inconsistent" in json.loads((broken / "study_error.json").read_text())["error"]
    assert markers(study_dir / RMSE0) == rmse_before  # the healthy run was left alone
    with open(tmp_path / "out" / "runs.csv") as f:
        assert {row["arm"] for row in csv.DictReader(f)} == {"rmse"}


def test_report_refuses_runs_made_with_another_config(tmp_path):
    run = tmp_path / RMSE0
    run.mkdir()
    C.save_config(study.arm_config("rmse", 0, "quick", "tiny"), run / "config.yaml")
    study.check_run_configs(tmp_path, ["rmse"], [0], "quick", "tiny")  # the same settings: fine
    with pytest.raises(study.StudyError, match="another config.*n_keep"):
        study.check_run_configs(tmp_path, ["rmse"], [0], "full", "tiny")


def test_pipeline_table_shows_flagged_doses(tmp_path):
    from steerheal_utils.runfolder import atomic_write_json

    for seed, flag in ((0, "below_target;at_lower_bound"), (1, "")):
        atomic_write_json(tmp_path / study.run_name("rmse", seed) / "round_01" / "generate.json",
                          {"dose": 0.005 if flag else 0.05, "dose_flag": flag})
    rows = study.pipeline_rows(tmp_path, ["rmse"], [0, 1])
    assert [r["dose_flag"] for r in rows] == ["below_target;at_lower_bound", ""]
    (summary,) = study.summarize_pipeline(rows)
    assert summary["dose_flags"] == "s0: below_target;at_lower_bound"
    meta = {"scale": "quick", "preset": "default", "rounds": 2, "seeds": [0, 1], "command": "x", "arms": ["rmse"]}
    md = study.results_markdown([], {"prompt_id": "p", "seed": 0, "arms": {}}, meta, [summary])
    assert "| rmse | 1 | 0.028 [0.005, 0.050] **s0: below_target;at_lower_bound** |" in md


def test_the_study_is_a_sweep_whose_configs_are_the_arms():
    from steerheal_utils.tools import sweep

    spec = study.study_spec(["rmse", "nll"], [0, 1], 2, scale="quick", preset="tiny", extra={"dose": 0.1})
    runs = sweep.expand(spec)
    assert sorted(r.name for r in runs) == ["arm=nll,seed=0", "arm=nll,seed=1", "arm=rmse,seed=0", "arm=rmse,seed=1"]
    for r in runs:
        arm, seed = r.labels["arm"], int(r.labels["seed"])
        assert r.name == study.run_name(arm, seed)
        assert r.cfg.to_dict() == study.arm_config(arm, seed, "quick", "tiny", {"dose": 0.1}).to_dict()
    with pytest.raises(study.StudyError, match="sets these per arm"):
        study.study_spec(["rmse"], [0], 1, extra={"seed": 3})


def test_an_old_study_folder_is_renamed_to_its_sweep_name(tmp_path):
    (tmp_path / "rmse-s0" / "round_00").mkdir(parents=True)
    (tmp_path / "mean-s0").mkdir()
    (tmp_path / MEAN0).mkdir()  # both exist: left alone
    study.adopt_old_names(tmp_path, ["rmse", "mean"], [0], log=lambda m: None)
    assert (tmp_path / RMSE0 / "round_00").is_dir() and not (tmp_path / "rmse-s0").exists()
    assert (tmp_path / "mean-s0").is_dir()


@pytest.mark.slow  # reuses the tiny study: `sweep status` reads its four runs
def test_sweep_status_reads_the_study(tiny_study):
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "sweep", "status", str(tiny_study / "study")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "4 runs: 4 done"
    rec = json.loads((tiny_study / "study" / "sweep.json").read_text())
    assert {j["engine"] for j in rec["jobs"].values()} == {"slurm(local)"}
    assert rec["spec"]["grid"]["seed"] == [0, 1] and rec["spec"]["rounds"] == 1
