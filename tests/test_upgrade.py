"""`steerheal upgrade`: a run folder written before "stage" (what 05 evaluates) became "condition"
is renamed in place, its step records still hold, and this version's readers and report work on it."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import pytest
from helpers import tiny_eval_round

from steerheal_utils import contract, markers, report
from steerheal_utils import evaluate as E
from steerheal_utils.cli import main
from steerheal_utils.runfolder import STAGES, RunFolderError, atomic_write_json
from steerheal_utils.upgrade import upgrade


def _files(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _as_older_version_wrote_it(run):
    """Rewrite a fresh run's eval names as the version before the rename wrote them (the key
    ``stages``, the row key ``stage``, ``eval_stages/``, the note and the prose), and move the
    hashes in its step records along, as that version's driver would have sealed them."""
    old_hash = {}
    ev = contract.path(run, 0, "eval")
    doc = json.loads(ev.read_text())
    doc = {("stages" if k == "conditions" else k): v for k, v in doc.items()}
    doc["notes"] = [n.replace("read from eval_conditions/", "read from eval_stages/") for n in doc["notes"]]
    doc["ci_method"] = doc["ci_method"].replace("every condition (seed", "every stage (seed").replace(
        "deltas are condition - base", "deltas are stage - base")
    rows = contract.path(run, 0, "eval_rows")
    old_rows = "".join(json.dumps({("stage" if k == "condition" else k): v for k, v in json.loads(line).items()}) + "\n"
                       for line in rows.read_text().splitlines())
    metrics = contract.run_path(run, "metrics")
    old_metrics = metrics.read_text().replace("condition", "stage", 1)
    for p, text in ((ev, json.dumps(doc, indent=2) + "\n"), (rows, old_rows), (metrics, old_metrics)):
        old_hash[p.relative_to(run).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                                   hashlib.sha256(text.encode()).hexdigest())
        p.write_text(text)
    contract.path(run, 0, "eval_cache").rename(contract.round_dir(run, 0) / "eval_stages")
    atomic_write_json(run / "shared_from.json", {"source": "elsewhere", "round": 0, "stages": ["01_vector"],
                                                 "eval_stages": ["base"]})
    for m in run.glob("round_00/.done/*.json"):
        rec = json.loads(m.read_text())
        for part in ("inputs", "outputs"):
            for rel, (new, old) in old_hash.items():
                if rec.get(part, {}).get(rel) == new:
                    rec[part][rel] = old
        atomic_write_json(m, rec)


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """A round 0 evaluated by this version (base, prompted, 2 random controls, steered), its 05 record
    sealed, the steps before it recorded as finished, metrics.csv and shared_from.json written."""
    run = tmp_path_factory.mktemp("upgrade") / "run"
    cfg, ctx, *_ = tiny_eval_round(run, {"eval_max_rows": 3, "probe_max_items": 2, "n_controls": 2,
                                         "heldout_max_new_tokens": 2})
    before = markers.input_snapshot(run, 0, "05_eval", cfg)
    E.run_stage(ctx, progress=False)
    for s in STAGES[:4]:  # records without hashes (an older version's): they count as holding
        atomic_write_json(contract.marker_path(run, 0, s), {"stage": s, "round": 0})
    markers.seal(run, 0, "05_eval", cfg, inputs_before=before)
    report.write_metrics(run)
    atomic_write_json(run / "shared_from.json", {"source": "elsewhere", "round": 0, "stages": ["01_vector"],
                                                 "eval_conditions": ["base"]})
    return run


def test_an_older_run_folder_is_renamed_in_place_and_its_records_still_hold(fresh_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fresh_run, run)
    want = _files(run)
    _as_older_version_wrote_it(run)
    assert markers.Checker(run).status(0, "05_eval").state == "ok"  # a consistent folder of the older version
    with pytest.raises(RunFolderError, match=r"it has 'stages'.*python -m steerheal_utils upgrade"):
        contract.read_eval(run, 0)

    done = upgrade(run)

    assert contract.path(run, 0, "eval_cache") in done
    assert _files(run) == want  # byte for byte what this version writes (records included)
    assert not (contract.round_dir(run, 0) / "eval_stages").exists()
    assert markers.Checker(run).status(0, "05_eval").state == "ok"
    assert set(contract.read_eval(run, 0)["conditions"]) == {"base", "prompted", "random_00", "random_01", "steered"}
    assert upgrade(run) == [] and _files(run) == want  # again: nothing to do
    with open(report.write_metrics(run)) as f:
        assert {r["condition"] for r in csv.DictReader(f)} >= {"base", "random", "steered"}
    assert "steered" in report.write_report(run).read_text()


def test_a_study_folder_is_upgraded_run_by_run_from_the_command_line(fresh_run, tmp_path, capsys):
    study = tmp_path / "study"
    for name in ("arm=a,seed=0", "arm=b,seed=0"):
        shutil.copytree(fresh_run, study / name)
        _as_older_version_wrote_it(study / name)
    (study / "runs.csv").write_text("arm,seed,round,stage,auth_nats\na,0,0,base,-1.5\n")

    assert main(["upgrade", str(study)]) == 0

    for name in ("arm=a,seed=0", "arm=b,seed=0"):
        assert _files(study / name) == _files(fresh_run)
    assert (study / "runs.csv").read_text() == "arm,seed,round,condition,auth_nats\na,0,0,base,-1.5\n"
    assert "files upgraded" in capsys.readouterr().err
    assert main(["upgrade", str(tmp_path / "nothing")]) == 1  # no run inside: one clear error
