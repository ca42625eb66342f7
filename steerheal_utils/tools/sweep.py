"""Sweeps: a grid of loop runs, one run folder each, run through an executor (local, Slurm).

    steerheal sweep run runs/sw --preset tiny --rounds 2 --grid seed=0,1 --grid kl_agg=rmse,mean
    steerheal sweep run runs/sw --spec sweep.yaml --backend slurm --partition gpu --gpus-per-node 1
    steerheal sweep status runs/sw

A spec (YAML, or the same thing on the command line):

    preset: default          # --preset
    rounds: 3                # --rounds
    set: {threads: 1}        # --set key=value, the same for every run
    grid:                    # --grid key=v1,v2 (one axis each)
      seed: [0, 1, 2]
      kl_agg: [rmse, mean]
      arm:                   # a named axis (not a config key): label -> its overrides
        rmse: {kl_agg: rmse}
        nll: {reg: nll}

expands to the product of its axes. Each point is a run folder ``<sweep dir>/<name>``, the name
being ``axis=value`` pairs in axis-name order, e.g. ``kl_agg=mean,seed=1`` (:func:`run_name`):
readable, independent of the order the axes were given in and of the other points (adding a seed
renames nothing), and safe as a file name. Each run's config is written once, when the sweep
first sees it (``driver.init_run``); a later spec that would change it is refused.

Each run is one job of ``python -m steerheal_utils run --run-dir DIR --config DIR/config.yaml
--rounds N`` (:mod:`.executors`): runs resume where they stopped, so a killed, preempted or failed
job started again continues, and running the sweep again starts only runs that are not finished.
Where each run stands is read from its step records (:class:`markers.Checker`);
``<sweep dir>/sweep.json`` keeps the spec, the runs and how their jobs ended, ``logs/<name>.log``
each run's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .. import config as C
from .. import contract
from ..runfolder import RunFolderError, atomic_write_json, read_json
from .executors import Executor, Job, Outcome

RECORD = "sweep.json"
LOG_DIR = "logs"
MAX_NAME_BYTES = 200  # well under the 255 of common filesystems
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepError(C.ConfigError):
    """A spec that cannot be expanded, or a folder that is not a sweep."""


# ------------------------------------------------------------------ the spec
@dataclass
class Spec:
    """What a sweep runs: a preset, rounds, overrides for every run and the grid's axes.

    ``grid`` maps an axis to its values: a config key to a list of values, or a named axis (any
    other name) to ``{label: {config key: value, ...}}``.
    """

    preset: str = "default"
    rounds: int = 3
    common: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "rounds": self.rounds, "set": self.common, "grid": self.grid}

    @classmethod
    def from_dict(cls, d: Any, where: str = "the spec") -> "Spec":
        if not isinstance(d, dict):
            raise SweepError(f"{where}: expected a mapping with preset, rounds, set and grid")
        unknown = set(d) - {"preset", "rounds", "set", "grid"}
        if unknown:
            raise SweepError(f"{where}: unknown key(s) {sorted(unknown)}; a spec has preset, rounds, set and grid")
        common, grid = d.get("set") or {}, d.get("grid") or {}
        if not isinstance(common, dict) or not isinstance(grid, dict):
            raise SweepError(f"{where}: 'set' and 'grid' must be mappings")
        return cls(preset=d.get("preset", "default"), rounds=d.get("rounds", 3), common=dict(common), grid=dict(grid))


def load_spec(path: Path | str) -> Spec:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"--spec {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"--spec {path} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    return Spec.from_dict(doc, f"--spec {path}")


def split_values(text: str) -> list[str]:
    """``"1,2,[3,4]"`` -> ``["1", "2", "[3,4]"]``: split on commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["seed=0,1", "kl_agg=rmse,mean"]`` -> ``{"seed": [0, 1], "kl_agg": ["rmse", "mean"]}`` (values as YAML).

    Example:
        >>> parse_grid(["seed=0,1", "layers=[3,4],[5]"])
        {'seed': [0, 1], 'layers': [[3, 4], [5]]}
    """
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key in out:
            raise SweepError(f"--grid {key} is given twice: put all its values in one --grid {key}=v1,v2")
        values = []
        for part in split_values(raw):
            if not part.strip():
                raise SweepError(f"--grid {item!r}: an empty value (two commas in a row, or a trailing comma?)")
            try:
                values.append(yaml.safe_load(part))
            except yaml.YAMLError:
                values.append(part.strip())
        out[key] = values
    return out


# ------------------------------------------------------------------ names
def value_text(v: Any) -> str:
    """A config value as it appears in a run name: ``0.1``, ``1e-05``, ``true``, ``[3,4]``, ``rmse``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)  # the shortest text that reads back as the same float
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def safe_part(text: str) -> str:
    """``text`` if it is made of ``A-Za-z0-9._+-`` only; else those kept, the rest as ``_``, plus
    ``~`` and a hash of the original, so that two values never share a folder.

    Example:
        >>> safe_part("rmse"), safe_part("google/gemma-3-4b-it")
        ('rmse', 'google_gemma-3-4b-it~28910b')
    """
    clean = _UNSAFE.sub("_", text)
    return clean if clean == text and text else f"{clean}~{_short_hash(text)}"


def run_name(labels: dict[str, str]) -> str:
    """The folder name of a grid point: ``axis=value`` in axis order, joined by commas.

    Example:
        >>> run_name({"seed": "1", "kl_agg": "mean"})
        'kl_agg=mean,seed=1'
    """
    name = ",".join(f"{safe_part(k)}={safe_part(v)}" for k, v in sorted(labels.items()))
    if len(name.encode()) > MAX_NAME_BYTES:
        name = f"{name[:MAX_NAME_BYTES - 9]}~{_short_hash(name, 8)}"
    return name


# ------------------------------------------------------------------ expansion
@dataclass
class Run:
    """One grid point: its folder name, its axis labels, every override it applies and its config."""

    name: str
    labels: dict[str, str]
    overrides: dict[str, Any]
    cfg: C.Config


def _axis_points(axis: str, values: Any, keys: set[str]) -> list[tuple[str | None, dict[str, Any]]]:
    """``[(label or None, overrides)]`` of one axis; the label of a config-key axis comes from the
    typed value later (so ``1e-4`` and ``0.0001`` name the same run)."""
    if axis in keys:
        vals = values if isinstance(values, list) else [values]
        if not vals:
            raise SweepError(f"grid axis {axis!r} has no values")
        return [(None, {axis: v}) for v in vals]
    if not isinstance(values, dict) or not values or not all(isinstance(o, dict) for o in values.values()):
        hint = C.unknown_key_error(axis) if not isinstance(values, dict) else None
        raise SweepError(f"grid axis {axis!r} is not a config key, so it must be a named axis: label -> overrides, "
                         f"e.g. {axis}: {{a: {{kl_agg: rmse}}, b: {{reg: nll}}}}" + (f" ({hint})" if hint else ""))
    return [(str(label), dict(o)) for label, o in values.items()]


def expand(spec: Spec) -> list[Run]:
    """Every grid point of ``spec`` as a :class:`Run`, each config validated; nothing is written.

    Raises SweepError / ConfigError (one line) on an unknown key, a bad value, an axis that is also
    under ``set``, two axes setting the same key, or two points that would share a name.
    """
    if spec.preset not in C.PRESETS:
        raise SweepError(f"unknown preset {spec.preset!r}; choose one of {', '.join(C.PRESETS)}")
    if isinstance(spec.rounds, bool) or not isinstance(spec.rounds, int) or not 1 <= spec.rounds <= contract.MAX_ROUND + 1:
        raise SweepError(f"rounds: expected an integer in 1..{contract.MAX_ROUND + 1}, got {spec.rounds!r}")
    keys = {f.name for f in dataclasses.fields(C.Config)}
    axes = sorted(spec.grid)
    points = [_axis_points(a, spec.grid[a], keys) for a in axes]
    runs: list[Run] = []
    seen: dict[str, dict] = {}
    for combo in itertools.product(*points):
        overrides: dict[str, Any] = {}
        for axis, (_, o) in zip(axes, combo):
            both = set(o) & set(overrides)
            if both:
                raise SweepError(f"grid axis {axis!r} sets {sorted(both)}, which another axis sets too")
            overrides.update(o)
        clash = set(overrides) & set(spec.common)
        if clash:
            raise SweepError(f"{sorted(clash)} is both a grid axis and a --set/set value: keep it in one place")
        try:
            cfg = C.resolve(spec.preset, {**spec.common, **overrides})
        except C.ConfigError as e:
            where = ", ".join(f"{a}={label if label is not None else value_text(o[a])}" for a, (label, o) in zip(axes, combo))
            raise SweepError(f"run {where or '(no grid)'}: {e}") from None
        labels = {a: label if label is not None else value_text(getattr(cfg, a)) for a, (label, _) in zip(axes, combo)}
        name = run_name(labels)
        if name in seen:
            raise SweepError(f"two grid points are both named {name!r} (values that are equal once typed, "
                             f"e.g. 1 and 1.0?): {seen[name]} and {overrides}")
        seen[name] = overrides
        typed = cfg.to_dict()
        runs.append(Run(name, labels, {k: typed[k] for k in {**spec.common, **overrides}}, cfg))
    return runs


# ------------------------------------------------------------------ the sweep folder
def record_path(sweep_dir: Path | str) -> Path:
    return Path(sweep_dir) / RECORD


def log_path(sweep_dir: Path | str, name: str) -> Path:
    return Path(sweep_dir) / LOG_DIR / f"{name}.log"


def read_record(sweep_dir: Path | str) -> dict | None:
    p = record_path(sweep_dir)
    return read_json(p, "sweep record") if p.exists() else None


def write_record(sweep_dir: Path | str, rec: dict) -> None:
    atomic_write_json(record_path(sweep_dir), {**rec, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def init_runs(sweep_dir: Path | str, spec: Spec, runs: Sequence[Run]) -> dict:
    """Write each run's config once (``driver.init_run``: an existing run must have the same config)
    and record the spec and the runs in ``sweep.json`` (runs of earlier specs stay listed)."""
    from ..driver import init_run

    sweep_dir = Path(sweep_dir)
    for r in runs:
        try:
            init_run(sweep_dir / r.name, r.cfg)
        except C.ConfigError as e:
            raise SweepError(f"run {r.name}: {e}") from None
    rec = read_record(sweep_dir) or {"runs": {}, "jobs": {}}
    for r in runs:
        rec["runs"][r.name] = {"rounds": spec.rounds, "labels": r.labels, "overrides": r.overrides}
    rec["spec"] = spec.to_dict()
    write_record(sweep_dir, rec)
    return rec


def job_for(sweep_dir: Path | str, name: str, rounds: int) -> Job:
    """The job of one run: ``python -m steerheal_utils run`` on its folder and config (absolute paths:
    a cluster job may start in another working directory)."""
    run = (Path(sweep_dir) / name).resolve()
    argv = (sys.executable, "-m", "steerheal_utils", "run", "--run-dir", str(run),
            "--config", str(contract.run_path(run, "config")), "--rounds", str(rounds))
    return Job(name, argv, log_path(sweep_dir, name).resolve())


def prepare_shared_state(runs: Sequence[Run]) -> None:
    """Fill the shared cache before any job starts: the notebook kernelspec and, if a run uses it, the
    embedded model. Jobs starting together would be safe anyway (both are written under a file lock
    or atomically); doing it once here also spares a filesystem whose locks do not work across nodes."""
    from ..driver import kernel_name
    from ..embedded import NAME, ensure_embedded_model

    kernel_name()
    if any(r.cfg.model == NAME for r in runs):
        ensure_embedded_model()


# ------------------------------------------------------------------ where a run stands
@dataclass
class RunState:
    """A run's place: ``state`` is done | stopped | running | pending | retrying | interrupted | failed | stale
    | new; ``at`` the first step whose record does not hold (``round 01 04_heal``)."""

    name: str
    state: str
    rounds_done: int
    rounds: int
    at: str = ""
    note: str = ""


def last_error_line(log: Path) -> str:
    """The last line of a job's log that names an error (the CLI ends a failed run with one)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        low = line.lower()
        if "error" in low or " failed" in low or "killed" in low or "interrupted" in low:
            return line.strip()[:300]
    return ""


def run_state(run_dir: Path | str, rounds: int, job: dict | None = None) -> RunState:
    """Where run ``run_dir`` stands against ``rounds`` rounds, from its step records, and ``job`` (its
    entry in sweep.json: how its last job ended) for what the records cannot say (running, failed)."""
    from .. import markers
    from ..driver import stop_record

    run_dir = Path(run_dir)
    name = run_dir.name
    job = job or {}
    if not contract.run_path(run_dir, "config").exists():
        return RunState(name, "new", 0, rounds, note="config not written yet")
    chk = markers.Checker(run_dir)
    try:
        stop = stop_record(run_dir)
    except RunFolderError:
        stop = None
    done, first = 0, None
    for r in range(rounds):
        first = next((st for st in (chk.status(r, s) for s in contract.STAGES) if not st.holds), None)
        if first is not None:
            break
        done = r + 1
        if stop and stop.get("round") == r:
            return RunState(name, "stopped", done, rounds, note=f"the loop stopped after round {r:02d}: {stop.get('reason')}")
    if first is None:
        return RunState(name, "done", done, rounds)
    log = Path(job["log"]) if job.get("log") else None
    if job.get("state") in ("running", "retrying") and _sweep_alive(job):
        note = f"log {log}" if job["state"] == "running" else f"last attempt: {job.get('detail')}; log {log}"
        return RunState(name, job["state"], done, rounds, first.label, note)
    if first.state in ("broken", "stale"):
        return RunState(name, "stale", done, rounds, first.label, f"{first.reason}; the next `sweep run` redoes it")
    if job.get("state") == "failed":
        err = last_error_line(log) if log else ""
        n = job.get("attempts", 0)
        return RunState(name, "failed", done, rounds, first.label,
                        f"{job.get('detail')} after {n} attempt{'s' if n != 1 else ''}; log {log}"
                        + (f"; last error: {err}" if err else ""))
    if contract.journal_path(run_dir, first.round, first.stage).exists():
        return RunState(name, "interrupted", done, rounds, first.label,
                        "stopped inside this step; the next `sweep run` resumes here" + (f"; log {log}" if log else ""))
    return RunState(name, "pending", done, rounds, first.label)


def _sweep_alive(job: dict) -> bool:
    """Whether the sweep process that recorded ``job`` as running still runs (unknown on another host: yes)."""
    import socket

    pid, host = job.get("sweep_pid"), job.get("sweep_host")
    if not pid or host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(sweep_dir: Path | str) -> list[RunState]:
    """Every run of the sweep (as recorded in sweep.json), in name order."""
    sweep_dir = Path(sweep_dir)
    rec = read_record(sweep_dir)
    if rec is None:
        raise SweepError(f"{sweep_dir} is not a sweep folder (no {RECORD}); start one with `steerheal sweep run {sweep_dir} ...`")
    return [run_state(sweep_dir / name, info["rounds"], rec.get("jobs", {}).get(name))
            for name, info in sorted(rec["runs"].items())]


def format_status(states: Sequence[RunState]) -> str:
    """A table: run, state, rounds done / asked, the step it is at, a note (failures: the log path)."""
    rows = [("run", "state", "rounds", "at", "note")]
    rows += [(s.name, s.state, f"{s.rounds_done}/{s.rounds}", s.at, s.note) for s in states]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(r)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(f"{len(states)} runs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


# ------------------------------------------------------------------ running it
FINISHED = ("done", "stopped")


def run_sweep(sweep_dir: Path | str, spec: Spec, executor: Executor, *, retries: int = 1, say=print,
              only: set[str] | None = None) -> dict[str, Outcome]:
    """Expand ``spec``, write each new run's config, and run every run that is not finished
    (of the runs named in ``only``, when given: the study runs its sweep in two passes).

    Returns ``{name: Outcome}`` for the runs that were started (finished runs are skipped). Each
    run's log is ``logs/<name>.log``; sweep.json records how each job ended.
    """
    import socket

    sweep_dir = Path(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir} is a file, not a sweep folder")
    runs = expand(spec)
    rec = init_runs(sweep_dir, spec, runs)
    todo = [r for r in runs if (only is None or r.name in only)
            and run_state(sweep_dir / r.name, spec.rounds).state not in FINISHED]
    say(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run "
        f"({executor.name})")
    if not todo:
        return {}
    prepare_shared_state(todo)
    me = {"sweep_pid": os.getpid(), "sweep_host": socket.gethostname(), "engine": executor.name}

    def save(outcomes: dict[str, Outcome]) -> None:
        for name, o in outcomes.items():
            rec["jobs"][name] = {**me, **{k: v for k, v in asdict(o).items() if k != "name"}, "log": str(o.log)}
        write_record(sweep_dir, rec)

    jobs = [job_for(sweep_dir, r.name, spec.rounds) for r in todo]
    return executor.run(jobs, retries=retries, say=say, on_change=save)


# ------------------------------------------------------------------ command line
def add_cli(p) -> None:
    """``steerheal sweep run DIR ...`` and ``steerheal sweep status DIR``."""
    sub = p.add_subparsers(dest="sweep_cmd", required=True)
    r = sub.add_parser("run", help="expand a grid into run folders and run them (again: resumes what is not finished)")
    r.add_argument("sweep_dir", metavar="DIR", help="the sweep folder: one run folder per grid point, logs/, sweep.json")
    r.add_argument("--spec", metavar="YAML", help="a sweep spec (preset, rounds, set, grid); see steerheal_utils/tools/sweep.py")
    r.add_argument("--preset", choices=list(C.PRESETS), help="preset of every run (default: the spec's, else default)")
    r.add_argument("--rounds", type=int, help="rounds per run (default: the spec's, else 3); more than before continues the runs")
    r.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid: a config key and its values (repeatable; runs = the product)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable)")
    add_engine_args(r)
    r.set_defaults(func=_cli_run)
    s = sub.add_parser("status", help="each run's state, rounds done and step, failures with their log (exit 1 if one failed)")
    s.add_argument("sweep_dir", metavar="DIR")
    s.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    s.set_defaults(func=_cli_status)


def add_engine_args(p, local_jobs: int | str = 1) -> None:
    """The options that choose and size the engine (``--backend``, ``--jobs``, ``--retries``, Slurm's);
    shared by ``sweep run`` and ``study`` (:func:`executor_from_args` reads them)."""
    p.add_argument("--backend", choices=("local", "slurm"), default="local",
                   help="local: processes on this machine (default); slurm: one Slurm job per run, through submitit")
    p.add_argument("--jobs", type=int, help=f"at most N runs at once (local: default {local_jobs}; slurm: the array's limit, default none)")
    p.add_argument("--retries", type=int, default=1, help="start a failed job again this many times (it resumes; default 1)")
    g = p.add_argument_group("slurm (--backend slurm)")
    g.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="local: submitit's local executor instead of Slurm (to try a sweep without a cluster)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per run (e.g. 1)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per run")
    g.add_argument("--mem-gb", type=float, help="memory per run, GB")
    g.add_argument("--time", type=int, default=240, metavar="MINUTES",
                   help="time limit of one job (default 240); at the limit the job requeues itself and resumes")
    g.add_argument("--max-requeue", type=int, default=5, help="requeues per job on time limit or preemption (default 5)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="CMD",
                   help="a shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. account=proj, qos=low, constraint=a100 (repeatable)")


def spec_from_args(args) -> Spec:
    """The spec a ``sweep run`` command means: ``--spec`` (if any), then --preset/--rounds/--set/--grid.
    With none of --spec/--grid/--set/--preset, an existing sweep's recorded spec (``--rounds`` may extend it)."""
    rec = read_record(args.sweep_dir) if Path(args.sweep_dir).is_dir() else None
    if not (args.spec or args.grid or args.set or args.preset) and rec is not None:
        spec = Spec.from_dict(rec["spec"], f"{record_path(args.sweep_dir)} spec")
    else:
        spec = load_spec(args.spec) if args.spec else Spec()
        if args.preset:
            spec.preset = args.preset
        spec.common.update(C.parse_overrides(args.set))
        for key, values in parse_grid(args.grid).items():
            if key in spec.grid:
                raise SweepError(f"--grid {key}: the spec already has axis {key!r}")
            spec.grid[key] = values
    if args.rounds is not None:
        spec.rounds = args.rounds
    return spec


def executor_from_args(args, sweep_dir: Path, local_jobs: int = 1) -> Executor:
    from .executors import LocalExecutor, slurm_executor

    if args.backend == "local":
        return LocalExecutor(args.jobs if args.jobs is not None else local_jobs)
    return slurm_executor(sweep_dir.resolve() / ".submitit" / "%j", cluster=args.cluster, partition=args.partition,
                          gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                          time_min=args.time, max_running=args.jobs, max_requeue=args.max_requeue,
                          setup=args.slurm_setup, sbatch=C.parse_overrides(args.slurm_arg))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cli_run(args) -> int:
    sweep_dir = Path(args.sweep_dir)
    spec = spec_from_args(args)
    executor = executor_from_args(args, sweep_dir)
    outcomes = run_sweep(sweep_dir, spec, executor, retries=args.retries, say=_say)
    print(format_status(status(sweep_dir)))
    failed = [o for o in outcomes.values() if not o.ok]
    if failed:
        _say(f"sweep: {len(failed)} of {len(outcomes)} runs failed; `steerheal sweep status {sweep_dir}` shows them, "
             f"`steerheal sweep run {sweep_dir}` resumes them")
        return 1
    return 0


def _cli_status(args) -> int:
    states = status(args.sweep_dir)
    if args.json:
        for s in states:
            print(json.dumps(asdict(s)))
    else:
        print(format_status(states))
    return 1 if any(s.state == "failed" for s in states) else 0
