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
    ap.add_argument("--n", type=int, default=8, help="rotations (the band)")
    ap.add_argument("--n-other", type=int, default=3, help="controls of the other two kinds")
    ap.add_argument("--contexts", type=int, default=32)
    ap.add_argument("--match-prompts", type=int, default=None, help="dilemmas for the match (default: the preset's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = C.resolve("default")
    res: dict = {"dose": args.dose}

    def show(key, value):
        res[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)

    model, tok = models.load_model(cfg.model)
    model.eval()
    layers = cfg.steered_layers(models.n_layers(model))
    ctx = load_contexts(args.contexts, seed=0)
    sv, _ = extract_vector(model, tok, [c["text"] for c in ctx], cfg.pos_persona, cfg.neg_persona, layers, batch_size=16)
    g = sv.gram()
    show("layers", layers)
    show("layer_cosines", [[round(float(x), 3) for x in row] for row in g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt())])
    prompts = controls.kl_prompts(tok)
    t0 = time.time()
    ref = controls.tag_logprobs(model, tok, prompts)
    show("seconds_per_kl_pass_48_prompts", round(time.time() - t0, 1))

    def kl(v, d=args.dose):
        return round(controls.tag_kl(model, tok, prompts, v, d, ref=ref), 4)

    show("persona_kl_48", kl(sv))
    show("independent_kl_48", [kl(independent(sv, s)) for s in range(args.n_other)])
    show("shared_direction_kl_48", [kl(shared(sv, s)) for s in range(args.n_other)])
    seeds = controls.control_seeds(0, args.n)
    show("rotation_kl_48_same_dose", [kl(sv.rotated(s)) for s in seeds[:args.n_other]])
    n_match = cfg.control_kl_prompts if args.match_prompts is None else args.match_prompts
    mp = controls.kl_prompts(tok, n_match)
    t0 = time.time()
    m = controls.KLMatcher(model, tok, sv, args.dose, mp, tol=cfg.control_kl_tol, max_ratio=cfg.control_max_dose_ratio)
    show(f"persona_kl_{len(mp)}", round(m.target, 4))
    band = []
    for s in seeds:
        r = m.match(sv.rotated(s))
        band.append({"seed": s, "dose": round(r["dose"], 5), "ratio": round(r["ratio"], 3), "kl": round(r["kl"], 4),
                     "matched": r["matched"], "steps": r["steps"]})
        show("matched", band)
    show("match_seconds", round(time.time() - t0, 1))
    # does a dose matched on the match prompts also match on all 48?
    show("matched_kl_48", [kl(sv.rotated(b["seed"]), b["dose"]) for b in band[:args.n_other]])


if __name__ == "__main__":
    main()
