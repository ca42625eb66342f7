"""One decode step's sampling cost: transformers' temperature/top-k/top-p warpers vs TopKTopP.

    python scripts/sampler_bench.py                      # CPU, and CUDA when present
    python scripts/sampler_bench.py --batch 256 --vocab 262144 --reps 20 --devices cuda

transformers' top-p sorts the whole vocabulary every step (262,144 entries at gemma-3); TopKTopP
runs top-p on the top-k survivors only (steerheal_utils/generate/warp.py). Times the warping plus
the softmax and multinomial draw that follow it in generate, on random logits, per device; prints
one JSON line per device with milliseconds per step (median of --reps) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from steerheal_utils.generate.warp import TopKTopP


def step_hf(scores, t, k, p):
    for w in (TemperatureLogitsWarper(t), TopKLogitsWarper(k), TopPLogitsWarper(p)):
        scores = w(None, scores)
    return torch.multinomial(scores.softmax(-1), 1)


def step_ours(scores, t, k, p):
    return torch.multinomial(TopKTopP(t, k, p)(None, scores).softmax(-1), 1)


def timed(fn, scores, reps, sync) -> float:
    fn(scores)
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(scores)
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    a = ap.parse_args()
    devices = a.devices
    for dev in devices:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        scores = (torch.randn(a.batch, a.vocab, device=dev) * 3).to(dtype).float()  # generate warps float32 logits
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        hf = timed(lambda s: step_hf(s, a.temperature, a.top_k, a.top_p), scores, a.reps, sync)
        ours = timed(lambda s: step_ours(s, a.temperature, a.top_k, a.top_p), scores, a.reps, sync)
        print(json.dumps({"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
                          "threads": torch.get_num_threads(), "batch": a.batch, "vocab": a.vocab,
                          "top_k": a.top_k, "top_p": a.top_p, "hf_ms_per_step": round(hf, 2),
                          "topk_top_p_ms_per_step": round(ours, 2), "speedup": round(hf / ours, 1)}))


if __name__ == "__main__":
    main()
