"""Backtrack overhead: time per generated token of the constant sampler (``sample``) against the
backtrack sampler at a few thresholds, on the tiny random model and on the embedded model.

    PYTHONPATH=$PWD python scripts/backtrack_bench.py                        # tiny:llama, random vector
    PYTHONPATH=$PWD python scripts/backtrack_bench.py --model embedded \\
        --vector RUN/round_00/vector.safetensors --dose 0.068 --n 8 --max-new 32

Prints one line per arm (ms per generated token, its ratio to constant, backoffs) and a JSON
summary. The backtrack sampler reads the unsteered logits at every step (it has no knob to read
them every few steps): threshold ``inf`` measures that cost alone, the others add the rewinds.
Wall-clock figures on a shared machine are rough: run it alone for numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from steerheal_utils import datafiles
from steerheal_utils.generate.backtrack import sample_backtrack
from steerheal_utils.generate.sampling import sample
from steerheal_utils.models import load_model, tiny_model
from steerheal_utils.vector.value import SteeringVector


def _tokens(rows: list[dict]) -> int:
    return sum(r["n_tokens"] + (not r["truncated"]) for r in rows)  # + the EOS step


def bench(model, tok, sv, dose: float, prompts: list[str], thresholds: list[float], reps: int, **kw) -> list[dict]:
    """Best-of-``reps`` seconds per generated token for ``sample`` and ``sample_backtrack`` at each threshold."""
    arms = [("constant", None)] + [(f"backtrack kl>{t:g}", t) for t in thresholds]
    out = []
    for name, thr in arms:
        best, rows = math.inf, []
        for _ in range(reps):
            t0 = time.perf_counter()
            rows = (sample(model, tok, prompts, sv=sv, dose=dose, seed=0, **kw) if thr is None else
                    sample_backtrack(model, tok, prompts, sv=sv, dose=dose, seed=0, threshold=thr, **kw))
            best = min(best, (time.perf_counter() - t0) / max(1, _tokens(rows)))
        out.append({"arm": name, "ms_per_token": round(1000 * best, 3), "tokens": _tokens(rows),
                    "backoffs": sum(r.get("backoffs", 0) for r in rows),
                    "rows_backed_off": sum(r.get("backoffs", 0) > 0 for r in rows)})
    for r in out:
        r["ratio_to_constant"] = round(r["ms_per_token"] / out[0]["ms_per_token"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny:llama", help="tiny:llama, tiny:gemma3 or embedded (SmolLM2-135M-Instruct)")
    p.add_argument("--vector", default="", help="a run's vector.safetensors (default: a random vector on layers 1-2)")
    p.add_argument("--dose", type=float, default=0.1)
    p.add_argument("--thresholds", type=float, nargs="+", default=[math.inf, 2.0, 1.0])
    p.add_argument("--n", type=int, default=8, help="prompts (one batch)")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model.startswith("tiny:"):
        model, tok = tiny_model(a.model.split(":", 1)[1], seed=0)
    else:
        from steerheal_utils.embedded import NAME
        model, tok = load_model(NAME if a.model == "embedded" else a.model, dtype="float32", device="cpu")
    if a.vector:
        sv = SteeringVector.load(a.vector)
    else:
        g = torch.Generator().manual_seed(0)
        d = model.config.hidden_size
        sv = SteeringVector({i: torch.randn(d, generator=g) for i in (1, 2)}, {1: 5.0, 2: 5.0})
    prompts = [r["text"] for r in datafiles.prompts("dilemmas")[:a.n]]
    kw = dict(temperature=1.0, top_p=0.95, top_k=64, max_new_tokens=a.max_new, batch_size=a.n)
    res = bench(model, tok, sv, a.dose, prompts, a.thresholds, a.reps, **kw)
    print(f"model {a.model}, dose {a.dose:g}, {a.n} prompts x up to {a.max_new} tokens, "
          f"{torch.get_num_threads()} threads, best of {a.reps}")
    for r in res:
        print(f"  {r['arm']:<20} {r['ms_per_token']:8.2f} ms/token  x{r['ratio_to_constant']:.2f}  "
              f"{r['tokens']} tokens, {r['rows_backed_off']}/{a.n} rows backed off ({r['backoffs']} backoffs)")
    print(json.dumps({"model": a.model, "dose": a.dose, "n": a.n, "max_new": a.max_new, "arms": res}))


if __name__ == "__main__":
    main()
