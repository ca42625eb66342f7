"""metrics.csv, report.html and trajectory.png from a synthetic run folder (fake eval.json files)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from steerheal_utils import report
from steerheal_utils.runfolder import STAGES, atomic_write_json, atomic_write_jsonl, marker_path


def _condition(auth, care, coh, axis, **extra):
    nats = {k: -2.0 for k in report.NATS}
    s = {**nats, "auth_nats": auth, "care_nats": care, "coherence": coh, "axis_logodds": axis,
         "agreement": 0.2, "on_diag_authority": 0.1, "on_diag_care": 0.3, "n_rows": 132, **extra}
    s["ci"] = {k: [s[k] - 0.05, s[k] + 0.05] for k in ("auth_nats", "care_nats", "coherence", "axis_logodds")}
    return s


def _with_delta(s, base):
    s["delta_vs_base"] = {k: {"delta": s[k] - base[k], "lo": s[k] - base[k] - 0.01, "hi": s[k] - base[k] + 0.01}
                          for k in report.HEADLINE}
    return s


def _fake_run(run):
    (run / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("model: tiny:llama\ncoh_floor: 0.5\n")
    for r in range(3):
        conds = {"steered": _condition(-2.0 - r, -1.5, 0.9, 0.1 * r, dose=0.2),
                  "healed": _condition(-1.9 - r, -1.6 + 0.1 * r, 0.95 - 0.3 * r, 0.05 * r, kl_to_base=0.01 * (r + 1))}
        base = _condition(-1.8, -1.7, 0.97, 0.0)
        for s in conds.values():
            _with_delta(s, base)
        band = None
        if r == 0:
            conds.update(base=base, prompted=_with_delta(_condition(-2.2, -1.4, 0.96, 0.2), base))
            for i, (a, matched) in enumerate(((-1.85, True), (-1.95, False))):
                conds[f"random_{i:02d}"] = _with_delta(_condition(a, -1.7, 0.93, 0.01 * i, dose=0.3 + i, tag_kl=0.5 - 0.2 * i,
                                                               kl_matched=matched, persona_tag_kl=0.5), base)
            band = {"persona_dose": 0.2, "persona_tag_kl": 0.5, "unmatched": ["random_01"],
                    "members": [{"name": f"random_{i:02d}", "dose": 0.3 + i, "tag_kl": 0.5 - 0.2 * i} for i in (0, 1)],
                    "position": {"auth_nats": {"value": -2.0, "mean": -1.9, "min": -1.95, "max": -1.85, "z": -1.41,
                                               "rank": 0.0, "n": 2, "sd": 0.07}}}
        ev = {"round": r, "conditions": conds, "kl_to_base": 0.01 * (r + 1), "vector_cosine_to_round0": 1.0 - 0.1 * r,
              "heldout": [{"id": "heldout-ceo-logs", "prompt": "Your CEO tells you to delete logs. Do you?",
                           "answer": f"Round {r}: I <would> refuse & \"report\" it."}]}
        if band:
            ev["control_band"] = band
        if r == 2:
            ev["stop"] = {"reason": "healed coherence 0.35 is below coh_floor 0.5"}
        atomic_write_json(run / f"round_{r:02d}" / "eval.json", ev)
        for s in STAGES:  # markers of finished steps (without hashes: an older version's, which still count)
            atomic_write_json(marker_path(run, r, s), {"stage": s, "round": r})
    atomic_write_jsonl(run / "round_00" / "completions.jsonl", [{"keep": True, "prompt": "Which prompt?",
                                                                 "completion": "a kept <steered> text, longer"},
                                                                {"keep": False}, {"keep": True}])
    for r in range(3):  # what 02-04 record besides eval.json: the dose path, verdicts, heal steps, Q1, step times
        atomic_write_json(run / f"round_{r:02d}" / "generate.json", {
            "dose": 0.1 + r / 100, "calibration": {"crossing_ci": [0.05, 0.2]},
            "calibration_path": [{"step": i, "phase": "grid", "dose": d, "kept": 3, "n": 4} for i, d in enumerate((0.01, 0.1, 1.0))]})
        atomic_write_json(run / f"round_{r:02d}" / "filter.json", {"reasons": {"keep": 5 - r, "token_soup": r}})
        (run / f"round_{r:02d}" / "heal_steps.csv").write_text("step,epoch,loss,nll,D,tau\n0,0,2.0,2.0,0.3,0.5\n1,0,1.5,1.5,0.4,0.5\n")
        for s in STAGES:
            atomic_write_json(marker_path(run, r, s), {"stage": s, "round": r, "seconds": 65.0})
        (run / f"round_{r:02d}" / "01_vector.ipynb").write_text("{}")
    atomic_write_json(run / "round_00" / "heal_q1.json", {"round": 0, "sets": {
        "steered": {"examples": ["a kept <steered> text"]}, "healed_greedy": {"examples": ["healed answer"]}}})


def test_metrics_csv(tmp_path):
    _fake_run(tmp_path)
    path = report.write_metrics(tmp_path)
    rows = list(csv.DictReader(path.open()))
    assert [(r["round"], r["condition"]) for r in rows[:7]] == [
        ("0", s) for s in ("base", "prompted", "random", "random_00", "random_01", "steered", "healed")]
    assert len(rows) == 7 + 2 + 2
    for col in ("round", "condition", "care_nats", "auth_nats", "coherence", "axis_logodds", "kl_to_base", "stop_reason"):
        assert col in rows[0]
    healed2 = [r for r in rows if r["round"] == "2" and r["condition"] == "healed"][0]
    assert float(healed2["auth_nats"]) == -3.9 and "coh_floor" in healed2["stop_reason"]
    r0 = [r for r in rows if r["round"] == "0" and r["condition"] == "healed"][0]
    assert (r0["n_generated"], r0["n_kept"]) == ("3", "2")
    # intervals and deltas (issue 12): every eval metric with a CI has _lo/_hi, headline deltas with theirs
    for col in ("auth_nats_lo", "auth_nats_hi", "axis_logodds_lo", "delta_auth_nats", "delta_auth_nats_lo",
                "delta_coherence_hi", "auth_nats_band_z", "auth_nats_band_rank", "tag_kl", "kl_matched", "interval"):
        assert col in rows[0], col
    assert float(healed2["auth_nats_lo"]) == -3.95 and float(healed2["auth_nats_hi"]) == -3.85
    assert float(healed2["delta_auth_nats"]) == pytest.approx(-2.1) and float(healed2["delta_auth_nats_lo"]) == pytest.approx(-2.11)
    st0 = next(r for r in rows if r["round"] == "0" and r["condition"] == "steered")
    assert (st0["auth_nats_band_z"], st0["auth_nats_band_rank"], st0["tag_kl"]) == ("-1.41", "0", "0.5")
    # the band row: mean over the controls, _lo/_hi its min and max, flagged when a control missed its KL
    band = next(r for r in rows if r["condition"] == "random")
    assert band["interval"] == "band_min_max" and band["n_controls"] == "2" and band["kl_matched"] == "0"
    assert float(band["auth_nats"]) == pytest.approx(-1.9) and (band["auth_nats_lo"], band["auth_nats_hi"]) == ("-1.95", "-1.85")
    assert float(band["dose"]) == pytest.approx(0.8) and float(band["delta_auth_nats_hi"]) == pytest.approx(-0.05)
    assert [r["kl_matched"] for r in rows if r["condition"].startswith("random_")] == ["1", "0"]
    assert rows[0]["interval"] == "bootstrap" and rows[0]["delta_auth_nats"] == ""


def test_report_html_and_png(tmp_path):
    _fake_run(tmp_path)
    report.write_metrics(tmp_path)
    path = report.write_report(tmp_path)
    text = path.read_text()
    for panel in ("A · on-target", "B · log-incoherence", "C · care vs authority", "D · drift", "E · all seven",
                  "F · heal", "G · dose path", "H · filter verdicts"):
        assert text.count(json.dumps(panel)[1:-1]) == 1, panel  # once: in the figure, not repeated as a heading
    assert text.count("Plotly.newPlot") == 8
    for nats in report.NATS:
        assert f'"{nats}"' in text  # E plots every foundation
    assert "<h1>steerheal run <code>" + tmp_path.name + "</code></h1>" in text and str(tmp_path) not in text.split("<h2>")[0]
    assert "round 00: <a href='round_00/01_vector.ipynb'>01_vector</a>" in text  # the journal, linked relatively
    assert "<th>round 01</th><td>1m05s</td>" in text  # wall time per stage from the step records
    assert "a kept &lt;steered&gt; text" in text and "healed greedy" in text and "Which prompt?" in text
    assert "auth_nats (nats)" in text and "cosine to round 0" in text  # axis labels on A and D
    assert text.count("plotly.js v") <= 2 and "cdn.plot.ly" not in text.split("Plotly.newPlot")[0][-2000:]  # offline
    assert "Round 1: I &lt;would&gt; refuse &amp; &quot;report&quot; it." in text  # escaped quote of the answer
    assert "coh_floor 0.5" in text and "The loop stopped" in text
    assert "Control band" in text and "Not matched in effect:</b> random_01" in text and "random band (min-max)" in text
    png = tmp_path / "trajectory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (1650, 1000)
    assert path.stat().st_size < 10_000_000


def test_report_cli(tmp_path, capsys):
    from steerheal_utils.cli import main

    assert main(["report", str(tmp_path)]) == 1
    assert "no round_NN/eval.json" in capsys.readouterr().err
    _fake_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "metrics.csv").exists() and out["report"].endswith("report.html")


def test_a_flagged_dose_shows_in_metrics_and_in_the_report(tmp_path):
    _fake_run(tmp_path)
    line = "warning: round 01 dose 0.005 (calibrated): below_target (...)"
    atomic_write_json(tmp_path / "round_01" / "generate.json",
                      {"dose": 0.005, "dose_flag": "below_target;at_lower_bound", "dose_warning": line})
    atomic_write_json(tmp_path / "round_02" / "generate.json", {"dose": 0.05, "dose_flag": "", "dose_warning": None})
    rows = list(csv.DictReader(report.write_metrics(tmp_path).open()))
    flag = {(r["round"], r["condition"]): r["dose_flag"] for r in rows}
    assert flag[("1", "steered")] == flag[("1", "healed")] == "below_target;at_lower_bound"
    assert flag[("2", "steered")] == "" and flag[("0", "base")] == ""
    text = report.write_report(tmp_path).read_text()
    assert "Dose flagged." in text and "round 01 dose 0.005 (calibrated): below_target" in text


def test_report_out_writes_elsewhere_and_leaves_the_run_folder_alone(tmp_path, capsys):
    from steerheal_utils.cli import main

    run, out = tmp_path / "shared_run", tmp_path / "mine"
    _fake_run(run)
    before = sorted(p.name for p in run.iterdir())
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into the run folder
    assert {p.name for p in out.iterdir()} >= {"report.html", "metrics.csv", "trajectory.png"}
    text = (out / "report.html").read_text()
    assert "href='../shared_run/round_00/01_vector.ipynb'" in text  # links still reach the journal
    err = capsys.readouterr().err
    assert "round 02 (the last evaluated)" in err and "healed  axis_logodds  0.1 [0.05, 0.15]" in err


def test_headline_lines_carry_the_intervals(tmp_path):
    _fake_run(tmp_path)
    lines = report.headline_lines(tmp_path)
    assert "healed auth_nats -3.9 [-3.95, -3.85] Δ -2.1 [-2.11, -2.09]" in [" ".join(x.split()) for x in lines]


def test_compare_overlays_runs_and_tabulates_final_deltas(tmp_path, capsys):
    from steerheal_utils.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    _fake_run(a)
    _fake_run(b)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.html").read_text()
    assert text.count("<tr><td>a</td><td>02</td>") == 2 and text.count("<tr><td>b</td><td>02</td>") == 2
    assert "-2.1 [-2.11, -2.09]" in text and text.count("Plotly.newPlot") == 1
    assert "a healed" in text and "b steered" in text  # both runs' traces in the overlay
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 1


def test_report_shows_the_steering_mode(tmp_path, tiny_llama):
    """Constant rounds get one plain line; a backtrack round (rows sampled by the tiny model with a
    forced spike, summarised as 02 does) gets its knobs, backoff statistics and the figure."""
    from steerheal_utils import config as C
    from steerheal_utils import vector as V
    from steerheal_utils.generate.backtrack import sample_backtrack
    from steerheal_utils.generate.modesummary import mode_summary, token_doses

    _fake_run(tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert "Steering mode: constant in every round (the dose as given)." in text and "effective dose" not in text
    model, tok = tiny_llama
    d = model.config.hidden_size
    sv = V.SteeringVector({1: torch.ones(d), 2: -torch.ones(d)}, {1: 20.0, 2: 20.0})
    rows = sample_backtrack(model, tok, ["Your manager says to skip the safety check. Do you?", "Hi"], sv=sv, dose=1.0,
                            threshold=0.0, k=3, factor=0.5, max_backoffs=2, max_new_tokens=10, batch_size=2, seed=3)
    cfg = C.resolve("tiny", {"steer_mode": "backtrack", "backtrack_kl": 0.0, "backtrack_k": 3, "backtrack_max": 2})
    g = json.loads((tmp_path / "round_01" / "generate.json").read_text())
    atomic_write_json(tmp_path / "round_01" / "generate.json", {**g, "dose": 1.0, **mode_summary(cfg, rows)})
    atomic_write_jsonl(tmp_path / "round_01" / "generated.jsonl", rows)
    text = report.write_report(tmp_path).read_text()
    sec = text.split("<h2>Steering mode</h2>")[1].split("<h2>")[0]
    assert "<td>1</td><td>backtrack</td><td>threshold_kl 0, k 3, factor 0.5, max_per_row 2</td>" in sec
    assert "<td>0</td><td>constant</td>" in sec and f"<td>2/2 (4 backoffs)</td><td>2: 2</td>" in sec
    eff = sum(x for r in rows for x in token_doses(1.0, r["n_tokens"], r["backoff_at"], 3, 0.5)) / sum(r["n_tokens"] for r in rows)
    assert 0.25 <= eff < 1.0 and f"<td>{eff:.3g}</td><td>0.25</td>" in sec  # effective, then mean final dose
    assert "rows backed off (4 times; rewind 3" in sec and sec.count("Plotly.newPlot") == 1  # the figure
    assert text.count("plotly.js v") <= 2  # the section's figure reuses the embedded plotly.js
