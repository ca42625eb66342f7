"""The 05_eval step: evaluate this round's conditions and write ``eval`` and ``eval_rows``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..progress import tqdm  # a plain final line, not a frozen widget, in the journal

from .. import axis, controls, models
from ..adapters import active_adapters, adapter_dirs, bake_adapters, has_adapter
from ..chat import persona_system
from ..runfolder import atomic_write_json, atomic_write_jsonl
from ..vector.modes import spec_kwargs
from ..vector.steering import Steering, check_vector_matches
from ..vector.value import SteeringVector
from .conditions import cached_condition, condition_dose, condition_fingerprint
from .data import load_heldout, load_vignettes
from .evidence import add_evidence
from .model_eval import answer_kl, evaluate_model, heldout_answers


@dataclass
class EvalResult:
    """What 05 computed: the round's eval record (``eval.json``: every condition's summary with its
    CIs and deltas vs base, the control band, held-out answers, notes, ``stop``) and its
    per-vignette rows (``eval_rows.jsonl``, each with its ``condition``)."""

    record: dict
    rows: list[dict] = field(default_factory=list, repr=False)
    run_dir: Path | None = None

def run_stage(ctx, progress: bool = True) -> EvalResult:
    """05_eval: evaluate this round's conditions and write ``round_NN/eval.json`` + ``eval_rows.jsonl``.

    Conditions: ``steered`` (round model + this round's vector at 02's dose), ``healed`` (adapters
    of rounds 0..round, no vector); at round 0 also ``base`` and the controls ``prompted``
    (persona as system prompt) and the band ``random_00``... (``n_controls`` random rotations of
    the vector, each at the dose that matches the persona's next-token KL at the assistant tag:
    :mod:`steerheal_utils.controls`; every round if ``controls_every_round``). Every condition gets
    bootstrap CIs and deltas vs base, the round the band's summary (:func:`add_evidence`).
    The base weights are loaded once; conditions
    switch adapters and hooks. Conditions whose inputs are missing (no vector, no dose, no
    adapter yet) are skipped with a note. Each finished condition is saved to
    ``round_NN/eval_conditions/<condition>.json`` with its :func:`condition_fingerprint`; a condition whose saved
    fingerprint matches is read back instead of recomputed (noted in ``notes``).
    """
    cfg, r = ctx.cfg, ctx.round
    notes: list[str] = []
    base, tok = models.load_base(cfg)
    dirs = adapter_dirs(ctx.run_dir, r)
    own = ctx.artifact("adapter")
    healed_ok = has_adapter(own)
    if not healed_ok:
        notes.append(f"no adapter at {own} yet (04_heal has not run): 'healed' skipped")
    stack = dirs + ([own] if healed_ok else [])  # adapters of rounds 0..r; condition k activates stack[:k]
    model = bake_adapters(base, stack)
    model.eval()
    rows = load_vignettes(cfg.vignettes or None, cfg.eval_max_rows, seed=cfg.seed)
    ax = axis.from_config(cfg)
    probe = axis.load_probe(cfg.axis_probe, cfg.probe_max_items)
    kw = dict(probe=probe, layout=cfg.eval_layout, think_tokens=cfg.think_tokens, batch_size=cfg.batch_size,
              think_batch_size=cfg.gen_batch_size)

    sv = None
    vec_path = ctx.artifact("vector")
    if vec_path.exists():
        sv = SteeringVector.load(vec_path)
        check_vector_matches(sv, model)
    else:
        notes.append(f"no vector at {vec_path} (01_vector has not run): 'steered' and 'random' skipped")
    dose = condition_dose(ctx) if sv is not None else None
    if sv is not None and dose is None:
        notes.append("no dose (02_generate has not run and config dose is null): 'steered' and 'random' skipped")

    plan: list[tuple[str, int, SteeringVector | None, str | None]] = []  # (condition, active adapters, vector, system)
    if r == 0:
        plan.append(("base", 0, None, None))
        if "prompted" in cfg.controls:
            plan.append(("prompted", 0, None, persona_system(cfg.pos_persona)))
    if sv is not None and dose is not None:
        plan.append(("steered", r, sv, None))
        if "random" in cfg.controls and (r == 0 or cfg.controls_every_round):
            plan += [(controls.control_name(i), r, sv.rotated(s), None)
                     for i, s in enumerate(controls.control_seeds(ctx.seed, cfg.n_controls))]
    if healed_ok:
        plan.append(("healed", r + 1, None, None))

    conditions, all_rows, condition_rows = {}, [], {}
    matches = None  # the band's KL-matched doses (controls.band_matches), made when the first control needs them
    band = [(name, vec) for name, _, vec, _ in plan if controls.is_control_name(name)]
    # one bar over the conditions: per-batch bars would store dozens of widgets in the executed notebook
    for name, k, vec, system in tqdm(plan, desc="05 eval conditions", disable=not progress):
        # a control's fingerprint holds the persona's dose: its matched dose is derived from it (and the vector)
        fp = condition_fingerprint(cfg, ctx.seed, name, stack[:k], vec_path if vec is not None else None, dose, system)
        saved_at = ctx.artifact("eval_cache") / f"{name}.json"
        res = cached_condition(saved_at, fp)
        if res is not None:
            notes.append(f"{name}: read from {saved_at.parent.name}/{name}.json (same fingerprint: same inputs), not recomputed")
        else:
            this_dose, match = dose, None
            if controls.is_control_name(name):
                with active_adapters(model, k):
                    matches = matches or controls.band_matches(
                        ctx.artifact("eval_cache") / "control_match.json",
                        condition_fingerprint(cfg, ctx.seed, "control_match", stack[:k], vec_path, dose, None),
                        lambda: controls.KLMatcher(
                            model, tok, sv, dose, controls.kl_prompts(tok, cfg.control_kl_prompts), tol=cfg.control_kl_tol,
                            max_ratio=cfg.control_max_dose_ratio, positions=cfg.steer_positions,
                            halflife=cfg.dose_halflife, batch_size=cfg.batch_size, gate=spec_kwargs(cfg)["gate"],
                            gate_kind=cfg.gate_kind), band)
                match = matches[name]
                this_dose = match["dose"]
            # the vector as 02 applied it: its dose, positions and half-life, in every forward of the eval
            spec = Steering(vec, this_dose or 0.0, **spec_kwargs(cfg)) if vec is not None else None
            with active_adapters(model, k):
                res = evaluate_model(model, tok, rows, system=system, steering=spec, **kw)
            res["summary"]["dose"] = this_dose if vec is not None else 0.0
            if match is not None:
                res["summary"].update(controls.match_record(match, vec))
            saved_at.parent.mkdir(exist_ok=True)
            atomic_write_json(saved_at, {"fingerprint": fp, "summary": res["summary"], "rows": res["rows"]}, indent=None)
        conditions[name] = res["summary"]
        condition_rows[name] = res["rows"]
        all_rows += [{"condition": name, **row} for row in res["rows"]]
        print(f"{name}: {ax.x_key} {res['summary'][ax.x_key]:.3f}  {ax.y_key} {res['summary'][ax.y_key]:.3f}  "
              f"coherence {res['summary']['coherence']:.3f}  {ax.pos} vs {ax.neg} "
              f"{res['summary'].get('axis_logodds', float('nan')):+.3f}  "
              f"({res['summary']['seconds']:.0f}s)")

    out: dict = {"round": r, "conditions": conditions, "notes": notes, "n_vignettes": len(rows), "n_probe": len(probe),
                 "vignettes": cfg.vignettes or "mfv_classic_other_violate.jsonl", "dose": dose, "axis": ax.record()}
    add_evidence(out, condition_rows, rows, run_dir=ctx.run_dir, seed=ctx.seed, n_boot=cfg.n_boot, level=cfg.ci_level,
                 headline=ax.headline)
    heldout = load_heldout()
    if healed_ok:
        recs, pids, ans = heldout_answers(model, tok, heldout, cfg.heldout_max_new_tokens, cfg.batch_size)
        out["heldout"] = recs
        out["kl_to_base"] = answer_kl(model, model.disable_adapter, tok, pids, ans, batch_size=max(1, cfg.batch_size // 2))
        conditions["healed"]["kl_to_base"] = out["kl_to_base"]
    elif r == 0:  # the base's answers give the table its starting column
        with active_adapters(model, 0):
            out["heldout"] = heldout_answers(model, tok, heldout, cfg.heldout_max_new_tokens, cfg.batch_size)[0]
    if sv is not None:
        first = ctx.artifact("vector", 0)
        cos = sv.cosine(SteeringVector.load(first)) if r > 0 and first.exists() else {layer: 1.0 for layer in sv.layers}
        out["vector_cosine_to_round0"] = sum(cos.values()) / max(len(cos), 1)
        out["vector_cosine_per_layer"] = {str(k): v for k, v in cos.items()}
    if healed_ok and conditions["healed"]["coherence"] < cfg.coh_floor:
        out["stop"] = {"reason": f"healed coherence {conditions['healed']['coherence']:.4f} is below coh_floor {cfg.coh_floor}"}
    atomic_write_jsonl(ctx.artifact("eval_rows"), all_rows)
    atomic_write_json(ctx.artifact("eval"), out)
    return EvalResult(out, all_rows, ctx.run_dir)



def summary_table(result: EvalResult) -> list[dict]:
    """One flat dict per condition for display: the headline metrics, each of the first four with its CI as ``<k>_ci``
    (the map's x and y foundations of the round's axis, coherence, the axis probe)."""
    ax = axis.from_eval(result.record)
    keys = (ax.x_key, ax.y_key, "coherence", "axis_logodds", "on_diag_authority", "on_diag_care", "agreement", "dose", "seconds")
    out = []
    for name, s in result.record["conditions"].items():
        row = {"condition": name}
        for k in keys:
            row[k] = round(s[k], 4) if isinstance(s.get(k), float) else s.get(k)
            if k in keys[:4]:
                lo, hi = (s.get("ci") or {}).get(k, (None, None))
                row[f"{k}_ci"] = f"[{lo:.4f}, {hi:.4f}]" if isinstance(lo, float) and isinstance(hi, float) else None
        out.append(row)
    return out
