"""``steerheal eval``: score any model / adapter stack on the vignettes and the axis probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import models
from ..adapters import bake_adapters, check_adapter_dir, has_adapter
from ..config import Config
from ..runfolder import RunFolderError, atomic_write_json
from ..vector.steering import Steering, check_vector_matches
from ..vector.value import SteeringVector
from .data import load_probe, load_vignettes
from .prompts import EvalError
from .model_eval import evaluate_model

def add_cli(p) -> None:
    """``steerheal eval --model M [--adapters DIR ...] [--vignettes FILE] [--steer V --dose X] --out FILE.json``."""
    d = Config()
    p.add_argument("--model", required=True, help="HF id, local folder, smollm2-135m-instruct or tiny:llama / tiny:gemma3")
    p.add_argument("--adapters", nargs="*", default=[], help="peft adapter folders applied in order (all active)")
    p.add_argument("--vignettes", default=None, help="vignette JSONL with the tiny-mfv schema (default: the shipped classic set)")
    p.add_argument("--steer", default=None, help="steering vector (.safetensors written by 01_vector)")
    p.add_argument("--dose", type=float, default=None, help="dose for --steer (fraction of the layer's median residual norm)")
    p.add_argument("--steer-positions", default=d.steer_positions, choices=("all", "generated"),
                   help="where --steer adds the vector: every position, or from the assistant tag on (as 02 generated)")
    p.add_argument("--dose-halflife", type=int, default=d.dose_halflife,
                   help="tokens after the assistant tag over which the dose halves (0 = constant), as 02 generated")
    p.add_argument("--system", default=None, help="system prompt (e.g. a persona) for every prompt")
    p.add_argument("--layout", default=d.eval_layout, choices=("tinymfv", "prefix"))
    p.add_argument("--think", type=int, default=d.think_tokens, help="greedy think tokens before the answer (0 = direct)")
    p.add_argument("--max-rows", type=int, default=0, help="stratified subset of vignettes (0 = all)")
    p.add_argument("--probe-items", type=int, default=0, help="axis-probe items (0 = all, -1 = skip the probe)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--out", required=True, help="where to write the JSON result (summary + per-row results)")
    p.set_defaults(func=_cli_eval)


def _cli_eval(args) -> int:

    try:
        if args.steer and args.dose is None:
            raise EvalError("--steer needs --dose (e.g. --dose 0.1)")
        if args.dose is not None and not args.steer:
            raise EvalError("--dose given without --steer VECTOR")
        for d in args.adapters:
            if not has_adapter(d):
                raise EvalError(f"--adapters {d}: not a peft adapter folder (needs adapter_config.json and adapter_model.safetensors)")
            check_adapter_dir(d)  # truncated / non-finite weights
        if args.steer and not Path(args.steer).is_file():
            raise EvalError(f"--steer {args.steer}: no such file")
        out = Path(args.out)
        if out.exists() and out.is_dir():
            raise EvalError(f"--out {out} is a folder; give a file name such as {out / 'eval.json'}")
        rows = load_vignettes(args.vignettes, args.max_rows)
        probe = [] if args.probe_items < 0 else load_probe(args.probe_items)
        model, tok = models.load_model(args.model, dtype=args.dtype, device=args.device)
        sv = None
        if args.steer:
            sv = SteeringVector.load(args.steer)
            try:
                check_vector_matches(sv, model)
            except ValueError as e:
                raise EvalError(f"--steer {args.steer} does not fit model {args.model}: {e}") from None
        model = bake_adapters(model, [Path(d) for d in args.adapters])
        if args.dose_halflife < 0:
            raise EvalError(f"--dose-halflife must be >= 0 (0 = constant dose), got {args.dose_halflife}")
        spec = Steering(sv, args.dose or 0.0, args.steer_positions, args.dose_halflife) if sv is not None else None
        res = evaluate_model(model, tok, rows, probe=probe, layout=args.layout, system=args.system,
                             think_tokens=args.think, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                             steering=spec)
    except (EvalError, FileNotFoundError, RunFolderError, models.ModelLoadError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # unreadable vector files and the like
        print(f"error: {e}", file=sys.stderr)
        return 1
    res["args"] = {"model": args.model, "adapters": args.adapters, "vignettes": args.vignettes, "steer": args.steer,
                   "dose": args.dose, "steer_positions": args.steer_positions, "dose_halflife": args.dose_halflife,
                   "system": args.system}
    atomic_write_json(out, res)
    s = res["summary"]
    print(json.dumps({k: s.get(k) for k in ("auth_nats", "care_nats", "coherence", "agreement", "axis_logodds", "n_rows", "seconds")}))
    return 0
