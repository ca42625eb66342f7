"""Where a sweep's runs execute: one small interface, real engines behind it.

A :class:`Job` is one command line and its log file. For a sweep it is one run folder driven by
``python -m steerheal_utils run --run-dir DIR --config DIR/config.yaml --rounds N``. A run folder
resumes where it stopped (the driver skips every stage whose record holds; a crash, even SIGKILL,
loses at most the stage in progress), so starting a job again after a kill, a preemption or a
failure continues it. :meth:`Executor.run` starts a failed job again up to ``retries`` times;
under Slurm a preempted or timed-out job also requeues itself (submitit's checkpoint, below).

Engines, each imported only when chosen (the local one needs neither package):

``local`` (:class:`LocalExecutor`, the default)
    subprocesses on this machine, at most ``jobs`` at once.
``slurm`` (:class:`SubmititExecutor`, built by :func:`slurm_executor`)
    submitit: each run one Slurm job, submitted together as one job array, with partition,
    GPUs per node, CPUs, memory and a time limit. Shortly before the limit, or on preemption,
    Slurm signals the job; submitit calls :meth:`RunCommand.checkpoint`, which resubmits the same
    command, and requeues the job, which resumes from the run's step records.
    ``cluster="local"`` runs the same code under submitit's local executor (real processes
    under submitit's own controller, no Slurm), which is what the tests use.

Ray is not an engine here: a local Ray cluster took 4-5 s to start on a quiet 2-core box and
10-39 s with the cores busy (``scripts/ray_startup.py``, ``docs/bench/ray_startup.json``); see the
README, "Scaling out". Adding an engine means
subclassing :class:`Executor` with ``submit``, ``poll`` and ``cancel``.

Processes: each job's command starts in its own session, so stopping a job (a cancelled sweep, a
preempted Slurm job) signals the driver and what it started in its group; on Linux the command
also gets SIGTERM when the process that started it dies, so a killed sweep leaves no driver
behind. A stage's notebook kernel runs in a session of its own (jupyter_client starts it so) and
exits within about a second of losing its driver, which is why a retry first waits
``retry_delay_s``.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import ConfigError

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long
_PR_SET_PDEATHSIG = 1


class JobFailed(RuntimeError):
    """A job's command exited with an error (raised inside a submitit job; the message is one line)."""


@dataclass(frozen=True)
class Job:
    """One unit of work: a name (unique in a sweep), a command line, and the log its output is appended to."""

    name: str
    argv: tuple[str, ...]
    log: Path


@dataclass
class Outcome:
    """Where a job stands: ``state`` is waiting | running | retrying | done | failed | cancelled;
    ``detail`` says how the last attempt ended (one line); ``ids`` are the engine's ids of the attempts."""

    name: str
    log: Path
    state: str = "waiting"
    attempts: int = 0
    detail: str = ""
    ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "done"


# ------------------------------------------------------------------ one process
def _die_with_parent() -> Callable[[], None] | None:
    """For Popen's preexec_fn (Linux): the child gets SIGTERM when the thread that started it ends."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # looked up before the fork

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent was already gone before the line above
            os._exit(1)

    return in_child


def start(job: Job) -> subprocess.Popen:
    """Start ``job`` in a session of its own, its output appended to ``job.log`` after a header line."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} on {socket.gethostname()}: {shlex.join(job.argv)}\n")
        fh.flush()
        return subprocess.Popen(job.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent())


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL it if it is still there after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace_s if sig == signal.SIGTERM else None)
            return
        except subprocess.TimeoutExpired:
            continue


def exit_detail(returncode: int) -> str:
    """``exited with 1`` / ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


class RunCommand:
    """A job as a submitit callable: runs the command and raises :class:`JobFailed` when it fails.

    Submitit calls :meth:`checkpoint` when Slurm signals a preemption or the coming time limit;
    it resubmits the same command (the run folder resumes), so submitit requeues the job.
    """

    def __init__(self, job: Job):
        self.job = job

    def __call__(self) -> str:
        proc = start(self.job)
        try:
            rc = proc.wait()
        except BaseException:  # submitit's preemption handler leaves through here (SystemExit), after checkpoint
            stop(proc)
            raise
        if rc != 0:
            raise JobFailed(f"{exit_detail(rc)}; log {self.job.log}")
        return self.job.name

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        with open(self.job.log, "a") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} preempted or at the time limit: submitit requeues "
                     "this job; it resumes from the run's step records\n")
        return DelayedSubmission(self)


# ------------------------------------------------------------------ the interface
class Executor:
    """Runs jobs, starting a failed one again (after ``retry_delay_s``) up to ``retries`` times.

    Engines implement :meth:`submit`, :meth:`poll`, :meth:`cancel` and :meth:`job_id`. ``slots``
    caps how many jobs are submitted at once (None: all of them; the engine queues them).
    """

    name = "executor"
    slots: int | None = None
    poll_s = 0.5
    retry_delay_s = 3.0

    def submit(self, jobs: Sequence[Job]) -> list[Any]:
        """Start ``jobs``; one handle each."""
        raise NotImplementedError

    def poll(self, handle: Any) -> str | None:
        """None while the job runs; ``""`` when it succeeded; else one line saying how it failed."""
        raise NotImplementedError

    def cancel(self, handle: Any) -> None:
        raise NotImplementedError

    def job_id(self, handle: Any) -> str:
        raise NotImplementedError

    def run(self, jobs: Sequence[Job], *, retries: int = 0, say: Callable[[str], None] = print,
            on_change: Callable[[dict[str, Outcome]], None] | None = None) -> dict[str, Outcome]:
        """Run every job to the end; returns ``{name: Outcome}``. Interrupted (Ctrl-C), it cancels
        what still runs, marks it ``cancelled`` and re-raises. ``on_change`` sees every state change."""
        if len({j.name for j in jobs}) != len(jobs):
            raise ValueError("job names must be unique")
        if retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        out = {j.name: Outcome(j.name, j.log) for j in jobs}
        queue: list[tuple[float, Job]] = [(0.0, j) for j in jobs]  # (not before, job)
        running: dict[str, tuple[Job, Any]] = {}
        try:
            while queue or running:
                changed = False
                now = time.time()
                ready = [j for t, j in queue if t <= now]
                free = len(ready) if self.slots is None else max(0, self.slots - len(running))
                batch = ready[:free]
                if batch:
                    names = {j.name for j in batch}
                    queue = [(t, j) for t, j in queue if j.name not in names]
                    for j, h in zip(batch, self.submit(batch)):
                        o = out[j.name]
                        o.attempts, o.state, o.detail = o.attempts + 1, "running", ""
                        o.ids.append(self.job_id(h))
                        running[j.name] = (j, h)
                        say(f"{self.name}: started {j.name} (attempt {o.attempts}, {o.ids[-1]}; log {j.log})")
                    changed = True
                for name, (j, h) in list(running.items()):
                    res = self.poll(h)
                    if res is None:
                        continue
                    del running[name]
                    o, changed = out[name], True
                    if res == "":
                        o.state, o.detail = "done", ""
                        say(f"{self.name}: done {name}")
                    elif o.attempts <= retries:
                        o.state, o.detail = "retrying", res
                        say(f"{self.name}: {name} failed ({res}); starting it again in {self.retry_delay_s:g} s "
                            f"(retry {o.attempts} of {retries}): it resumes where it stopped")
                        queue.append((time.time() + self.retry_delay_s, j))
                    else:
                        o.state, o.detail = "failed", res
                        say(f"{self.name}: FAILED {name} after {o.attempts} attempt{'s' if o.attempts > 1 else ''} "
                            f"({res}); log {j.log}")
                if changed and on_change:
                    on_change(out)
                if queue or running:
                    time.sleep(self.poll_s)
        finally:
            for name, (j, h) in running.items():
                self.cancel(h)
                out[name].state, out[name].detail = "cancelled", "the sweep was interrupted"
            if running and on_change:
                on_change(out)
        return out


class LocalExecutor(Executor):
    """Subprocesses on this machine, at most ``jobs`` at once."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"--jobs must be an integer of at least 1, got {jobs!r}")
        self.slots = jobs

    def submit(self, jobs: Sequence[Job]) -> list[subprocess.Popen]:
        return [start(j) for j in jobs]

    def poll(self, proc: subprocess.Popen) -> str | None:
        rc = proc.poll()
        return None if rc is None else "" if rc == 0 else exit_detail(rc)

    def cancel(self, proc: subprocess.Popen) -> None:
        stop(proc)

    def job_id(self, proc: subprocess.Popen) -> str:
        return f"pid {proc.pid}"


class SubmititExecutor(Executor):
    """Jobs through a submitit executor (Slurm, or submitit's local one): each job one
    :class:`RunCommand`, a batch submitted as one job array."""

    poll_s = 2.0

    def __init__(self, executor: Any, *, slots: int | None = None, name: str | None = None):
        self.executor = executor
        self.slots = slots
        self.name = name or f"submitit-{type(executor).__name__}"

    def submit(self, jobs: Sequence[Job]) -> list[Any]:
        with self.executor.batch():  # one sbatch --array on Slurm
            handles = [self.executor.submit(RunCommand(j)) for j in jobs]
        return handles

    def poll(self, job: Any) -> str | None:
        if not job.done():
            return None
        try:
            job.result()
        except Exception as e:  # submitit wraps the job's own error in a traceback text
            return _failure_line(e)
        return ""

    def cancel(self, job: Any) -> None:
        job.cancel(check=False)

    def job_id(self, job: Any) -> str:
        return f"job {job.job_id}"


def _failure_line(e: BaseException) -> str:
    """The one line that says why a submitit job failed (our JobFailed message when there is one)."""
    text = str(e)
    tag = f"{JobFailed.__name__}: "
    for line in reversed(text.splitlines()):
        if tag in line:
            return line.split(tag, 1)[1].strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return f"{type(e).__name__}: {first}"[:300]


def slurm_executor(folder: Path | str, *, cluster: str = "slurm", partition: str | None = None,
                   gpus_per_node: int | None = None, cpus_per_task: int | None = None, mem_gb: float | None = None,
                   time_min: int = 240, max_running: int | None = None, max_requeue: int = 5,
                   setup: Sequence[str] = (), sbatch: dict[str, Any] | None = None) -> SubmititExecutor:
    """A :class:`SubmititExecutor` for Slurm (``cluster="slurm"``) or submitit's local executor (``"local"``).

    Args:
        folder: where submitit keeps its pickles and per-job logs (``%j`` is the job id).
        partition, gpus_per_node, cpus_per_task, mem_gb: per job (one run); None leaves Slurm's default.
        time_min: the time limit of one job; at the limit the job requeues itself and resumes.
        max_running: at most this many jobs run at once (Slurm: the array's ``%`` limit).
        max_requeue: how many times a job may requeue itself on time limit / preemption.
        setup: shell lines run before each job (``module load ...``, ``source .venv/bin/activate``).
        sbatch: any other sbatch option, e.g. ``{"account": "proj", "qos": "low"}``.

    Example:
        >>> ex = slurm_executor("runs/sw/.submitit", partition="gpu", gpus_per_node=1, time_min=600)  # doctest: +SKIP
    """
    try:
        import submitit
    except ImportError:
        raise ConfigError("--backend slurm needs submitit: pip install 'submitit>=1.5'") from None
    if cluster not in ("slurm", "local"):
        raise ConfigError(f"--cluster must be slurm or local, got {cluster!r}")
    for key, v in (("time", time_min), ("max-requeue", max_requeue + 1), ("jobs", max_running or 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{key}: expected a positive integer, got {v!r}")
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_requeue,
                               local_max_num_timeout=max_requeue)
    params: dict[str, Any] = {"name": "steerheal", "timeout_min": time_min, "gpus_per_node": gpus_per_node,
                              "cpus_per_task": cpus_per_task, "mem_gb": mem_gb, "slurm_partition": partition,
                              "slurm_array_parallelism": max_running, "slurm_setup": list(setup) or None,
                              "slurm_additional_parameters": dict(sbatch) if sbatch else None}
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    # On Slurm the scheduler queues the whole array; submitit's local executor would start them all at once.
    return SubmititExecutor(ex, slots=None if cluster == "slurm" else max_running, name=f"slurm({cluster})")
