"""The command line: lazy imports, the config listing, plain resume, checks before any stage, messages."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steerheal_utils import cli
from steerheal_utils import config as C

REPO = Path(__file__).resolve().parent.parent


def test_help_config_and_a_typo_import_no_torch(tmp_path):
    code = ("import sys, contextlib, io\n"
            "import steerheal_utils.cli as cli\n"
            "assert 'torch' not in sys.modules, 'import'\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    assert cli.main(['config']) == 0\n"
            "    assert cli.main(['config', '--preset', 'tiny', '--yaml']) == 0\n"
            f"    assert cli.main(['run', '--run-dir', {str(tmp_path / 'r')!r}, '--set', 'lyers=[1]']) == 2\n"
            "    try:\n"
            "        cli.main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_config_lists_the_presets_values_choices_and_ranges(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "preset 'default'" in out
    assert "* n_contexts = 32   (in [2, inf])   [default 256]" in out  # what plain `run` uses, not the schema's
    assert "  reg = 'kl'   (one of kl, nll, wd)" in out
    assert "top_p = 0.95   (in [0.0, 1.0])" in out and "strict = True   (true or false)" in out
    assert "none (plain NLL)" not in out and "nll = plain NLL" in out  # the help names values that exist
    assert "generated = the assistant tag" in out
    assert cli.main(["config", "--preset", "tiny", "--yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"] == "tiny:llama"


def test_a_plain_rerun_resumes_with_the_folders_own_config(tmp_path, monkeypatch):
    from steerheal_utils import driver

    run = tmp_path / "run"
    driver.init_run(run, C.resolve("tiny", {"seed": 7}))
    seen = {}
    monkeypatch.setattr(driver, "run_loop", lambda d, cfg, rounds, override=False: seen.update(cfg=cfg, rounds=rounds))
    assert cli.main(["run", "--run-dir", str(run), "--rounds", "2"]) == 0
    assert seen["cfg"].model == "tiny:llama" and seen["cfg"].seed == 7 and seen["rounds"] == 2
    # a new folder, or any explicit setting, still starts from the preset
    assert cli.run_config(None, None, [], str(tmp_path / "new")).model == C.resolve("default").model
    assert cli.run_config("tiny", None, [], str(run)).seed == 0


def test_a_finished_run_prints_its_headline_and_report_path(tmp_path, monkeypatch, capsys):
    from test_report import _fake_run

    from steerheal_utils import driver, report

    _fake_run(tmp_path)
    report.write_report(tmp_path)
    monkeypatch.setattr(driver, "run_loop", lambda *a, **k: None)
    assert cli.main(["run", "--run-dir", str(tmp_path), "--preset", "tiny"]) == 0
    err = capsys.readouterr().err
    assert "round 02 (the last evaluated)" in err and "[-3.95, -3.85]" in err
    assert f"report: {(tmp_path / 'report.html').resolve()}" in err


@pytest.mark.parametrize("sets, match", [
    (["layers=[99]"], "layers: \\[99\\] out of range for a model with 4 layers"),
    (["vignettes=BAD"], "vignettes: .* line 1 is not JSON"),
    (["vignettes=MISSING"], "vignettes: no such file"),
])
def test_bad_values_fail_before_any_stage_runs(tmp_path, capsys, sets, match):
    import re

    (tmp_path / "bad.jsonl").write_text("not json\n")
    sets = [s.replace("BAD", str(tmp_path / "bad.jsonl")).replace("MISSING", str(tmp_path / "none.jsonl")) for s in sets]
    run = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--run-dir", str(run), "--rounds", "1"]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 1 and not run.exists()  # one line; nothing written, no stage ran


def test_a_read_only_folder_gets_one_line_saying_what_to_do():
    msg = cli.explain(PermissionError(errno.EACCES, "Permission denied", "/shared/run/round_00/.lock"))
    assert "\n" not in msg and "/shared/run/round_00/.lock" in msg and "cp -r" in msg and "--out" in msg
    assert "read-only" in cli.explain(OSError(errno.EROFS, "Read-only file system", "/ro/run/config.yaml"))
