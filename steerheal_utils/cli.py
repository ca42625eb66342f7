"""Command line: ``steerheal`` or ``python -m steerheal_utils``.

Subcommands: ``run`` (the loop), ``eval`` (score any model/adapter stack), ``report``
(re-plot a run folder), ``bench`` (stage timings vs naive references), ``study`` (the
matched-controls study), ``sweep`` (a grid of runs, local or on Slurm), ``config`` (list every knob).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import config as C


def run_config(preset: str, config: str | None, sets: list[str]) -> C.Config:
    """The config ``run`` uses: the preset, then a saved config file's keys (if given), then ``--set``."""
    overrides = C.parse_overrides(sets)
    if config:
        overrides = {**C.load_config(config).to_dict(), **overrides}
    return C.resolve(preset, overrides)


def _run(args) -> int:
    from .driver import run_loop

    cfg = run_config(args.preset, args.config, args.set)
    run_loop(args.run_dir, cfg, args.rounds, override=args.override_config)
    print(f"run folder: {args.run_dir}", file=sys.stderr)
    return 0


def _config(args) -> int:
    if args.preset:
        import yaml

        print(yaml.safe_dump(C.resolve(args.preset, args.set).to_dict(), sort_keys=False), end="")
    else:
        print(C.Config.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerheal", description="Steer, heal, repeat.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run or resume the loop")
    r.add_argument("--preset", default="default", choices=list(C.PRESETS))
    r.add_argument("--rounds", type=int, default=3, help="rounds in total (1..100); more than before continues a run")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--config", metavar="YAML", help="start from a saved config (e.g. another run's config.yaml) instead of the preset")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--override-config", action="store_true", help="continue an existing run with a changed config")
    r.set_defaults(func=_run)

    c = sub.add_parser("config", help="list every config key, or print a resolved preset")
    c.add_argument("--preset", choices=list(C.PRESETS))
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=_config)

    for name, module, helptext in (("eval", "evaluate", "evaluate a model / adapter stack on the vignettes and the axis probe"),
                                   ("report", "report", "write report.html and trajectory.png for a run folder"),
                                   ("export", "export", "write a round's healed model as full weights or one peft adapter, with a model card"),
                                   ("bench", "bench", "time each stage against its naive reference"),
                                   ("study", "study", "run the matched-controls study and regenerate its outputs"),
                                   ("sweep", "tools.sweep", "run a grid of runs (local or Slurm) and show where each stands")):
        mod = importlib.import_module(f"steerheal_utils.{module}")
        sp = sub.add_parser(name, help=helptext)
        mod.add_cli(sp)  # each module declares its arguments and sets func
        if name == "report":
            sp.set_defaults(func=_checked(sp.get_default("func")))
    return p


def _checked(report_func):
    """``report``, then one error line per step record of the folder that does not hold (its round is
    left out of the report): exit 1 when there is one."""

    def run(args) -> int:
        from pathlib import Path

        from .markers import Checker

        run_dir = Path(args.run_dir)
        code = report_func(args)
        problems = Checker(run_dir).problems() if run_dir.is_dir() else []
        for p in problems:
            print(f"run folder error: {p.label}: {p.reason}; round {p.round:02d} is left out of the report. "
                  f"`steerheal run --run-dir {Path(args.run_dir)} --rounds {p.round + 1}` redoes it "
                  "(with the run's --preset/--config)", file=sys.stderr)
        return code or (1 if problems else 0)

    return run


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Known failures print one clear message (no stack trace) and return:
    2 config or usage error, 1 a failed stage / model / run folder / NaN / disk error, 130 interrupted.
    Anything else is a bug and keeps its stack trace."""
    args = build_parser().parse_args(argv)
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


def explain(e: BaseException) -> str | None:
    """The message for a known failure kind, or None for an unexpected one (a bug)."""
    import errno

    from .driver import LoopError
    from .embedded import EmbeddedModelError
    from .export import ExportError
    from .models import ModelLoadError
    from .runfolder import RunFolderError

    if isinstance(e, (LoopError, ExportError)):
        return f"error: {e}"
    if isinstance(e, (ModelLoadError, EmbeddedModelError)):
        return f"model error: {e}"
    if isinstance(e, RunFolderError):
        return f"run folder error: {e}"
    if isinstance(e, FloatingPointError):
        return f"numerical error (NaN or inf): {e}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"disk full{where}: {e.strerror or e}. Nothing half-written was kept; free space and re-run "
                "the same command to resume.")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        return f"file error: {e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
