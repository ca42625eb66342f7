"""Progress bars that leave a readable trace, and the stage's progress as the terminal shows it.

Stages call :func:`tqdm` where they would call ``tqdm.auto.tqdm`` (same arguments). Two cases:

- run by ``steerheal run`` (the driver sets :data:`PROGRESS_ENV` to a file for the stage): no
  widget is drawn (a kernel nobody watches would save it frozen at "0%" in the journal).
  Instead the bar writes its state (what it does, k of n, postfix, elapsed, time left) to that
  file, at most once a second, and the driver shows it on the terminal; when the bar closes it
  prints one plain line, ``desc: n/total in 12s (loss=0.41)``, which the executed notebook keeps
  as its final text;
- anywhere else (JupyterLab, a terminal): ``tqdm.auto.tqdm`` as before.

Example:
    >>> for b in tqdm(range(3), desc="batches"):   # doctest: +SKIP
    ...     pass
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

PROGRESS_ENV = "STEERHEAL_PROGRESS"  # a file path: where a driver-run stage reports its bars


def fmt_seconds(s: float) -> str:
    """``75`` -> ``1m15s``, ``9.4`` -> ``9s``, ``3725`` -> ``1h02m``."""
    s = max(0, int(round(s)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta(n: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left at a constant rate after ``n`` of ``total`` steps in ``elapsed`` seconds;
    None when it cannot be estimated (no step done yet, or no total).

    Example:
        >>> eta(5, 20, 10.0)
        30.0
    """
    if not total or n <= 0 or elapsed <= 0:
        return None
    return elapsed / n * max(total - n, 0)


_OPEN: list["ReportingBar"] = []  # bars open in this process, outermost first
_NOTE = {"text": ""}  # what the stage says it is doing, besides its bars


class ReportingBar:
    """A tqdm-like counter that reports to a file (read by the driver) and prints a final line."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "", total: int | None = None,
                 path: Path, **_ignored: Any) -> None:
        self.iterable, self.desc, self.path = iterable, desc or "", Path(path)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.t0 = self._last = time.time()
        self.closed = False
        _OPEN.append(self)
        self._write(force=True)

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "ReportingBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        self._write()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""
        self._write()

    def state(self) -> dict:
        el = time.time() - self.t0
        return {"desc": self.desc, "n": self.n, "total": self.total, "postfix": self.postfix,
                "elapsed": el, "eta": eta(self.n, self.total, el)}

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 1.0:
            return
        self._last = now
        _publish(self.path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self in _OPEN:
            _OPEN.remove(self)
        _publish(self.path)
        print(summary_line(self.state()), flush=True)


def _publish(path: Path) -> None:
    """Write what the stage is doing (its note and every open bar) for the driver: best effort,
    progress must never fail a stage."""
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"note": _NOTE["text"], "bars": [b.state() for b in _OPEN], "time": time.time()}))
        os.replace(tmp, path)
    except OSError:
        pass


def note(text: str) -> None:
    """Say what the stage is doing now (``dose search call 3 of 9``); shown on the driver's status
    line next to the open bars. Outside a driver-run stage it does nothing."""
    path = os.environ.get(PROGRESS_ENV)
    if path:  # a driver-run stage is one kernel: nothing outlives it
        _NOTE["text"] = text
        _publish(Path(path))


_CALLS: dict[str, int] = {}


def search_note(phase: str, dose: float, n_tok: dict, cfg: Any, baseline_reps: int) -> None:
    """02's note before each sampling call: ``dose search call 3 of 9, dose 0.1`` or
    ``collecting at dose 0.1, batch 2``."""
    if not os.environ.get(PROGRESS_ENV):
        return
    k = _CALLS[phase] = _CALLS.get(phase, 0) + 1
    if phase == "calibration":
        total = baseline_reps + cfg.calib_grid + cfg.calib_refine
        note(f"dose search call {k} of {total}, dose {dose:.3g}")
    else:
        note(f"collecting at dose {dose:.3g}, batch {k}")


def summary_line(st: dict) -> str:
    """``desc: n/total in 12s (postfix)``: a finished bar as plain text."""
    count = f"{st['n']}/{st['total']}" if st.get("total") else f"{st['n']}"
    post = f" ({st['postfix']})" if st.get("postfix") else ""
    return f"{st.get('desc') or 'done'}: {count} in {fmt_seconds(st['elapsed'])}{post}"


def tqdm(iterable: Iterable | None = None, *args: Any, disable: bool = False, **kw: Any) -> Any:
    """``tqdm.auto.tqdm`` outside the driver; a :class:`ReportingBar` in a stage the driver runs."""
    path = os.environ.get(PROGRESS_ENV)
    if path and not disable:
        return ReportingBar(iterable, path=Path(path), **kw)
    from tqdm.auto import tqdm as auto

    return auto(iterable, *args, disable=disable, **kw)


def read_state(path: Path | str) -> dict | None:
    """The last state a stage reported (``{"note", "bars"}``), or None (nothing yet, or unreadable)."""
    try:
        st = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def _bar_text(b: dict) -> str:
    count = f" {b['n']}/{b['total']}" if b.get("total") else f" {b['n']}"
    post = f" ({b['postfix']})" if b.get("postfix") else ""
    return f"{b.get('desc', '')}{count}{post}"


def time_left(st: dict | None) -> float | None:
    """The innermost open bar's estimate of the seconds it has left, if any."""
    for b in reversed((st or {}).get("bars") or []):
        if b.get("eta"):  # a finished bar (0 left) says nothing about the stage's remaining work
            return b["eta"]
    return None


def describe(st: dict | None) -> str:
    """One short terminal fragment: ``dose search call 3 of 9 · sampling (dose 0.1) 1/2 ~20s left``."""
    if not st:
        return ""
    parts = ([st["note"]] if st.get("note") else []) + [_bar_text(b) for b in st.get("bars") or []]
    left = time_left(st)
    return " · ".join(parts) + (f" ~{fmt_seconds(left)} left" if left is not None and parts else "")


def stage_seconds(run_dir: Path | str, rnd: int, stage: str) -> float | None:
    """How long ``stage`` took in the latest earlier round that has a step record (its ``seconds``):
    the estimate of this round's time. None when no earlier round recorded it."""
    from . import contract

    for r in range(rnd - 1, -1, -1):
        p = contract.marker_path(run_dir, r, stage)
        try:
            s = json.loads(p.read_text()).get("seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(s, (int, float)) and s > 0:
            return float(s)
    return None


class Ticker:
    """The driver's status line for the stage that runs: its label, elapsed time, what the stage's
    bar reports (``heal r00 5/12 (nll=1.2)``) and the time left (from that bar, else from the same
    stage's time in an earlier round). Rewritten in place on a terminal; elsewhere one line at the
    start, one every ``every`` seconds while something changes, and one at the end."""

    def __init__(self, t0: float, *, every: float = 30.0) -> None:
        import tempfile
        import threading

        self.t0, self.label, self.every = t0, "", every
        self._stop = threading.Event()
        self.tty = sys.stderr.isatty()
        self._thread = None
        fd, name = tempfile.mkstemp(prefix="steerheal-progress-", suffix=".json")
        os.close(fd)
        self.file = Path(name)
        self.expected: float | None = None

    def start(self, label: str, expected: float | None = None) -> None:
        import threading

        self.label, self.t_stage, self.expected = label, time.time(), expected
        self.file.write_text("")
        os.environ[PROGRESS_ENV] = str(self.file)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.tty:
            print(f"{label} ...", file=sys.stderr, flush=True)

    def line(self) -> str:
        now = time.time()
        el = now - self.t_stage
        st = read_state(self.file)
        try:
            what = describe(st)
        except (KeyError, TypeError, ValueError, AttributeError):  # a state this version cannot read: the line goes on
            st, what = None, ""
        left = ""
        if time_left(st) is None and self.expected:
            left = f"  ~{fmt_seconds(max(self.expected - el, 0))} left (as round before)" if el < self.expected \
                else "  (longer than the round before)"
        return f"{self.label}  {fmt_seconds(el)}" + (f"  {what}" if what else "") + left + \
            f"  (run {fmt_seconds(now - self.t0)})"

    def _run(self) -> None:
        last_print, last_line = time.time(), ""
        while not self._stop.wait(1.0):
            ln = self.line()
            if self.tty:
                print("\r\033[K" + ln[: os.get_terminal_size(sys.stderr.fileno()).columns - 1 if _has_size() else 200],
                      end="", file=sys.stderr, flush=True)
            elif time.time() - last_print >= self.every and ln.split("  (run")[0] != last_line:
                print(ln, file=sys.stderr, flush=True)
                last_print, last_line = time.time(), ln.split("  (run")[0]

    def end(self, status: str) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            if self.tty:
                print("\r\033[K", end="", file=sys.stderr)
        os.environ.pop(PROGRESS_ENV, None)
        el = time.time() - self.t_stage
        print(f"{self.label}  {fmt_seconds(el)}  (run {fmt_seconds(time.time() - self.t0)})  {status}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        os.environ.pop(PROGRESS_ENV, None)
        try:
            self.file.unlink()
        except OSError:
            pass


def _has_size() -> bool:
    try:
        os.get_terminal_size(sys.stderr.fileno())
        return True
    except OSError:
        return False
