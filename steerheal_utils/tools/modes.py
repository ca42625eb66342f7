"""Comparing steering modes (issue 16 part 3): one table from one-round runs that differ only in
their steering mode, and the backtrack sampler's overhead.

``python -m steerheal_utils.tools.modes compare OUT_DIR NAME=RUN_DIR ...`` writes ``modes.csv`` and
``modes.json``: per arm the keep rate of 03 (Wilson 95%), the loop rate of the kept rows (the study's
strict loop detector, :func:`steerheal_utils.tools.study.kept_loop_rate`; Wilson 95%), backoffs,
the steered and the healed model's movement on the care-vs-authority probe (``axis_logodds``) vs
the base with the eval's paired bootstrap interval, the healed model's KL to the base on the held-out
answers, and movement per nat of that KL (the interval is the delta's interval divided by the KL,
which is taken as fixed).

``python -m steerheal_utils.tools.modes overhead RUN_DIR --n 16`` times :func:`sample` against
the backtrack sampler (no backoff: threshold infinite) on the run's model and vector at its dose,
and reports the per-token KL the backtrack signal sees (its quantiles choose ``backtrack_kl``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from .. import config as C
from .. import contract
from ..generate.keepcurve import wilson
from ..runfolder import atomic_write_json, atomic_write_text, read_json, read_jsonl
from .study import kept_loop_rate, strict_loop_thresholds

COLUMNS = ("arm", "steer_mode", "dose_halflife", "dose", "n_generated", "n_kept", "keep_rate", "keep_lo", "keep_hi",
           "kept_loop_rate", "kept_loop_lo", "kept_loop_hi", "rows_backed_off", "backoffs",
           "steered_axis_delta", "steered_axis_lo", "steered_axis_hi",
           "healed_axis_delta", "healed_axis_lo", "healed_axis_hi", "healed_kl_to_base",
           "healed_axis_per_nat", "healed_axis_per_nat_lo", "healed_axis_per_nat_hi",
           "healed_coherence_delta", "healed_coherence_lo", "healed_coherence_hi")


def _delta(ev: dict, condition: str, metric: str) -> tuple[Any, Any, Any]:
    d = ((ev.get("conditions") or {}).get(condition) or {}).get("delta_vs_base", {}).get(metric) or {}
    return d.get("delta"), d.get("lo"), d.get("hi")


def arm_row(name: str, run_dir: Path | str, rnd: int = 0) -> dict[str, Any]:
    """One arm's row of the comparison (:data:`COLUMNS`) from its round ``rnd``."""
    run_dir = Path(run_dir)
    cfg = C.load_config(run_dir / "config.yaml")
    comp = read_jsonl(contract.path(run_dir, rnd, "completions"), "03's completions")
    gen = read_json(contract.path(run_dir, rnd, "generate_summary"), "02's record")
    ev = contract.read_eval(run_dir, rnd)
    kept = [r for r in comp if r.get("keep") is True]
    strict, _ = strict_loop_thresholds()
    loop = kept_loop_rate(comp, strict)
    n_loop = round(loop * len(kept)) if loop is not None else 0
    k_lo, k_hi = wilson(len(kept), len(comp))
    l_lo, l_hi = wilson(n_loop, len(kept))
    s = _delta(ev, "steered", "axis_logodds")
    h = _delta(ev, "healed", "axis_logodds")
    hc = _delta(ev, "healed", "coherence")
    kl = (ev.get("conditions", {}).get("healed") or {}).get("kl_to_base")
    per = [x / kl if isinstance(x, (int, float)) and kl else None for x in h]
    bo = gen.get("backoff") or {}
    return {"arm": name, "steer_mode": cfg.steer_mode, "dose_halflife": cfg.dose_halflife, "dose": gen.get("dose"),
            "n_generated": len(comp), "n_kept": len(kept), "keep_rate": len(kept) / max(1, len(comp)),
            "keep_lo": k_lo, "keep_hi": k_hi, "kept_loop_rate": loop, "kept_loop_lo": l_lo if kept else None,
            "kept_loop_hi": l_hi if kept else None, "rows_backed_off": bo.get("rows_backed_off"),
            "backoffs": bo.get("backoffs"), "steered_axis_delta": s[0], "steered_axis_lo": s[1], "steered_axis_hi": s[2],
            "healed_axis_delta": h[0], "healed_axis_lo": h[1], "healed_axis_hi": h[2], "healed_kl_to_base": kl,
            "healed_axis_per_nat": per[0], "healed_axis_per_nat_lo": per[1], "healed_axis_per_nat_hi": per[2],
            "healed_coherence_delta": hc[0], "healed_coherence_lo": hc[1], "healed_coherence_hi": hc[2]}


def _csv(rows: Sequence[dict]) -> str:
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)
    return "\n".join([",".join(COLUMNS)] + [",".join(fmt(r.get(c)) for c in COLUMNS) for r in rows]) + "\n"


def compare(out_dir: Path | str, arms: dict[str, Path | str], note: str = "") -> list[dict]:
    """Write ``modes.csv`` and ``modes.json`` (rows + ``note``: the reduction) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [arm_row(n, d) for n, d in arms.items()]
    atomic_write_text(out / "modes.csv", _csv(rows))
    atomic_write_json(out / "modes.json", {"note": note, "columns": list(COLUMNS), "rows": rows})
    return rows


def quantiles(xs: Sequence[float], qs=(0.5, 0.9, 0.99)) -> dict[str, float]:
    """Empirical quantiles (nearest rank) of ``xs``.

    Example:
        >>> quantiles([1.0, 2.0, 3.0, 4.0], (0.5, 1.0))
        {'q50': 2.0, 'q100': 4.0}
    """
    s = sorted(xs)
    return {f"q{round(q * 100)}": s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] for q in qs}


def overhead(run_dir: Path | str, n: int = 16, rnd: int = 0) -> dict[str, Any]:
    """Seconds per generated token of :func:`sample` and of the backtrack sampler (never backing off) on
    ``n`` prompts at the run's dose, and the per-token KL(steered || unsteered) seen along the way."""
    import torch

    from .. import datafiles
    from ..generate.backtrack import sample_backtrack
    from ..generate.sampling import sample, sample_params
    from ..models import load_model
    from ..vector.value import SteeringVector

    run_dir = Path(run_dir)
    cfg = C.load_config(run_dir / "config.yaml")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    sv = SteeringVector.load(contract.path(run_dir, rnd, "vector"))
    dose = float(read_json(contract.path(run_dir, rnd, "generate_summary"), "02's record")["dose"])
    prompts = [p["text"] for p in datafiles.prompts("dilemmas")[:n]]
    params = {k: v for k, v in sample_params(cfg).items() if k not in ("compile", "backtrack", "gate", "gate_kind")}
    out: dict[str, Any] = {"n_prompts": n, "dose": dose, "threads": torch.get_num_threads(), "model": cfg.model}
    for name, fn in (("sample", lambda: sample(model, tok, prompts, sv=sv, dose=dose, seed=0, **params)),
                     ("backtrack_no_backoff", lambda: sample_backtrack(model, tok, prompts, sv=sv, dose=dose, seed=0,
                                                                       threshold=math.inf, **params))):
        t = time.time()
        rows = fn()
        sec = time.time() - t
        toks = sum(r["n_tokens"] + (not r["truncated"]) for r in rows)
        out[name] = {"seconds": round(sec, 2), "tokens": toks, "ms_per_token": round(1000 * sec / max(1, toks), 2)}
        if name.startswith("backtrack"):
            out["kl_row_mean"] = quantiles([r["kl_mean"] for r in rows])
            out["kl_row_max"] = quantiles([r["kl_max"] for r in rows])
            out["kl_row_mean_mean"] = statistics.fmean(r["kl_mean"] for r in rows)
    out["overhead"] = round(out["backtrack_no_backoff"]["ms_per_token"] / out["sample"]["ms_per_token"], 3)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steerheal_utils.tools.modes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="one table from one-round runs (NAME=RUN_DIR ...)")
    c.add_argument("out_dir")
    c.add_argument("arms", nargs="+")
    c.add_argument("--note", default="")
    o = sub.add_parser("overhead", help="time sample() against the backtrack sampler on a run's model and vector")
    o.add_argument("run_dir")
    o.add_argument("--n", type=int, default=16)
    o.add_argument("--out", default="")
    a = p.parse_args(argv)
    if a.cmd == "compare":
        arms = dict(x.split("=", 1) for x in a.arms)
        for r in compare(a.out_dir, arms, a.note):
            print(json.dumps(r))
    else:
        res = overhead(a.run_dir, a.n)
        print(json.dumps(res, indent=1))
        if a.out:
            atomic_write_json(Path(a.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
