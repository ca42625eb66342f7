"""Measure the random-vector controls' effect against the persona vector's on the embedded model.

Next-token KL(steered || unsteered) at the assistant tag, mean over the 48 shipped dilemmas, at
one dose, for: the persona vector; the old control (an independent random direction per layer,
norm-matched per layer); one random direction shared by all layers (scaled per layer); and the
new control (one Haar rotation of all layer vectors, ``SteeringVector.rotated``). Then the
KL-matched dose of each rotation (``controls.match_band``), with the seconds it took.

    PYTHONPATH=$PWD python scripts/control_kl.py [--dose 0.076] [--n 8] [--contexts 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from steerheal_utils import config as C
from steerheal_utils import controls, models
from steerheal_utils.vector import SteeringVector, extract_vector, load_contexts


def independent(sv: SteeringVector, seed: int) -> SteeringVector:
    """The control before issue 12: an independent isotropic direction per layer, norm-matched."""
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for layer, v in sv.directions.items():
        r = torch.randn(v.shape, generator=g)
        dirs[layer] = r * (v.norm() / r.norm())
    return SteeringVector(dirs, dict(sv.resid_norms))


def shared(sv: SteeringVector, seed: int) -> SteeringVector:
    """One random direction for every layer, scaled to each layer's norm."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(next(iter(sv.directions.values())).shape, generator=g)
    r = r / r.norm()
    return SteeringVector({layer: r * v.norm() for layer, v in sv.directions.items()}, dict(sv.resid_norms))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dose", type=float, default=0.076)
    ap.add_argument("--n", type=int, default=8, help="controls of each kind")
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = C.resolve("default")
    model, tok = models.load_model(cfg.model)
    model.eval()
    layers = cfg.steered_layers(models.n_layers(model))
    ctx = load_contexts(args.contexts, seed=0)
    sv, _ = extract_vector(model, tok, [c["text"] for c in ctx], cfg.pos_persona, cfg.neg_persona, layers, batch_size=16)
    g = sv.gram()
    cos = g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt())
    prompts = controls.kl_prompts(tok)
    t0 = time.time()
    ref = controls.tag_logprobs(model, tok, prompts)
    t_ref = time.time() - t0

    def kl(v, d=args.dose):
        return controls.tag_kl(model, tok, prompts, v, d, ref=ref)

    t0 = time.time()
    persona = kl(sv)
    t_one = time.time() - t0
    res = {"layers": layers, "dose": args.dose, "n_prompts": len(prompts), "layer_cosines": cos.round(decimals=3).tolist(),
           "persona_kl": persona, "seconds_ref": round(t_ref, 2), "seconds_per_kl": round(t_one, 2),
           "independent_kl": [kl(independent(sv, s)) for s in range(args.n)],
           "shared_direction_kl": [kl(shared(sv, s)) for s in range(args.n)],
           "rotation_kl_same_dose": [kl(sv.rotated(s)) for s in controls.control_seeds(0, args.n)]}
    t0 = time.time()
    target, band = controls.match_band(model, tok, sv, args.dose, controls.control_seeds(0, args.n), prompts=prompts)
    res["match_seconds"] = round(time.time() - t0, 1)
    res["matched"] = [{k: m[k] for k in ("seed", "dose", "ratio", "kl", "matched", "steps", "reason")} for _, m in band]
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
