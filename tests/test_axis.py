"""A trait axis from config alone: the probe file's validation, the axis knobs, and a tiny eval on a
custom axis whose metrics.csv and report carry that axis."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import tiny_eval_round

from steerheal_utils import axis, preflight
from steerheal_utils import config as C

REPO = Path(__file__).resolve().parent.parent


def _item(i, **kw):
    return json.dumps({"id": f"p{i}", "situation": f"situation {i}", "pos_option": f"warm {i}", "neg_option": f"cold {i}", **kw})


# ------------------------------------------------------------------ the probe file
def test_a_probe_in_either_schema_comes_back_in_the_shipped_one():
    rows = axis.parse_probe(_item(1) + "\n\n" + json.dumps(
        {"id": "q", "situation": "s", "care_option": "help", "authority_option": "obey"}))
    assert [(r["id"], r["care_option"], r["authority_option"]) for r in rows] == [("p1", "warm 1", "cold 1"), ("q", "help", "obey")]


@pytest.mark.parametrize("bad, line, says", [
    ('{"id": "p3", "situation": ', 3, "is not JSON"),
    ('["p3"]', 3, "expected a JSON object"),
    ('{"id": "p3", "situation": "s", "pos_option": "a"}', 3, "missing or empty text fields ['neg_option']"),
    ('{"id": "p3", "situation": " ", "pos_option": "a", "neg_option": "b"}', 3, "['situation']"),
    ('{"id": "p3", "situation": "s", "pos_option": "a", "neg_option": "b", "care_option": "c"}', 3, "exactly one option pair"),
    ('{"id": "p3", "situation": "s", "choice_a": "a", "choice_b": "b"}', 3, "found none"),
    ('{"id": "p3", "situation": "s", "pos_option": "same", "neg_option": "same "}', 3, "the same text"),
    ('{"id": "p1", "situation": "s", "pos_option": "a", "neg_option": "b"}', 3, "id 'p1' repeats line 1"),
])
def test_a_bad_probe_line_is_named_by_its_number(tmp_path, bad, line, says):
    f = tmp_path / "probe.jsonl"
    f.write_text(_item(1) + "\n" + _item(2) + "\n" + bad + "\n" + _item(4) + "\n")
    with pytest.raises(axis.ProbeError) as e:
        axis.load_probe(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f} line {line}") and says in msg and "\n" not in msg


def test_an_empty_or_missing_probe_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(axis.ProbeError, match="has no probe items"):
        axis.load_probe(str(tmp_path / "empty.jsonl"))
    with pytest.raises(axis.ProbeError, match="no such file"):
        axis.load_probe(str(tmp_path / "nope.jsonl"))


def test_the_shipped_probes_load():
    assert len(axis.load_probe("")) == 52 and len(axis.load_probe("", max_items=5)) == 5
    love = axis.load_probe("love_probe.jsonl")
    assert len(love) == 36 and len({r["id"] for r in love}) == 36


# ------------------------------------------------------------------ the generation pool
@pytest.mark.parametrize("bad, says", [
    ('{"id": "g3", "text": ', "is not JSON"),
    ('{"id": "g3", "text": " "}', "missing or empty text fields ['text']"),
    ('{"id": "g3", "text": "t", "domain": 3}', "domain must be text"),
    ('{"id": "g1", "text": "t"}', "id 'g1' repeats line 1"),
])
def test_a_bad_prompt_line_is_named_by_its_number(tmp_path, bad, says):
    f = tmp_path / "pool.jsonl"
    f.write_text('{"id": "g1", "text": "a"}\n{"id": "g2", "text": "b", "domain": "d"}\n' + bad + "\n")
    with pytest.raises(axis.ProbeError) as e:
        axis.load_prompts(str(f))
    assert str(e.value).startswith(f"{f} line 3") and says in str(e.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(axis.ProbeError, match="has no prompts"):
        axis.load_prompts(str(tmp_path / "empty.jsonl"))


def test_the_default_pool_is_the_shipped_dilemmas_and_the_love_pool_loads():
    from steerheal_utils import datafiles

    assert axis.load_prompts("") == datafiles.prompts("dilemmas") and C.resolve("tiny").axis_prompts == ""
    love = axis.load_prompts("love_prompts.jsonl")
    assert len(love) == 24 and all(r["text"].strip() and r["domain"] for r in love)
    dil = {r["text"] for r in datafiles.prompts("dilemmas")}
    assert not dil & {r["text"] for r in love}


def test_02_samples_from_the_axis_pool(tmp_path, monkeypatch):
    """generate.step reads its pool through axis.load_prompts(cfg.axis_prompts)."""
    from steerheal_utils.generate import step

    seen = []
    monkeypatch.setattr(step.axis, "load_prompts", lambda v: seen.append(v) or (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setattr(step.SteeringVector, "load", staticmethod(lambda p: None))
    monkeypatch.setattr(step, "check_vector_matches", lambda sv, m: None)

    class Ctx:
        cfg = C.resolve("tiny", {"axis_prompts": "love_prompts.jsonl"})
        seed, round = 0, 0
        def artifact(self, *a): return tmp_path / "x"
        def student(self, merge=False): return None, None
        def base(self): return None, None

    with pytest.raises(RuntimeError, match="stop"):
        step.run_stage(Ctx())
    assert seen == ["love_prompts.jsonl"]


# ------------------------------------------------------------------ the knobs
def test_axis_knobs_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    with pytest.raises(C.ConfigError, match="axis_labels and axis_map take two values"):
        C.resolve("tiny", {"axis_labels": ["warm"]})
    with pytest.raises(C.ConfigError, match="'Kindness' is not a foundation"):
        preflight.check(C.resolve("tiny", {"axis_map": ["Kindness", "Care"]}))
    bad = tmp_path / "p.jsonl"
    bad.write_text(_item(1) + "\n" + '{"id": "p2"}\n')
    with pytest.raises(C.ConfigError, match=r"p\.jsonl line 2: give exactly one option pair"):
        preflight.check(C.resolve("tiny", {"axis_probe": str(bad)}))
    with pytest.raises(C.ConfigError, match=r"p\.jsonl line 1: missing or empty text fields \['text'\]"):
        preflight.check(C.resolve("tiny", {"axis_prompts": str(bad)}))
    # a bare name is a shipped file; a relative path is made absolute against the caller's folder
    monkeypatch.chdir(tmp_path)
    assert C.resolve("tiny", {"axis_probe": "love_probe.jsonl"}).axis_probe == "love_probe.jsonl"
    assert C.resolve("tiny", {"axis_probe": "./p.jsonl"}).axis_probe == str(bad)
    assert axis.probe_path("love_probe.jsonl").is_file()


def test_the_love_config_file_sets_the_axis_and_keeps_the_preset(tmp_path):
    from steerheal_utils.cli import run_config

    cfg = run_config("tiny", str(REPO / "configs" / "love.yaml"), ["seed=3"])
    assert (cfg.axis_name, cfg.axis_labels, cfg.axis_map) == ("love", ["warm", "cold"], ["Social Norms", "Care"])
    assert "unconditional warmth" in cfg.pos_persona and cfg.seed == 3 and cfg.axis_prompts == "love_prompts.jsonl"
    assert cfg.n_contexts == C.PRESETS["tiny"]["n_contexts"]  # keys the file does not set come from the preset
    preflight.check(cfg)
    ax = axis.from_config(cfg)
    assert ax.headline == ("axis_logodds", "care_nats", "social_nats", "coherence") and not ax.is_default


# ------------------------------------------------------------------ a tiny eval on a custom axis
def test_a_custom_axis_reaches_eval_json_metrics_csv_and_the_report(tmp_path):
    from steerheal_utils import evaluate as E
    from steerheal_utils import report
    from steerheal_utils.runfolder import STAGES, atomic_write_json, marker_path

    probe = tmp_path / "kind.jsonl"
    probe.write_text("\n".join(_item(i) for i in range(5)) + "\n")
    run = tmp_path / "run"
    _, ctx, *_ = tiny_eval_round(run, {"eval_max_rows": 7, "heldout_max_new_tokens": 2, "axis_name": "kindness",
                                       "axis_labels": ["kind", "cold"], "axis_probe": str(probe),
                                       "axis_map": ["Liberty", "Care"]})
    res = E.run_stage(ctx, progress=False)
    out = res.record

    assert out["n_probe"] == 5 and out["axis"]["name"] == "kindness"
    assert all(len(s["axis_items"]) == 5 and "axis_logodds" in s["ci"] for s in out["conditions"].values())
    assert set(out["control_band"]["position"]) == {"axis_logodds", "care_nats", "liberty_nats", "coherence"}
    assert [k for k in E.summary_table(res)[0]][:3] == ["condition", "liberty_nats", "liberty_nats_ci"]

    for s in STAGES:  # the records report and metrics read (legacy markers count as holding)
        atomic_write_json(marker_path(run, 0, s), {"stage": s, "round": 0})
    with open(report.write_metrics(run)) as f:
        rows = {r["condition"]: r for r in csv.DictReader(f)}
    steered = rows["steered"]
    assert (steered["axis_name"], steered["axis_pos"], steered["axis_neg"]) == ("kindness", "kind", "cold")
    assert float(steered["axis_logodds"]) == pytest.approx(out["conditions"]["steered"]["axis_logodds"], abs=1e-5)
    assert steered["delta_liberty_nats_lo"] and steered["liberty_nats_band_rank"]
    assert rows["random"]["delta_liberty_nats_hi"]  # the band row: max over the controls
    page = report.write_report(run).read_text()
    assert "Axis: <b>kindness</b>" in page and "kindness map: Care vs Liberty" in page
    assert any("axis kindness: axis_logodds = log p(kind) - log p(cold)" in line for line in report.headline_lines(run))
    steer = {r["condition"]: r for r in axis.steerability(run)}
    assert set(steer) == {"base", "prompted", "random", "steered"} and steer["random"]["interval"] == "band_min_max"
    assert steer["steered"]["axis_logodds_band_rank"] == out["control_band"]["position"]["axis_logodds"]["rank"]


def test_the_default_axis_keeps_metrics_csv_columns():
    from steerheal_utils import report

    assert report.csv_columns(axis.from_config(C.Config())) == report.CSV_COLUMNS
    assert axis.from_eval({}) == axis.DEFAULT
