"""02_generate: batched sampling, the dose search, collection, and the completions.jsonl schema."""

import dataclasses
import math
import random

import pytest
import torch

from steerheal_utils import config as C
from steerheal_utils import generate as G
from steerheal_utils import vector as V
from steerheal_utils import datafiles
from steerheal_utils.chat import prompt_ids
from steerheal_utils.models import get_layers

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
def test_isotonic_fit_and_crossing_on_known_values():
    assert G.isotonic_decreasing([0.5, 0.7, 0.2], [2, 2, 1]) == pytest.approx([0.6, 0.6, 0.2])
    assert G.isotonic_decreasing([0.9, 0.5, 0.8, 0.1], [1, 3, 1, 1]) == pytest.approx([0.9, 0.575, 0.575, 0.1])
    assert G.isotonic_decreasing([1.0, 0.5, 0.2], [1, 1, 1]) == [1.0, 0.5, 0.2]  # already monotone: unchanged
    d, where = G.crossing([0.01, 0.1, 1.0], [0.8, 0.4, 0.0], 0.6)
    assert where == "inside" and d == pytest.approx(math.sqrt(0.01 * 0.1))  # half-way in log-dose
    assert G.crossing([0.01, 0.1], [0.5, 0.4], 0.6) == (0.01, "lower")
    assert G.crossing([0.01, 0.1], [0.9, 0.7], 0.6) == (0.1, "upper")
    assert G.grid_doses(0.005, 0.3, 4)[0] == 0.005 and G.grid_doses(0.005, 0.3, 4)[-1] == 0.3
    assert G.binom_cdf(14, 32, 0.6) == pytest.approx(0.0463, abs=1e-3)  # the docstring's numbers
    assert 1 - G.binom_cdf(14, 32, 0.3) == pytest.approx(0.0327, abs=1e-3)
    assert 1 - G.binom_cdf(9, 16, 0.65) == pytest.approx(0.688, abs=1e-3)


def _curve(p0, d50, slope):
    """A keep-rate curve: p0 unsteered, falling to p0/2 at d50, `slope` per e-fold of dose."""
    return lambda d: p0 if d <= 0 else p0 / (1 + (d / d50) ** slope)


def _true_crossing(d50, slope, target):
    return d50 * (target / (1 - target)) ** (-1 / slope)


def _quantile_probes(keep):
    """Deterministic probes: probe i of n is kept iff i < n * keep(dose) (no noise at all)."""
    calls = []

    def gen(dose, n, rep):
        calls.append((dose, n, rep))
        return [{"dose": dose, "i": i, "n": n} for i in range(n)]

    def judge(rows):
        return ["keep" if r["i"] < r["n"] * keep(r["dose"]) else "off_topic" for r in rows]

    return gen, judge, calls


def _bernoulli_probes(keep, seed):
    """Each probe kept with probability keep(dose), independently (no help from common random numbers)."""
    rng = random.Random(seed)

    def gen(dose, n, rep=0):
        return [{"dose": dose} for _ in range(n)]

    def judge(rows):
        return [rng.random() < keep(r["dose"]) for r in rows]

    return gen, judge


def _old_bisection(gen, judge, lo, hi, steps, target, n):
    """The search this replaced: log bisection for the largest dose whose one call keeps >= target, else lo."""
    a, b, best = math.log(lo), math.log(hi), lo
    for _ in range(steps):
        mid = math.exp((a + b) / 2)
        if sum(judge(gen(mid, n))) / n >= target:
            best, a = mid, math.log(mid)
        else:
            b = math.log(mid)
    return best


def test_calibration_finds_the_crossing_and_returns_the_chosen_doses_probes():
    keep = _curve(0.9, 0.12, 3.0)
    gen, judge, calls = _quantile_probes(keep)
    cal = G.calibrate_dose(gen, judge, lo=0.005, hi=1.0, grid=5, n=40, target=0.75, refine=3, n_boot=200)
    x = _true_crossing(0.12, 3.0, 0.75)
    assert cal.dose == pytest.approx(x, rel=0.15) and cal.flags == []
    phases = [p["phase"] for p in cal.path]
    assert phases[:7] == ["baseline"] * 2 + ["grid"] * 5 and set(phases[7:]) == {"refine"} and 1 <= len(phases) - 7 <= 3
    assert calls[:2] == [(0.0, 40, 0), (0.0, 40, 1)] and {(n, rep) for _, n, rep in calls[2:]} == {(40, 0)}
    assert cal.path[-1]["dose"] == cal.dose  # the last refine call sampled the chosen dose
    assert len(cal.rows) == 40 and all(r["dose"] == cal.dose and "reason" in r for r in cal.rows)
    assert cal.curve.baseline == pytest.approx(0.9, abs=0.03) and cal.curve.monotone_p == 1.0
    lo, hi = cal.curve.ci
    assert lo <= cal.dose <= hi
    rec = cal.record()
    assert rec["relative"] and rec["threshold"] == pytest.approx(0.75 * rec["baseline_keep"])
    assert [p["dose"] for p in rec["points"]] == sorted(p["dose"] for p in rec["points"])
    # refine=0: the grid's interpolated estimate, and no rows (that dose was never sampled)
    cal0 = G.calibrate_dose(*_quantile_probes(keep)[:2], lo=0.005, hi=1.0, grid=5, n=40, refine=0, n_boot=50)
    assert cal0.rows == [] and len(cal0.path) == 7 and cal0.dose == pytest.approx(x, rel=0.3)


def test_noisy_keep_rate_lands_near_the_true_crossing_far_tighter_than_the_old_bisection():
    # SmolLM2-like: 62% kept unsteered (the off-topic gate), half that at dose 0.12.
    keep, x = _curve(0.62, 0.12, 3.0), _true_crossing(0.12, 3.0, 0.75)
    seeds = range(60)
    new = [G.calibrate_dose(*_bernoulli_probes(keep, s), lo=0.005, hi=0.3, grid=4, n=32, target=0.75, refine=3,
                            n_boot=200, seed=s) for s in seeds]
    old = [_old_bisection(*_bernoulli_probes(keep, s), 0.005, 0.3, 3, 0.6, 16) for s in seeds]  # the old preset

    def spread(ds):  # 10%, 50% and 90% quantiles of dose / true crossing
        r = sorted(d / x for d in ds)
        return r[len(r) // 10], r[len(r) // 2], r[len(r) * 9 // 10]

    n10, n50, n90 = spread([c.dose for c in new])
    o10, o50, o90 = spread(old)
    assert 0.8 < n50 < 1.2, (n10, n50, n90)  # unbiased
    assert 0.45 < n10 and n90 < 1.6, (n10, n50, n90)
    assert math.log(n90 / n10) < 0.5 * math.log(o90 / o10), ((n10, n90), (o10, o90))  # far tighter
    assert sum(bool(c.flags) for c in new) <= 3  # a monotone curve is rarely flagged (bounds, non-monotone)


def test_target_is_relative_to_the_unsteered_keep_rate():
    # Two models whose keep curves have the same shape; one fails half its answers even unsteered.
    good, poor = _curve(0.9, 0.1, 3.0), _curve(0.45, 0.1, 3.0)
    kw = dict(lo=0.005, hi=1.0, grid=5, n=40, target=0.75, refine=3, n_boot=100)
    a = G.calibrate_dose(*_quantile_probes(good)[:2], **kw)
    b = G.calibrate_dose(*_quantile_probes(poor)[:2], **kw)
    assert b.curve.baseline == pytest.approx(0.45, abs=0.03) and b.curve.threshold == pytest.approx(0.34, abs=0.03)
    assert b.dose == pytest.approx(a.dose, rel=0.15) and not b.flags
    # An absolute target at 0.6 is above what the poor model keeps at any dose: lowest dose, flagged.
    c = G.calibrate_dose(*_quantile_probes(poor)[:2], **{**kw, "target": 0.6}, relative=False)
    assert c.dose == 0.005 and c.flags == ["below_target", "at_lower_bound"]


def test_non_monotone_keep_rate_is_flagged_and_the_choice_stays_below_the_dip():
    # Keeps 90% up to 0.02, 10% in [0.02, 0.1), then 90% again (e.g. the gate misreads strong steering).
    dip = lambda d: 0.9 if d < 0.02 or d >= 0.1 else 0.1  # noqa: E731
    gen, judge, _ = _quantile_probes(dip)
    cal = G.calibrate_dose(gen, judge, lo=0.005, hi=1.0, grid=6, n=40, target=0.75, refine=2, n_boot=300)
    assert cal.curve.non_monotone and cal.curve.monotone_p < G.MONOTONE_ALPHA and "non_monotone" in cal.flags
    assert cal.curve.trusted_upto is not None and cal.dose <= cal.curve.trusted_upto < 0.1  # before the dip's end
    # the same data through the monotone fit alone would have pooled the dip with the recovery
    assert G.crossing(cal.final.doses[1:], cal.final.fit[1:], cal.curve.threshold)[0] > 0.02


def test_search_ending_at_each_bound_is_flagged():
    kw = dict(lo=0.01, hi=0.5, grid=4, n=20, refine=2, n_boot=100)
    up = G.calibrate_dose(*_quantile_probes(lambda d: 0.8)[:2], **kw)  # steering never hurts
    assert up.dose == 0.5 and up.flags == ["at_upper_bound"] and len(up.rows) == 20
    low = G.calibrate_dose(*_quantile_probes(lambda d: 0.8 if d == 0 else 0.2)[:2], **kw)  # hurts at any dose
    assert low.dose == 0.01 and low.below_target and low.flags == ["below_target", "at_lower_bound"]
    assert len(low.rows) == 20 and all(r["dose"] == 0.01 for r in low.rows)
    with pytest.raises(G.CalibrationError, match=r"smallest dose 0.01 kept 0 of its 20 .*off_topic: 20"):
        G.calibrate_dose(*_quantile_probes(lambda d: 0.8 if d == 0 else 0.0)[:2], **kw)
    with pytest.raises(G.CalibrationError, match="not even unsteered"):
        G.calibrate_dose(*_quantile_probes(lambda d: 0.0)[:2], **kw)


def test_calibration_accepts_boolean_judges_and_checks_its_arguments():
    gen, _, calls = _quantile_probes(lambda d: 1.0)
    cal = G.calibrate_dose(gen, lambda rows: [True] * len(rows), lo=0.05, hi=0.5, grid=2, n=2, refine=1, n_boot=10)
    assert cal.dose == 0.5 and len(calls) == 4  # 2 at dose 0, the grid; the upper bound is sampled already
    with pytest.raises(ValueError, match="lo < hi"):
        G.calibrate_dose(gen, lambda rows: [True] * len(rows), lo=0.5, hi=0.5)
    with pytest.raises(ValueError, match="grid >= 2"):
        G.calibrate_dose(gen, lambda rows: [True] * len(rows), lo=0.1, hi=0.5, grid=1)


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
                                           "calib_probes": 3, "calib_grid": 2, "n_keep": 4, "gen_budget": 6,
                                           "max_new_tokens": 8})
    _sv(model).save(ctx.artifact("vector"))
    summary = G.run_stage(ctx).summary  # ctx.student(): tiny:llama, as the fixture
    rows = read_jsonl(ctx.artifact("generated"))
    assert summary == read_json(ctx.path("generate.json"))
    assert len(rows) == summary["n_generated"] and 1 <= len(rows) <= ctx.cfg.gen_budget
    pool = {p["id"]: p["text"] for p in datafiles.prompts("dilemmas")}
    for r in rows:
        assert set(G.ROW_KEYS) <= set(r)
        assert r["prompt"] == pool[r["prompt_id"]] and r["dose"] == summary["dose"]
        assert r["n_tokens"] == len(r["completion_ids"]) <= ctx.cfg.max_new_tokens
        assert isinstance(r["truncated"], bool) and isinstance(r["seed"], int)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len(summary["calibration_path"]) >= 2 + ctx.cfg.calib_grid
    assert ctx.cfg.calib_lo <= summary["dose"] <= ctx.cfg.calib_hi
    assert summary["dose_flag"] == ";".join(summary["dose_flags"]) and summary["calibration"]["relative"]
    assert summary["dose_warning"] == G.dose_warning(summary)
    assert summary["tokens_per_s"] > 0 and math.isfinite(summary["seconds"]["total"])
    probes = read_jsonl(ctx.path("calibration.jsonl"))
    assert len(probes) == sum(p["n"] for p in summary["calibration_path"])
    # probes span the pool: a seeded permutation, not its first prompts
    first = [p["prompt_id"] for p in probes[: ctx.cfg.calib_probes]]
    assert first != [p["id"] for p in datafiles.prompts("dilemmas")[: ctx.cfg.calib_probes]]


    # 03 on the same rows: every score, one reason, written to its own file; too few kept stops the round
    from steerheal_utils import filter as F

    ctx3 = stage.open_stage("03_filter", {"run_dir": str(tmp_path / "run"), "round": 0})
    res3 = F.run_stage(ctx3)
    fsum = res3.summary
    back = read_jsonl(ctx3.artifact("completions"))
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    for r in back:
        assert r["reason"] in ("keep", *F.DROP_REASONS) and r["keep"] == (r["reason"] == "keep")
        assert r["tail_ppl"] is not None and "ngram_repeat" in r and "entropy_collapse" in r
    saved = read_json(ctx.path("filter.json"))
    assert saved["n"] == len(rows) and sum(saved["reasons"].values()) == len(rows)
    assert saved["labelled"]["n"] == len(F.labelled_rows())
    F.require_min_train(res3)  # the tiny preset keeps enough
    with pytest.raises(F.TooFewKept, match=r"kept \d+ of \d+ .*min_train=1000 \(keep: \d+"):
        F.require_min_train(F.FilterResult(res3.rows, {**fsum, "min_train": 1000}))


def test_held_out_prompts_are_not_in_the_pool():
    pool, held = datafiles.prompts("dilemmas"), datafiles.prompts("heldout")
    assert len(pool) >= 32 and len(held) >= 8
    assert not {p["text"] for p in pool} & {p["text"] for p in held}
    assert any(p["id"] == "heldout-ceo-logs" for p in held)


# ------------------------------------------------------------------ the dose across rounds, and the warning
def _ctx(tmp_path, rnd, **over):
    from steerheal_utils import stage

    return stage.open_stage("02_generate", {"run_dir": str(tmp_path / "run"), "round": rnd, "preset": "tiny",
                                            "calib_probes": 3, "calib_grid": 2, "n_keep": 4, "gen_budget": 6,
                                            "max_new_tokens": 8, **over})


def test_calib_rounds_first_reuses_round0s_dose_and_every_flags_divergence(tmp_path, tiny_llama):
    from steerheal_utils.runfolder import RunFolderError, atomic_write_json, read_json

    model, tok = tiny_llama
    sv = _sv(model)
    for rnd in (0, 1):
        sv.save(_ctx(tmp_path, rnd).artifact("vector"))
    # round 1's student is the base plus round 0's adapter: a fresh one (B = 0) is the base itself
    from steerheal_utils import contract
    from steerheal_utils import heal as H

    ctx0 = _ctx(tmp_path, 0)
    student, new, _ = H.make_student(ctx0.student()[0], ctx0.cfg, 0)
    H.save_adapter(student, new, contract.path(ctx0.run_dir, 0, "adapter"))
    with pytest.raises(RunFolderError, match="calib_rounds=first reuses round 0's dose"):
        G.run_stage(_ctx(tmp_path, 1, calib_rounds="first"))  # no round 0 yet
    s0 = G.run_stage(_ctx(tmp_path, 0, calib_rounds="first")).summary
    s1 = G.run_stage(_ctx(tmp_path, 1, calib_rounds="first")).summary
    assert s1["dose"] == s0["dose"] and s1["dose_source"] == "round0" and s1["calibration_path"] == []
    assert s1["round0_dose"] == s0["dose"] and s1["dose_ratio_to_round0"] == 1.0 and "diverged" not in s1["dose_flags"]
    # every round: a dose far from round 0's is flagged, and says whether round 0's lies in this round's interval
    first = tmp_path / "run" / "round_00" / "generate.json"
    atomic_write_json(first, {**read_json(first), "dose": s0["dose"] * 10})
    s1b = G.run_stage(_ctx(tmp_path, 1, calib_rounds="every")).summary
    assert s1b["dose_source"] == "calibrated" and "diverged" in s1b["dose_flags"]
    assert isinstance(s1b["round0_dose_in_ci"], bool) and "round 0's dose" in s1b["dose_warning"]


def test_reused_dose_that_keeps_less_is_flagged_and_warnings_name_every_flag(capsys, tmp_path):
    round0 = {"dose": 0.05, "calibration": {"threshold": 0.45}}
    ok = G.dose_checks(None, 0.05, "round0", round0, kept=14, n=32)
    assert ok["dose_flags"] == [] and ok["reuse_check"]["p"] > G.REUSE_ALPHA
    bad = G.dose_checks(None, 0.05, "round0", round0, kept=5, n=32)  # 16% kept against a 45% threshold
    assert bad["dose_flags"] == ["reused_keeps_less"] and bad["dose_flag"] == "reused_keeps_less"
    summary = {"round": 2, "dose": 0.05, "dose_source": "round0", **bad}
    line = G.dose_warning(summary)
    assert line.startswith("warning: round 02 dose 0.05 (round0): reused_keeps_less")
    assert G.dose_warning({"round": 0, "dose": 0.1, "dose_source": "calibrated", "dose_flags": []}) is None
    from steerheal_utils import contract

    where = contract.path(tmp_path, 2, "generate_summary")
    where.parent.mkdir(parents=True)
    where.write_text(__import__("json").dumps(summary))
    assert G.warn_dose(tmp_path, 2) == line and line in capsys.readouterr().err
    assert G.warn_dose(tmp_path / "nowhere", 2) is None
    low = G.calibrate_dose(*_quantile_probes(lambda d: 0.8 if d == 0 else 0.2)[:2], lo=0.01, hi=0.5, grid=3, n=10,
                           n_boot=20)
    rec = {"round": 0, "dose": low.dose, "dose_source": "calibrated", "calibration": low.record(),
           **G.dose_checks(low, low.dose, "calibrated", None, 2, 10)}
    line = G.dose_warning(rec)
    assert "below_target" in line and "at_lower_bound" in line and "threshold 0.60 = 0.75 x unsteered 0.80" in line


def test_figures_show_the_fit_the_threshold_and_the_flags():
    low = G.calibrate_dose(*_quantile_probes(lambda d: 0.8 if d == 0 else 0.2)[:2], lo=0.01, hi=0.5, grid=3, n=10,
                           n_boot=20)
    summary = {"round": 1, "dose": low.dose, "dose_source": "calibrated", "calibration": low.record(),
               "calibration_path": low.path, **G.dose_checks(low, low.dose, "calibrated", None, 2, 10)}
    rows = [{"n_tokens": 5, "truncated": False}]
    search, lengths = G.figures(G.GenerateResult(summary, rows))
    assert "FLAGGED: below_target, at_lower_bound" in search.layout.title.text
    names = [t.name for t in search.data]
    assert "monotone fit" in names and "kept (raw)" in names
    assert any("threshold 0.60" in (a.text or "") for a in search.layout.annotations)
    assert G.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    (only,) = G.figures(G.GenerateResult({"round": 2, "dose": 0.05, "dose_source": "round0",
                                          "dose_flags": ["reused_keeps_less"]}, rows))
    assert "FLAGGED: reused_keeps_less" in only.layout.title.text and "(round0)" in only.layout.title.text


def test_driver_prints_the_dose_warning_after_02(tmp_path):
    """A fake 02 that records a bound dose: the terminal says so right after the stage."""
    import os
    import subprocess
    import sys

    from conftest import write_nb

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    write_nb(nbs / "02_generate.ipynb",
             "from steerheal_utils import stage\nfrom steerheal_utils.runfolder import atomic_write_json\n"
             "ctx = stage.open_stage('02_generate', globals())\n"
             "atomic_write_json(ctx.artifact('generate_summary'), {'round': ctx.round, 'dose': 0.005, "
             "'dose_source': 'calibrated', 'dose_flags': ['below_target', 'at_lower_bound']})\n"
             "for name in ('generated', 'calibration'):  # the other declared outputs of 02\n"
             "    ctx.artifact(name).write_text('')")
    env = {**os.environ, "STEERHEAL_NOTEBOOKS": str(nbs), "STEERHEAL_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "run", "--preset", "tiny", "--rounds", "1",
                        "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "warning: round 00 dose 0.005 (calibrated): below_target" in r.stderr
