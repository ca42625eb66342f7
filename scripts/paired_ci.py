"""Paired bootstrap CIs of the difference between two evaluated models (issue 12's hand check).

Either give two result files written by ``python -m steerheal_utils eval ... --out FILE`` (the same
vignettes and probe items), or nothing: then the embedded model is evaluated twice as the
``default`` preset's 05 does (base, and the persona as system prompt: the ``prompted`` control).

    PYTHONPATH=$PWD python scripts/paired_ci.py [A.json B.json] [--n-boot 2000] [--seed 0]

Prints, per metric, A, B, B - A and its percentile interval (vignettes and probe items resampled
separately, the same draws for both models).
"""

from __future__ import annotations

import argparse
import json
import time

from steerheal_utils import evaluate as E
from steerheal_utils import stats


def _evaluate_default() -> tuple[dict, dict]:
    from steerheal_utils import config as C
    from steerheal_utils import models
    from steerheal_utils.chat import persona_system

    cfg = C.resolve("default")
    model, tok = models.load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model.eval()
    rows = E.load_vignettes(cfg.vignettes or None, cfg.eval_max_rows, seed=cfg.seed)
    probe = E.load_probe(cfg.probe_max_items)
    kw = dict(probe=probe, layout=cfg.eval_layout, think_tokens=cfg.think_tokens, batch_size=cfg.batch_size)
    out = []
    for system in (None, persona_system(cfg.pos_persona)):
        t0 = time.time()
        out.append(E.evaluate_model(model, tok, rows, system=system, **kw))
        print(f"evaluated {'base' if system is None else 'prompted'} in {time.time() - t0:.1f} s")
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", help="two eval --out result files (A, B); none: base vs prompted on the embedded model")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=0.95)
    args = ap.parse_args()
    if len(args.files) == 2:
        a, b = (json.load(open(f)) for f in args.files)
    elif not args.files:
        a, b = _evaluate_default()
    else:
        ap.error("give two result files or none")
    human = E.human_majority(E.load_vignettes(None))
    ids = [r["id"] for r in a["rows"]]
    n_probe = len(a["summary"].get("axis_items") or [])
    vidx = stats.bootstrap_indices(len(ids), args.n_boot, args.seed)
    pidx = stats.bootstrap_indices(n_probe, args.n_boot, args.seed + 1) if n_probe else None
    smp = [stats.condition_samples(stats.align(stats.vignette_arrays(x["rows"], human), ids), x["summary"].get("axis_items"),
                               vidx, pidx) for x in (a, b)]
    u = stats.uncertainty(smp[1], b["summary"], smp[0], a["summary"], args.level)
    print(f"{'metric':18s} {'A':>9s} {'B':>9s} {'B - A':>9s}  {args.level:.0%} CI of B - A (paired, {args.n_boot} resamples)")
    for m, d in u["delta_vs_base"].items():
        flag = "" if stats.excludes_zero(d["lo"], d["hi"]) else "   (includes 0)"
        print(f"{m:18s} {a['summary'][m]:9.4f} {b['summary'][m]:9.4f} {d['delta']:+9.4f}  [{d['lo']:+.4f}, {d['hi']:+.4f}]{flag}")
    ci_a = stats.uncertainty(smp[0], a["summary"])["ci"]
    print("A's own CIs: " + ", ".join(f"{m} [{lo:.4f}, {hi:.4f}]" for m, (lo, hi) in ci_a.items() if m in stats.HEADLINE))


if __name__ == "__main__":
    main()
