"""``steerheal study``: its arguments (:func:`add_cli`) and what the command does (run, then write the outputs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ... import config as C
from .arms import ARMS, SCALES
from .outputs import write_outputs
from .run import run_study


def add_cli(p) -> None:
    """``steerheal study``: run (or resume) the matched-controls study, then regenerate its outputs."""
    p.add_argument("--study-dir", default="runs/study", help="where the run folders <arm>-s<seed> go (default runs/study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="arms: rmse (kl_agg=rmse), mean (kl_agg=mean), nll (reg=nll, no barrier), prompt (data_source=prompt: "
                        "training data from the persona-prompted model, no vector; rmse heal); default all")
    p.add_argument("--scale", default="full", choices=list(SCALES),
                   help="full = preset default as is (the issue's spec); quick = smaller data budget and half the "
                        "vignettes, equal for every arm (see steerheal_utils/tools/study/arms.py SCALES)")
    p.add_argument("--preset", default="default", choices=list(C.PRESETS), help=argparse.SUPPRESS)  # --preset tiny is for tests
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra config override applied to every arm alike (recorded in study.json)")
    from ..sweep import add_engine_args

    add_engine_args(p, local_jobs="one per CPU core")  # --backend local|slurm, --jobs, --retries, Slurm's options
    p.add_argument("--out", default="docs/study", help="where the compact results go (default docs/study)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the outputs from existing run folders")
    p.set_defaults(func=_cli_study)


def _cli_study(args) -> int:
    if len(set(args.arms)) != len(args.arms) or len(set(args.seeds)) != len(args.seeds):
        raise C.ConfigError("--arms and --seeds must not repeat a value")
    command = "python -m steerheal_utils study " + " ".join(
        [f"--scale {args.scale}", f"--rounds {args.rounds}", "--seeds " + " ".join(map(str, args.seeds)),
         "--arms " + " ".join(args.arms)] + ([f"--preset {args.preset}"] if args.preset != "default" else [])
        + [f"--set {s}" for s in args.set])
    extra = C.parse_overrides(args.set)
    t0 = time.time()
    errors = {}
    if not args.report_only:
        from ..sweep import executor_from_args

        executor = executor_from_args(args, Path(args.study_dir), local_jobs=os.cpu_count() or 1)
        errors = run_study(args.study_dir, args.arms, args.seeds, args.rounds, scale=args.scale, preset=args.preset,
                           extra=extra, executor=executor, retries=args.retries,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    meta = write_outputs(args.study_dir, args.out, args.arms, args.seeds, rounds=args.rounds, scale=args.scale,
                         preset=args.preset, extra=extra, command=command, errors=errors)
    print(json.dumps({"out": str(args.out), "runs": len(meta["runs"]), "compute_seconds_total": meta["compute_seconds_total"],
                      "wall_seconds_this_call": round(time.time() - t0, 1), "errors": list(meta["errors"])}))
    if meta["errors"]:
        print("some runs failed; their messages are in study.json 'errors'. Re-run the same command to retry them.",
              file=sys.stderr)
        return 1
    return 0
