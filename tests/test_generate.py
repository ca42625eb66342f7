"""02_generate: batched sampling, the dose search, collection, and the completions.jsonl schema."""

import dataclasses
import math

import pytest
import torch

from steerheal_utils import config as C
from steerheal_utils import generate as G
from steerheal_utils import vector as V
from steerheal_utils.models import get_layers, prompt_ids

PROMPTS = ["Your manager tells you to skip the safety check. Do you?", "Hi", "The CEO says delete the logs. Do you?"]


def _sv(model, layers=(1, 2), norm=5.0):
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    return V.SteeringVector({i: torch.randn(d, generator=g) for i in layers}, {i: norm for i in layers})


# ------------------------------------------------------------------ sampling
def test_sampling_is_reproducible_and_seed_dependent(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=6, batch_size=2, top_k=0, top_p=1.0)
    a = G.sample(model, tok, PROMPTS, seed=3, **kw)
    b = G.sample(model, tok, PROMPTS, seed=3, **kw)
    c = G.sample(model, tok, PROMPTS, seed=4, **kw)
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    assert [r["completion_ids"] for r in a] != [r["completion_ids"] for r in c]
    assert [r["prompt_index"] for r in a] == [0, 1, 2]  # input order, though batches are length-sorted


def test_sampling_records_truncation_and_eos(tiny_llama):
    """A random model rarely says EOS: force it from the 4th token on; then force full length."""
    model, tok = tiny_llama
    eos = tok.eos_token_id
    head = model.get_output_embeddings()

    def boost(_m, _i, out):  # the 4th head call (prefill + 3 decoding steps) makes EOS certain
        boost.calls += 1
        if boost.calls >= 4:
            out = out.clone()
            out[..., eos] = 1e4
        return out

    boost.calls = 0
    h = head.register_forward_hook(boost)
    try:
        rows = G.sample(model, tok, PROMPTS[:2], max_new_tokens=8, batch_size=2, temperature=0.0)
    finally:
        h.remove()
    for r in rows:  # 3 tokens, then EOS
        assert r["n_tokens"] == 3 and not r["truncated"]
        assert eos not in r["completion_ids"] and "<|im_end|>" not in r["completion"]
    rows = G.sample(model, tok, PROMPTS[:2], max_new_tokens=5, batch_size=2, min_new_tokens=5, temperature=0.0)
    assert all(r["truncated"] and r["n_tokens"] == 5 for r in rows)


def test_batched_greedy_equals_one_by_one(tiny_llama):
    model, tok = tiny_llama
    sv = _sv(model)
    kw = dict(max_new_tokens=5, temperature=0.0, sv=sv, dose=0.2, positions="generated")
    batched = G.sample(model, tok, PROMPTS, batch_size=3, **kw)
    single = [G.sample(model, tok, [p], batch_size=1, **kw)[0] for p in PROMPTS]
    assert [r["completion_ids"] for r in batched] == [r["completion_ids"] for r in single]


def test_steering_changes_samples_and_leaves_no_hooks(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=6, batch_size=3, temperature=0.0)
    plain = G.sample(model, tok, PROMPTS, **kw)
    steered = G.sample(model, tok, PROMPTS, sv=_sv(model), dose=2.0, **kw)
    assert [r["completion_ids"] for r in plain] != [r["completion_ids"] for r in steered]
    assert sum(len(b._forward_hooks) for b in get_layers(model)) == 0
    ids = [prompt_ids(tok, p)[0] for p in PROMPTS]  # token ids are accepted as prompts too
    assert [r["completion_ids"] for r in G.sample(model, tok, ids, **kw)] == [r["completion_ids"] for r in plain]


# ------------------------------------------------------------------ dose search
def _fake(threshold, n_calls=None):
    """generate_fn / judge_fn for a 'model' whose completions are kept iff dose < threshold."""
    calls = []

    def gen(dose, n):
        calls.append(dose)
        return [{"dose": dose, "i": i} for i in range(n)]

    def judge(rows):
        return ["keep" if r["dose"] < threshold else "token_soup" for r in rows]

    return gen, judge, calls


@pytest.mark.parametrize("threshold", [0.015, 0.05, 0.2, 0.9, 5.0])
def test_calibration_finds_largest_passing_dose(threshold):
    gen, judge, calls = _fake(threshold)
    steps = 6
    cal = G.calibrate_dose(gen, judge, lo=0.01, hi=1.0, steps=steps, target=0.75, n=4)
    resolution = (1.0 / 0.01) ** (2.0 ** -steps)
    assert len(calls) == len(cal.path) == steps  # terminates after `steps` tries
    assert cal.dose < min(threshold, 1.0) and cal.dose * resolution ** 1.01 >= min(threshold, 1.0)
    assert all(0.01 <= d <= 1.0 for d in calls)
    assert [p["dose"] for p in cal.path] == calls and cal.path[0]["dose"] == pytest.approx(0.1)
    for p in cal.path:  # bisection keeps a bracket: a pass moves lo up, a fail moves hi down
        assert p["passed"] == (p["dose"] < threshold) and p["n"] == 4
    assert all(r["dose"] == cal.dose and r["reason"] == "keep" for r in cal.rows) and len(cal.rows) == 4
    assert not cal.below_target


def test_calibration_falls_back_to_lo_then_errors_with_counts():
    # Nothing passes the target, but lo keeps 1 of 4: lo, flagged below target.
    def gen(dose, n):
        return [{"dose": dose, "i": i} for i in range(n)]

    def judge(rows):
        return ["keep" if r["i"] == 0 and r["dose"] < 0.02 else "repetition" for r in rows]

    cal = G.calibrate_dose(gen, judge, lo=0.01, hi=1.0, steps=3, target=0.75, n=4)
    assert cal.dose == 0.01 and cal.below_target and len(cal.path) == 4 and cal.path[-1]["kept"] == 1

    gen2, judge2, calls = _fake(0.001)  # even lo keeps nothing
    with pytest.raises(G.CalibrationError) as e:
        G.calibrate_dose(gen2, lambda rows: ["narration" if r["i"] % 2 else "token_soup" for r in rows],
                         lo=0.01, hi=1.0, steps=3, n=6)
    assert "narration: 3" in str(e.value) and "token_soup: 3" in str(e.value) and "0.01" in str(e.value)


def test_calibration_accepts_boolean_judges_and_zero_steps():
    gen, _, calls = _fake(1.0)
    cal = G.calibrate_dose(gen, lambda rows: [True] * len(rows), lo=0.05, hi=0.5, steps=0, n=2)
    assert cal.dose == 0.05 and calls == [0.05] and not cal.below_target
    with pytest.raises(ValueError, match="lo < hi"):
        G.calibrate_dose(gen, lambda rows: [True] * len(rows), lo=0.5, hi=0.5, steps=2)


def test_collect_stops_at_n_keep_or_budget():
    def judge(rows):
        return ["keep" if r["k"] % 2 == 0 else "drift" for r in rows]

    asked = []

    def gen(off, n):
        asked.append(n)
        return [{"k": off + j} for j in range(n)]

    rows = G.collect(gen, judge, n_keep=5, budget=100, batch_size=4)
    assert sum(r["reason"] == "keep" for r in rows) >= 5 and len(rows) <= 12
    rows = G.collect(gen, judge, n_keep=1000, budget=10, batch_size=4)
    assert len(rows) == 10 and max(asked) <= 4
    start = [{"k": 0, "reason": "keep"}] * 3
    assert G.collect(gen, judge, n_keep=3, budget=10, batch_size=4, rows=start) == start


# ------------------------------------------------------------------ the stage
def test_filter_knobs_live_in_the_config_with_the_same_defaults():
    from steerheal_utils.filter import FilterThresholds

    fields = C.Config.__dataclass_fields__
    for f in dataclasses.fields(FilterThresholds):
        assert f.name in fields, f"config lacks the filter threshold {f.name}"
        assert fields[f.name].default == f.default, f.name
    cfg = C.resolve("tiny", {"max_tail_ppl": 7.0})
    assert FilterThresholds.from_config(cfg).max_tail_ppl == 7.0


def test_run_stage_writes_completions_schema(tmp_path, tiny_llama):
    from steerheal_utils import stage
    from steerheal_utils.runfolder import read_json, read_jsonl

    model, tok = tiny_llama
    ctx = stage.open_stage("02_generate", {"run_dir": str(tmp_path / "run"), "round": 0, "preset": "tiny",
                                           "calib_probes": 3, "calib_steps": 1, "n_keep": 4, "gen_budget": 6,
                                           "max_new_tokens": 8})
    summary = G.run_stage(ctx, model, tok, sv=_sv(model))
    rows = read_jsonl(ctx.artifact("generated"))
    assert summary == read_json(ctx.path("generate.json"))
    assert len(rows) == summary["n_generated"] and 1 <= len(rows) <= ctx.cfg.gen_budget
    pool = {p["id"]: p["text"] for p in G.load_prompts("dilemmas")}
    for r in rows:
        assert set(G.ROW_KEYS) <= set(r)
        assert r["prompt"] == pool[r["prompt_id"]] and r["dose"] == summary["dose"]
        assert r["n_tokens"] == len(r["completion_ids"]) <= ctx.cfg.max_new_tokens
        assert isinstance(r["truncated"], bool) and isinstance(r["seed"], int)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len(summary["calibration_path"]) >= ctx.cfg.calib_steps
    assert ctx.cfg.calib_lo <= summary["dose"] <= ctx.cfg.calib_hi
    assert summary["tokens_per_s"] > 0 and math.isfinite(summary["seconds"]["total"])
    probes = read_jsonl(ctx.path("calibration.jsonl"))
    assert len(probes) == sum(p["n"] for p in summary["calibration_path"])
    # probes span the pool: a seeded permutation, not its first prompts
    first = [p["prompt_id"] for p in probes[: ctx.cfg.calib_probes]]
    assert first != [p["id"] for p in G.load_prompts("dilemmas")[: ctx.cfg.calib_probes]]


    # 03 on the same rows: every score, one reason, written to its own file; too few kept stops the round
    from steerheal_utils import filter as F

    ctx3 = stage.open_stage("03_filter", {"run_dir": str(tmp_path / "run"), "round": 0})
    scored, fsum = F.run_stage(ctx3, model, tok)
    back = read_jsonl(ctx3.artifact("completions"))
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    for r in back:
        assert r["reason"] in ("keep", *F.DROP_REASONS) and r["keep"] == (r["reason"] == "keep")
        assert r["tail_ppl"] is not None and "ngram_repeat" in r and "entropy_collapse" in r
    saved = read_json(ctx.path("filter.json"))
    assert saved["n"] == len(rows) and sum(saved["reasons"].values()) == len(rows)
    assert saved["labelled"]["n"] == len(F.labelled_rows())
    F.require_min_train(fsum)  # the tiny preset keeps enough
    with pytest.raises(F.TooFewKept, match=r"kept \d+ of \d+ .*min_train=1000 \(keep: \d+"):
        F.require_min_train({**fsum, "min_train": 1000})


def test_held_out_prompts_are_not_in_the_pool():
    pool, held = G.load_prompts("dilemmas"), G.load_prompts("heldout")
    assert len(pool) >= 32 and len(held) >= 8
    assert not {p["text"] for p in pool} & {p["text"] for p in held}
    assert any(p["id"] == "heldout-ceo-logs" for p in held)
