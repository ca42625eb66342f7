"""How long a local Ray cluster takes to start here, and whether it starts at all (issue 18).

Ray is not a dependency of steerheal; run this from a venv that has it:

    python3.11 -m venv /tmp/rayvenv && /tmp/rayvenv/bin/pip install "ray[default]==2.60.0"
    /tmp/rayvenv/bin/python scripts/ray_startup.py --trials 5 --hogs 0 2

Each trial is a fresh process: ``ray.init`` (2 CPUs, no dashboard, 100 MB object store), four
tasks, one task SIGKILLed once and retried by Ray (``max_retries=1``), ``ray.shutdown``. ``--hogs
N`` keeps N busy-looping processes running during the trials (2 = both cores of a 2-core CI
box busy, as when a sweep's runs are working). Prints one JSON line per trial, then per hog
level: successes, init seconds (sorted and median), shutdown seconds, the load average seen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TRIAL = r'''
import json, os, signal, sys, time
t = time.time()
import ray
rec = {"import_s": round(time.time() - t, 2), "load": os.getloadavg()[0]}
t = time.time()
try:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
except Exception as e:
    rec.update(ok=False, init_s=round(time.time() - t, 2), error=f"{type(e).__name__}: {str(e)[:200]}")
    print(json.dumps(rec)); sys.exit(0)
rec["init_s"] = round(time.time() - t, 2)

@ray.remote(num_cpus=0.5)
def square(x):
    return x * x

@ray.remote(num_cpus=0.5, max_retries=1)
def die_once(flag):
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "retried"

t = time.time()
assert ray.get([square.remote(i) for i in range(4)], timeout=300) == [0, 1, 4, 9]
rec["tasks4_s"] = round(time.time() - t, 2)
flag = f"/tmp/ray_startup_flag_{os.getpid()}_{time.time_ns()}"
rec["killed_task"] = ray.get(die_once.remote(flag), timeout=300)
os.unlink(flag)
t = time.time()
ray.shutdown()
rec.update(shutdown_s=round(time.time() - t, 2), ok=True)
print(json.dumps(rec))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--hogs", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--timeout", type=float, default=240, help="seconds before a trial counts as failed")
    args = ap.parse_args()
    for n in args.hogs:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        recs = []
        try:
            time.sleep(3 if n else 0)
            for _ in range(args.trials):
                try:
                    r = subprocess.run([sys.executable, "-c", TRIAL], capture_output=True, text=True, timeout=args.timeout)
                    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
                    rec = json.loads(lines[-1]) if lines else {"ok": False, "error": r.stderr.strip()[-300:]}
                except subprocess.TimeoutExpired:
                    rec = {"ok": False, "error": f"no result within {args.timeout:g} s"}
                rec["hogs"] = n
                recs.append(rec)
                print(json.dumps(rec), flush=True)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        ok = [r for r in recs if r.get("ok")]
        summary = {"hogs": n, "started": f"{len(ok)}/{len(recs)}",
                   "init_s": sorted(r["init_s"] for r in ok),
                   "init_median_s": statistics.median(r["init_s"] for r in ok) if ok else None,
                   "shutdown_median_s": statistics.median(r["shutdown_s"] for r in ok) if ok else None,
                   "load": [round(r["load"], 1) for r in recs if "load" in r]}
        print("summary", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
