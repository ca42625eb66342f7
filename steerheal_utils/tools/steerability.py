"""``python -m steerheal_utils steerability RUN_OR_CONFIG``: the steerability sweep of a run folder's
round-0 vector (or of a fresh one read from the base model), written as ``steerability.json`` and
``steerability.csv`` into the run folder. The sweep itself: :mod:`steerheal_utils.vector.steerability`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as C
from .. import contract
from ..vector.steerability import SteerabilityError, dose_grid, figure_png, sweep, table_csv


# ------------------------------------------------------------------ the run folder
def run_steerability(target: str | Path, *, overrides: dict | None = None, n_doses: int = 6, lo: float | None = None,
                     hi: float | None = None, out: Path | str | None = None, log=print) -> dict:
    """The sweep of a run folder's round-0 vector (``target`` a run folder), or of a fresh vector read
    from the base model (``target`` a config YAML or a preset name; then ``out`` is required).

    Doses: ``n_doses`` log-spaced from ``lo`` (default ``calib_lo``) to ``hi`` (default
    ``2 * calib_hi``, past where 02's search sees the text break). Sizes from the config
    (``eval_max_rows``, ``probe_max_items``, ``n_controls``, ``control_kl_prompts``; ``--set``
    reduces them). Writes ``steerability.json`` and ``steerability.csv`` into ``out`` (default:
    the run folder) and returns the record.
    """
    from .. import models
    from ..evaluate.data import load_probe, load_vignettes
    from ..runfolder import atomic_write_json, atomic_write_text, round_config
    from ..vector.value import SteeringVector

    target = Path(str(target))
    vec_path = contract.path(target, 0, "vector") if target.is_dir() else None
    if target.is_dir():
        cfg = round_config(target, 0)
        cfg = C.validate({**cfg.to_dict(), **(overrides or {})}) if overrides else cfg
    elif target.suffix in (".yaml", ".yml"):
        cfg = C.validate({**C.load_config(target).to_dict(), **(overrides or {})})
    else:
        cfg = C.resolve(str(target), overrides or {})
    out = Path(out) if out is not None else (target if target.is_dir() else None)
    if out is None:
        raise SteerabilityError("steerability of a config or preset: give --out DIR for its files")
    model, tok = models.load_base(cfg)
    model.eval()
    if vec_path is not None and vec_path.exists():
        sv, source = SteeringVector.load(vec_path), str(vec_path)
    else:
        from ..models import n_layers
        from ..vector.extract import extract_vector, load_contexts

        layers = cfg.steered_layers(n_layers(model))
        contexts = load_contexts(cfg.n_contexts, seed=cfg.seed)
        sv, _ = extract_vector(model, tok, [c["text"] for c in contexts], cfg.pos_persona, cfg.neg_persona, layers,
                               batch_size=cfg.batch_size, meta={"model": cfg.model, "round": 0, "layers": layers})
        source = "read from the base model (01's recipe; not saved)"
    lo = cfg.calib_lo if lo is None else lo
    hi = 2 * cfg.calib_hi if hi is None else hi
    rows = load_vignettes(cfg.vignettes or None, cfg.eval_max_rows, seed=cfg.seed)
    probe = load_probe(cfg.probe_max_items)
    rec = sweep(model, tok, sv, dose_grid(lo, hi, n_doses), rows=rows, probe=probe, seed=cfg.seed,
                n_controls=cfg.n_controls, kl_prompts=cfg.control_kl_prompts, tol=cfg.control_kl_tol,
                max_ratio=cfg.control_max_dose_ratio, positions=cfg.steer_positions, halflife=cfg.dose_halflife,
                layout=cfg.eval_layout, batch_size=cfg.batch_size, n_boot=cfg.n_boot, level=cfg.ci_level,
                coh_floor=cfg.coh_floor, log=log)
    rec.update({"vector": source, "layers": sv.layers, "model": cfg.model, "seed": cfg.seed,
                "config": {k: getattr(cfg, k) for k in ("eval_max_rows", "probe_max_items", "n_controls",
                                                        "control_kl_prompts", "steer_positions", "dose_halflife")}})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / contract.RUN_FILES["steerability"][0], rec)
    atomic_write_text(out / contract.RUN_FILES["steerability_table"][0], table_csv(rec["table"]))
    r = rec["recommended"]
    log(f"steerability: recommended dose {r['dose']} (range {r['range']}; coherence breaks at {r['breaks_at']}): "
        f"{r['reason']}")
    return rec


# ------------------------------------------------------------------ command line
def add_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RUN_OR_CONFIG",
                   help="a run folder (its round-0 vector and config), a config YAML, or a preset name")
    p.add_argument("--doses", type=int, default=6, help="number of log-spaced doses (default 6)")
    p.add_argument("--lo", type=float, default=None, help="lowest dose (default: the config's calib_lo)")
    p.add_argument("--hi", type=float, default=None, help="highest dose (default: 2 x the config's calib_hi)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for the sweep only (e.g. eval_max_rows=24 n_controls=3)")
    p.add_argument("--out", default=None, help="folder for steerability.json/.csv (default: the run folder)")
    p.add_argument("--png", default=None, help="also write the figure as a PNG here")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from ..runfolder import atomic_write_bytes

    rec = run_steerability(args.target, overrides=C.parse_overrides(args.set) if args.set else None,
                           n_doses=args.doses, lo=args.lo, hi=args.hi, out=args.out)
    if args.png:
        atomic_write_bytes(Path(args.png), figure_png(rec))
    return 0
