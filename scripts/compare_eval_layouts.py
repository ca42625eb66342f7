"""Compare the eval's prompt layouts and its think path on one model; prints and writes JSON.

T = 0: the ``prefix`` layout (fast, not the tiny-mfv prompt) against ``tinymfv`` on the same
vignettes: per-row agreement (Pearson r of the 7-way p, over rows x foundations; share of
rows with the same top answer), the headline metrics and the seconds of each. Then the
tiny-mfv think path at small budgets on a stratified subset, against T = 0 on that subset.

Example:
    PYTHONPATH=. python scripts/compare_eval_layouts.py --model smollm2-135m-instruct \
        --think 16 32 --think-rows 28 --out /tmp/layouts.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from steerheal_utils import evaluate as E
from steerheal_utils.models import load_model

HEADLINE = ("auth_nats", "care_nats", "coherence", "agreement", "axis_logodds", "unscorable", "natural_reads", "seconds")


def _p(res: dict) -> torch.Tensor:
    return torch.tensor([r["p"] for r in res["rows"] if r["p"] is not None], dtype=torch.float64)


def agreement(a: dict, b: dict) -> dict:
    """Per-row agreement of two evals of the same rows."""
    pa, pb = _p(a), _p(b)
    r = torch.corrcoef(torch.stack([pa.flatten(), pb.flatten()]))[0, 1]
    return {"p_pearson_r": round(float(r), 4), "top_answer_agreement": round(float((pa.argmax(-1) == pb.argmax(-1)).double().mean()), 4),
            "mean_abs_p_diff": round(float((pa - pb).abs().mean()), 4)}


def headline(res: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["summary"].items() if k in HEADLINE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-rows", type=int, default=0, help="vignettes for the T = 0 comparison (0 = all 132)")
    ap.add_argument("--probe-items", type=int, default=0, help="axis-probe items (0 = all, -1 = none)")
    ap.add_argument("--think", type=int, nargs="*", default=[16], help="think budgets to run (tinymfv layout)")
    ap.add_argument("--think-rows", type=int, default=28, help="stratified vignettes for the think runs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    probe = [] if args.probe_items < 0 else E.load_probe(args.probe_items)
    rows = E.load_vignettes(max_rows=args.max_rows)
    out: dict = {"model": args.model, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                 "n_rows": len(rows), "n_probe": len(probe)}
    res = {}
    for layout in ("prefix", "tinymfv"):
        res[layout] = E.evaluate_model(model, tok, rows, probe=probe, layout=layout, batch_size=args.batch_size)
        out[f"T0_{layout}"] = headline(res[layout])
        print(layout, out[f"T0_{layout}"], flush=True)
    out["T0_prefix_vs_tinymfv"] = agreement(res["prefix"], res["tinymfv"])
    print("prefix vs tinymfv", out["T0_prefix_vs_tinymfv"], flush=True)

    sub = E.load_vignettes(max_rows=args.think_rows)
    ids = {r["id"] for r in sub}
    base = {"summary": {}, "rows": [r for r in res["tinymfv"]["rows"] if r["id"] in ids]}
    out["think_rows"] = len(sub)
    out["think_T0_subset"] = headline(E.evaluate_model(model, tok, sub, layout="tinymfv", batch_size=args.batch_size))
    for T in args.think:
        t0 = time.time()
        r = E.evaluate_model(model, tok, sub, layout="tinymfv", think_tokens=T, batch_size=args.batch_size)
        out[f"think_T{T}"] = {**headline(r), "wall_s": round(time.time() - t0, 1),
                              "vs_T0": agreement(base, r)}
        print(f"T={T}", out[f"think_T{T}"], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
