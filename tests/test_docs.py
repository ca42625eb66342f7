"""The README's study numbers come from the committed study outputs, and those outputs agree
with each other: results.md is pasted verbatim, and summary.csv is what the study's own
summariser gives on runs.csv."""

import csv
import json
from pathlib import Path

import pytest

from steerheal_utils.tools import study

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "study"
BEGIN = "<!-- begin docs/study/results.md"
END = "<!-- end docs/study/results.md -->"


def _num(v: str):
    return None if v == "" else float(v)


def test_readme_pastes_results_md_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    block = readme.split(BEGIN, 1)[1].split("\n", 1)[1].split(END, 1)[0]
    assert block == (DOCS / "results.md").read_text()


def test_committed_summary_is_the_summary_of_committed_runs():
    with open(DOCS / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    rows = [{**r, "seed": int(r["seed"]), "round": int(r["round"]),
             **{k: _num(r[k]) for k in study.SUMMARY_KEYS}} for r in runs]
    recomputed = study.summarize(rows)
    with open(DOCS / "summary.csv") as f:
        committed = list(csv.DictReader(f))
    assert [(r["arm"], r["condition"], int(r["round"])) for r in committed] == [(r["arm"], r["condition"], r["round"]) for r in recomputed]
    for c, r in zip(committed, recomputed):
        for k in study.SUMMARY_KEYS:
            for m in ("mean", "min", "max"):
                want = r[f"{k}_{m}"]
                got = _num(c[f"{k}_{m}"])
                assert (got is None) == (want is None), (c["arm"], c["condition"], k, m)
                if want is not None:
                    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (c["arm"], c["condition"], k, m)


def test_study_json_names_the_command_and_every_run():
    meta = json.loads((DOCS / "study.json").read_text())
    assert meta["command"].startswith("python -m steerheal_utils study")
    points = [(a, s) for a in meta["arms"] for s in meta["seeds"]]
    # the committed study predates the study-as-a-sweep names (arm=rmse,seed=0): its runs are rmse-s0 ...
    assert set(meta["runs"]) in ({study.run_name(a, s) for a, s in points}, {f"{a}-s{s}" for a, s in points})
    assert not meta["errors"]
    assert f"`{meta['command']}`" in (DOCS / "results.md").read_text()
