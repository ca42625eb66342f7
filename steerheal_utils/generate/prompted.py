"""02 for the prompt-distillation arm (``data_source: prompt``): the training data is sampled from
the model *prompted* with the persona (``pos_persona`` as system prompt), with no vector and no
steering hooks; the filter, heal and eval that follow are the loop's own.

This is the arm that answers "is it the vector, or just the prompt?": if healing on these rows
moves the axis as far as steer-heal at equal coherence, the vector adds nothing over the prompt.

The rows are saved as the loop's rows are, with the *plain* prompt (no system prompt) in
``prompt`` and ``prompt_text``: 03 scores each completion under the prompt heal will train it
on, and heal (:func:`steerheal_utils.heal.data.encode_rows`) trains on it without the persona,
which is what distils the prompt into the weights. The system prompt used is kept per row
(``system``). There is no dose: no search runs, ``dose`` is null in ``generate.json``
(05 then skips the ``steered`` model and the random band unless the config sets ``dose``).
"""

from __future__ import annotations

import html
import time
from collections import Counter

from .. import axis
from ..chat import persona_system, render_prompt
from ..progress import note
from ..runfolder import atomic_write_json, atomic_write_jsonl
from .dose import collect
from .sampling import permutation, sample, sample_params

SOURCE = "prompt"  # the config value of data_source that selects this module


def run_prompted(ctx, result_type):
    """02_generate with ``data_source: prompt``: collect ``n_keep`` kept rows (at most ``gen_budget``)
    sampled with the persona system prompt, and write ``generated``, an empty ``calibration`` and
    ``generate_summary`` (``dose`` null, ``dose_source`` "prompt", ``system`` the prompt used).

    ``result_type`` is :class:`steerheal_utils.generate.step.GenerateResult` (passed in: this module
    is imported by that one).
    """
    from .step import ROW_KEYS, filter_judge  # the loop's row schema and its 03 judge

    cfg = ctx.cfg
    model, tok = ctx.student(merge=True)
    base, _ = ctx.base()
    system = persona_system(cfg.pos_persona)
    pool = axis.load_prompts(cfg.axis_prompts)  # the axis's pool; default: the shipped dilemmas
    order = permutation(len(pool), ctx.seed)
    params = sample_params(cfg)
    judge = filter_judge(ctx, base, tok)
    n_tok, seconds, calls = 0, 0.0, 0

    def gen(start: int, n: int) -> list[dict]:
        nonlocal n_tok, seconds, calls
        calls += 1
        note(f"collecting with the persona prompt (no vector), batch {calls}")  # the driver's status line
        picks = [order[(start + j) % len(order)] for j in range(n)]
        t = time.time()
        rows = sample(model, tok, [pool[i]["text"] for i in picks], sv=None, dose=0.0, system=system,
                      seed=ctx.seed + 1000 + start, progress=True, **params)
        seconds += time.time() - t
        n_tok += sum(r["n_tokens"] + (not r["truncated"]) for r in rows)
        # prompt_text: the plain prompt, the one 03 scores under and heal trains on
        return [{**r, "pool_index": i, "prompt": pool[i]["text"], "prompt_text": render_prompt(tok, pool[i]["text"]),
                 "system": system, "dose": None} for r, i in zip(rows, picks)]

    t0 = time.time()
    rows = collect(gen, judge, n_keep=cfg.n_keep, budget=cfg.gen_budget, batch_size=cfg.gen_batch_size)
    total = time.time() - t0
    done = []
    for k, r in enumerate(rows):
        p = pool[r["pool_index"]]
        done.append({"id": f"r{ctx.round:02d}-{k:04d}", "round": ctx.round, "prompt_id": p["id"], "prompt": p["text"],
                     **{key: r[key] for key in ROW_KEYS if key in r and key not in ("id", "round", "prompt_id", "prompt")},
                     "system": system})
    atomic_write_jsonl(ctx.artifact("generated"), done)
    atomic_write_jsonl(ctx.artifact("calibration"), [])
    reasons = Counter(r["reason"] for r in rows)
    summary = {
        "round": ctx.round, "dose": None, "dose_source": SOURCE, "round0_dose": None, "data_source": SOURCE, "system": system,
        "dose_unit": None, "dose_flags": [], "dose_flag": "", "dose_warning": None,
        "calibration": None, "calibration_path": [],
        "n_generated": len(rows), "n_kept_02": reasons.get("keep", 0), "reasons_02": dict(reasons),
        "n_truncated": sum(r["truncated"] for r in rows),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / max(1, len(rows)),
        "prompts_used": len({r["pool_index"] for r in rows}), "pool_size": len(pool),
        "layers": [], "positions": None, "halflife": None,
        "seconds": {"calibration": 0.0, "total": round(total, 2), "sampling": round(seconds, 2),
                    "scoring": round(total - seconds, 2)},
        "tokens": {"calibration": 0, "collection": n_tok}, "tokens_per_s": round(n_tok / max(seconds, 1e-9), 1),
    }
    atomic_write_json(ctx.artifact("generate_summary"), summary)
    return result_type(summary, done, None)


def prompted_comparison(ctx, model, tok, prompt: str, system: str) -> str:
    """HTML: ``prompt`` sampled by the student without and with the persona system prompt, same seed."""
    from .compare import _side_by_side

    params = {**sample_params(ctx.cfg), "batch_size": 1}
    side = [sample(model, tok, [prompt], system=s, seed=ctx.seed, **params)[0] for s in (None, system)]
    return (f"<p><i>{html.escape(prompt)}</i></p>"
            + _side_by_side(side, ["no system prompt", f"system: {system}"]))
