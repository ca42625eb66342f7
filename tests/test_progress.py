"""Progress bars in driver-run stages: a state file the driver reads, and a plain final line."""

import json

from steerheal_utils import progress as P


def test_eta_is_linear_in_the_steps_left():
    assert P.eta(5, 20, 10.0) == 30.0
    assert P.eta(0, 20, 10.0) is None and P.eta(3, None, 1.0) is None
    assert P.eta(20, 20, 8.0) == 0.0


def test_fmt_seconds():
    assert [P.fmt_seconds(s) for s in (9.4, 75, 3725)] == ["9s", "1m15s", "1h02m"]


def test_driver_run_bar_reports_to_its_file_and_prints_a_final_line(tmp_path, monkeypatch, capsys):
    f = tmp_path / "p.json"
    monkeypatch.setenv(P.PROGRESS_ENV, str(f))
    bar = P.tqdm(total=4, desc="heal r00", leave=False)
    assert isinstance(bar, P.ReportingBar)
    bar.update(1)
    bar.set_postfix(nll="1.25")
    bar._write(force=True)
    st = json.loads(f.read_text())
    assert [(b["n"], b["total"], b["postfix"]) for b in st["bars"]] == [(1, 4, "nll=1.25")]
    assert P.describe(st).startswith("heal r00 1/4 (nll=1.25)")
    inner = P.tqdm(total=2, desc="sampling")  # a nested bar shows after the outer one, with the note first
    P.note("dose search call 2 of 5")
    assert P.describe(P.read_state(f)).startswith("dose search call 2 of 5 · heal r00 1/4 (nll=1.25) · sampling 0/2")
    inner.close()
    P.note("")
    capsys.readouterr()
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert capsys.readouterr().out.strip().startswith("heal r00: 4/4 in ")
    assert list(P.tqdm(range(3), desc="x")) == [0, 1, 2]  # iterating closes the bar: a second line
    assert capsys.readouterr().out.strip().startswith("x: 3/3 in ")


def test_outside_the_driver_it_is_tqdm(monkeypatch):
    monkeypatch.delenv(P.PROGRESS_ENV, raising=False)
    bar = P.tqdm(range(2), disable=True)
    assert not isinstance(bar, P.ReportingBar) and list(bar) == [0, 1]


def test_stage_time_is_estimated_from_an_earlier_rounds_record(tmp_path):
    from steerheal_utils import contract

    run = tmp_path / "run"
    assert P.stage_seconds(run, 1, "04_heal") is None
    p = contract.marker_path(run, 0, "04_heal")
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"seconds": 42.5}))
    assert P.stage_seconds(run, 2, "04_heal") == 42.5
    assert P.stage_seconds(run, 0, "04_heal") is None  # round 0 has no earlier round


def test_ticker_line_names_the_bar_and_the_time_left(tmp_path, monkeypatch):
    t = P.Ticker(0.0)
    try:
        t.start("[round_01 (2 of 3)] 04_heal", expected=100.0)
        line = t.line()
        assert "[round_01 (2 of 3)] 04_heal" in line and "left (as round before)" in line
        P.ReportingBar(desc="heal r01", total=10, path=t.file).update(0)
        assert "heal r01 0/10" in t.line()
        t.file.write_text('{"bars": [{"desc": 3}], "note": 5}')  # an unreadable state: the line goes on without it
        assert "04_heal" in t.line()
        t.end("done")
    finally:
        t.close()
    assert not t.file.exists()
