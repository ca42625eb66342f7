"""Command line: ``steerheal`` or ``python -m steerheal_utils``.

Subcommands: ``run`` (the loop), ``eval`` (score any model/adapter stack), ``report``
(re-plot a run folder), ``compare`` (runs side by side), ``export`` (a round's model), ``bench`` (stage timings vs naive references), ``study`` (the
matched-controls study), ``sweep`` (a grid of runs, local or on Slurm), ``upgrade`` (an older run folder's
names), ``config`` (list every knob).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import config as C


def run_config(preset: str | None, config: str | None, sets: list[str], run_dir: str | None = None) -> C.Config:
    """The config ``run`` uses: the preset, then the keys a config file sets (if given), then ``--set``.

    With none of ``--preset``, ``--config``, ``--set`` and an existing run folder, the folder's own
    config (the one its next step runs with): re-running a run's folder resumes it as it was made.
    """
    if preset is None and not config and not sets and run_dir is not None:
        from .runfolder import latest_config

        if Path(run_dir).is_dir():
            try:
                cfg = latest_config(run_dir)
            except C.ConfigError:
                cfg = None  # a damaged config.yaml: init_run says what is wrong
            if cfg is not None:
                return cfg
    overrides = C.parse_overrides(sets)
    if config:  # only the keys the file sets: a short file (configs/love.yaml) keeps the preset's other values
        import yaml

        given = C.load_config(config).to_dict()  # validated, paths resolved
        overrides = {**{k: given[k] for k in yaml.safe_load(Path(config).read_text()) if k in given}, **overrides}
    return C.resolve(preset or "default", overrides)


def _run(args) -> int:
    from .driver import run_loop

    cfg = run_config(args.preset, args.config, args.set, args.run_dir)
    run_loop(args.run_dir, cfg, args.rounds, override=args.override_config)
    _finished(Path(args.run_dir))
    return 0


def _finished(run_dir: Path) -> None:
    """The headline numbers of the last evaluated round (with their intervals) and where the report is."""
    from . import contract
    from .report import headline_lines

    for line in headline_lines(run_dir):
        print(line, file=sys.stderr)
    rep = contract.run_path(run_dir, "report")
    print(f"report: {rep.resolve() if rep.exists() else '(none yet: no round evaluated)'}", file=sys.stderr)
    print(f"run folder: {run_dir}", file=sys.stderr)


def _limits(f) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    if isinstance(f.default, bool):
        return "true or false"
    lo, hi = m.get("lo"), m.get("hi")
    if lo is None and hi is None:
        return ""
    return f"in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"


def config_listing(preset: str, cfg: C.Config) -> str:
    """Every knob with the value ``cfg`` gives it, what it accepts, and its meaning, grouped as in
    :class:`config.Config`; values the preset changes from the schema default are marked."""
    import dataclasses

    schema = C.Config()
    out = [f"# preset {preset!r} (steerheal run --preset {preset}); * = differs from the schema default;"
           " set any knob with --set KEY=VALUE"]
    for f in dataclasses.fields(C.Config):
        v, d = getattr(cfg, f.name), getattr(schema, f.name)
        mark = "*" if v != d else " "
        lim = _limits(f)
        out.append(f"{mark} {f.name} = {v!r}" + (f"   ({lim})" if lim else "") + (f"   [default {d!r}]" if v != d else ""))
        out.append(f"      {f.metadata['help']}")
    return "\n".join(out)


def _config(args) -> int:
    preset = args.preset or "default"
    cfg = C.resolve(preset, args.set)
    if args.yaml:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(config_listing(preset, cfg))
    return 0


SUBCOMMANDS = (  # name, module (imported only when that subcommand runs), help
    ("eval", "evaluate", "evaluate a model / adapter stack on the vignettes and the axis probe"),
    ("report", "report", "write report.html and trajectory.png for a run folder"),
    ("compare", "report", "overlay two or more runs' panels and tabulate their final-round deltas"),
    ("export", "export", "write a round's healed model as full weights or one peft adapter, with a model card"),
    ("bench", "tools.bench", "time each stage against its naive reference"),
    ("study", "tools.study", "run the matched-controls study and regenerate its outputs"),
    ("sweep", "tools.sweep", "run a grid of runs (local or Slurm) and show where each stands"),
    ("steerability", "tools.steerability", "sweep the dose of round 0's vector against its KL-matched random band"),
    ("upgrade", "upgrade", "rename an older run (or study) folder's eval records to this version's names, in place"),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only the module of the subcommand named in ``argv`` is imported
    (the stage modules import torch: `--help`, `config` and a typo need none of it)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="steerheal", description="Steer, heal, repeat.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume the loop")
    r.add_argument("--preset", default=None, choices=list(C.PRESETS),
                   help="a new run's preset (default: default); an existing folder resumes with its own config")
    r.add_argument("--rounds", type=int, default=3, help="rounds in total (1..100): round_00 .. round_{N-1}; more than before continues a run")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--config", metavar="YAML", help="start from a saved config (e.g. another run's config.yaml) instead of the preset")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--override-config", action="store_true", help="continue an existing run with a changed config")
    r.set_defaults(func=_run)

    c = sub.add_parser("config", help="list every config key: the preset's value, what it accepts, its meaning")
    c.add_argument("--preset", choices=list(C.PRESETS), help="the preset listed (default: default, what plain `run` uses)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--yaml", action="store_true", help="print the resolved config as YAML (a file --config accepts)")
    c.set_defaults(func=_config)

    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module, helptext in SUBCOMMANDS:
        sp = sub.add_parser(name, help=helptext)
        if name != chosen:
            continue
        mod = importlib.import_module(f"steerheal_utils.{module}")
        (mod.add_compare_cli if name == "compare" else mod.add_cli)(sp)  # each module declares its arguments, sets func
        if name == "report":
            sp.set_defaults(func=_checked(sp.get_default("func")))
    return p


def _checked(report_func):
    """``report``, then one error line per step record of the folder that does not hold (its round is
    left out of the report): exit 1 when there is one."""

    def run(args) -> int:
        from .markers import Checker

        run_dir = Path(args.run_dir)
        code = report_func(args)
        problems = Checker(run_dir).problems() if run_dir.is_dir() else []
        for p in problems:
            print(f"run folder error: {p.label}: {p.reason}; round {p.round:02d} is left out of the report. "
                  f"`steerheal run --run-dir {Path(args.run_dir)} --rounds {p.round + 1}` redoes it "
                  "(with the folder's own config)", file=sys.stderr)
        return code or (1 if problems else 0)

    return run


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Known failures print one clear message (no stack trace) and return:
    2 config or usage error, 1 a failed stage / model / run folder / NaN / disk error, 130 interrupted.
    Anything else is a bug and keeps its stack trace."""
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # known failure kinds get one clear message, not a stack trace
        msg = explain(e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 1


def _loaded(module: str, name: str) -> tuple:
    """``(class,)`` when ``steerheal_utils.<module>`` is imported already, else ``()``: an exception of a
    module never imported cannot have been raised, and importing it here would import torch."""
    mod = sys.modules.get(f"steerheal_utils.{module}")
    return (getattr(mod, name),) if mod is not None and hasattr(mod, name) else ()


def explain(e: BaseException) -> str | None:
    """The message for a known failure kind, or None for an unexpected one (a bug)."""
    import errno

    from .runfolder import RunFolderError

    if isinstance(e, _loaded("driver", "LoopError") + _loaded("export", "ExportError")):
        return f"error: {e}"
    if isinstance(e, _loaded("models", "ModelLoadError") + _loaded("embedded", "EmbeddedModelError")):
        return f"model error: {e}"
    if isinstance(e, RunFolderError):
        return f"run folder error: {e}"
    if isinstance(e, FloatingPointError):
        return f"numerical error (NaN or inf): {e}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"disk full{where}: {e.strerror or e}. Nothing half-written was kept; free space and re-run "
                "the same command to resume.")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = e.filename or "a file"
        return (f"cannot write {where}: {e.strerror or e} (a read-only or someone else's folder?). Copy the run "
                "folder somewhere writable (cp -r RUN MYRUN) and use the copy; `steerheal report RUN --out DIR` "
                "re-plots a read-only run into DIR")
    if isinstance(e, OSError) and e.errno == errno.ENOENT:
        return f"file error: {e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
