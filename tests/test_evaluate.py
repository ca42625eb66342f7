"""05 eval: scoring maths, label checks, batching and KV reuse, the stage, and the eval CLI (tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerheal_utils import chat
from steerheal_utils import evaluate as E
from steerheal_utils.models import tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: extra threads only spin against other processes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def rows():
    return E.load_vignettes(max_rows=7, seed=0)


# ------------------------------------------------------------------ pure maths
def test_scoring_on_hand_made_example():
    # Row 0: both frames put 0.5 on Care, 0.2 on Authority, 0.05 on each of the other five (mass 0.95).
    # Row 1: frame 0 puts 0.4 on Authority, frame 1 0.1 (geometric mean 0.2), 0.1 elsewhere.
    p0 = [0.5, 0.05, 0.05, 0.2, 0.05, 0.05, 0.05]
    r1f0 = [0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]
    r1f1 = [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    lp = torch.log(torch.tensor([[p0, p0], [r1f0, r1f1]], dtype=torch.float64))
    out = E.score_logprobs(lp)
    assert torch.allclose(out["mass"], torch.tensor([[0.95, 0.95], [1.0, 0.7]], dtype=torch.float64))
    # row 0: softmax of log p0 = p0 / 0.95
    assert torch.allclose(out["p"][0], torch.tensor(p0, dtype=torch.float64) / 0.95)
    # row 1: scores are log 0.1 everywhere except Authority = log 0.2 -> p_auth = 0.2 / (0.2 + 6 * 0.1) = 0.25
    assert out["p"][1, 3].item() == pytest.approx(0.25)
    assert out["p"][1, 0].item() == pytest.approx(0.1 / 0.8)
    s = E.summarize(lp, ["Care", "Authority"], human=torch.tensor([[90.0, 0, 0, 10, 0, 0, 0], [0, 80.0, 0, 20, 0, 0, 0]]))
    assert s["coherence"] == pytest.approx((0.95 * 2 + 1.0 + 0.7) / 4)
    auth_profile = (0.2 / 0.95 + 0.25) / 2
    assert s["auth_nats"] == pytest.approx(math.log(auth_profile))
    assert s["care_nats"] == pytest.approx(math.log((0.5 / 0.95 + 0.125) / 2))
    assert s["on_diag_authority"] == pytest.approx(0.25)
    assert s["on_diag_care"] == pytest.approx(0.5 / 0.95)
    assert s["agreement"] == pytest.approx(0.5)  # row 0 argmax Care = human Care; row 1 Authority != human Fairness
    assert sum(s["profile"].values()) == pytest.approx(1.0)
    assert set(E.NATS_KEYS.values()) <= set(s)


def test_probe_logodds_and_nonfinite():
    lp = torch.log(torch.tensor([[[0.6, 0.2], [0.3, 0.3]]]))
    out = E.probe_logodds(lp)
    assert out["axis_logodds"] == pytest.approx(math.log(3) / 2)
    assert out["axis_mass"] == pytest.approx((0.8 + 0.6) / 2)
    with pytest.raises(FloatingPointError):
        E.score_logprobs(torch.full((1, 2, 7), float("nan")))
    with pytest.raises(E.EvalError, match="shape"):
        E.score_logprobs(torch.zeros(2, 7))


# ------------------------------------------------------------------ labels and data
def test_label_tokens_distinct_and_single(llama):
    _, tok = llama
    ids = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    assert len(set(ids)) == 7
    with pytest.raises(E.EvalError, match=r"\['3', '3'\]"):
        E.label_token_ids(tok, E.VIGNETTE_PREFILL, ["1", "2", "3", "3"])
    with pytest.raises(E.EvalError, match="'violation' is not a single token"):
        E.label_token_ids(tok, E.VIGNETTE_PREFILL, ["1", "violation"])


def test_vignette_file_checks(tmp_path):
    rows = E.load_vignettes()
    assert len(rows) == 132
    sub = E.load_vignettes(max_rows=14)
    assert sorted({r["foundation_coarse"] for r in sub}) == sorted(E.FOUNDATIONS)  # stratified, not "first N"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": "t"}) + "\n")
    with pytest.raises(E.EvalError, match="line 1: missing fields"):
        E.load_vignettes(bad)
    with pytest.raises(E.EvalError, match="does not exist"):
        E.load_vignettes(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ engine
@pytest.mark.parametrize("layout", ["tinymfv", "prefix"])
def test_batched_equals_one_by_one(llama, rows, layout):
    model, tok = llama
    batched = E.vignette_logprobs(model, tok, rows, layout=layout, batch_size=4)
    single = torch.cat([E.vignette_logprobs(model, tok, [r], layout=layout, batch_size=1) for r in rows])
    assert torch.allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_kv_reuse_matches_full_forward(arch, rows):
    model, tok = tiny_model(arch, seed=1)
    ps = E.split_prompts(tok, E.vignette_template("prefix", E.FOUNDATIONS), [r["text"] for r in rows], E.VIGNETTE_PREFILL)
    # prefix + rest is exactly the tokenisation of the whole rendered prompt
    full_text = chat.render_prompt(tok, E.vignette_template("prefix", E.FOUNDATIONS).replace("{row}", rows[0]["text"])) + E.VIGNETTE_PREFILL
    assert ps.prefix + ps.rests[0] == chat.encode(tok, full_text)
    ids = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    reuse = E.next_token_logprobs(model, tok, ps, ids, batch_size=3, reuse_prefix=True)
    full = E.next_token_logprobs(model, tok, ps, ids, batch_size=3, reuse_prefix=False)
    assert torch.allclose(reuse, full, atol=1e-4)


def test_base_evaluated_twice_is_identical(llama, rows):
    model, tok = llama
    probe = E.load_probe(3)
    a = E.evaluate_model(model, tok, rows, probe=probe, batch_size=4)
    b = E.evaluate_model(model, tok, rows, probe=probe, batch_size=4)
    for k in ("auth_nats", "care_nats", "coherence", "axis_logodds", "agreement"):
        assert a["summary"][k] == b["summary"][k]
    assert a["rows"] == b["rows"]
    assert len(a["rows"]) == len(rows) and len(a["rows"][0]["p"]) == 7 and len(a["rows"][0]["mass"]) == 2


def test_think_budget_and_probe_order(llama, rows):
    model, tok = llama
    res = E.evaluate_model(model, tok, rows[:2], probe=E.load_probe(2), think_tokens=3, batch_size=2)
    assert res["summary"]["think_tokens"] == 3 and math.isfinite(res["summary"]["coherence"])
    lp = E.probe_logprobs(model, tok, E.load_probe(2), batch_size=2)
    assert lp.shape == (2, 2, 2) and torch.isfinite(lp).all()


def test_kl_of_model_to_itself_is_zero(llama):
    import contextlib

    model, tok = llama
    recs, pids, ans = E.heldout_answers(model, tok, E.load_heldout()[:2], max_new_tokens=4, batch_size=2)
    assert [r["id"] for r in recs] == [h["id"] for h in E.load_heldout()[:2]]
    assert E.answer_kl(model, contextlib.nullcontext, tok, pids, ans) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ the stage on a tiny run folder
def test_stage_writes_eval_json(tmp_path):
    from peft import LoraConfig, get_peft_model

    from steerheal_utils import config as C
    from steerheal_utils.driver import init_run
    from steerheal_utils.runfolder import atomic_write_json
    from steerheal_utils.stage import open_stage
    from steerheal_utils.vector import extract_vector

    run = tmp_path / "run"
    cfg = C.resolve("tiny", {"eval_max_rows": 7, "probe_max_items": 2, "heldout_max_new_tokens": 3, "coh_floor": 0.5})
    init_run(run, cfg)
    ctx = open_stage("05_eval", {"run_dir": str(run), "round": 0})
    model, tok = tiny_model("llama", seed=0)
    sv, _ = extract_vector(model, tok, ["hello", "write a poem"], cfg.pos_persona, cfg.neg_persona, [1, 2])
    sv.save(ctx.path("vector.safetensors"))
    out = E.run_stage(ctx, progress=False).record  # no dose yet (02 missing) and no adapter (04 missing): skipped with notes
    assert set(out["conditions"]) == {"base", "prompted"} and len(out["notes"]) == 2
    atomic_write_json(ctx.path("generate.json"), {"dose": 0.5})
    peft_model = get_peft_model(tiny_model("llama", seed=0)[0], LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(ctx.path("adapter"))
    out = E.run_stage(ctx, progress=False).record
    assert set(out["conditions"]) == {"base", "prompted", "steered", "random_00", "random_01", "healed"}  # tiny: n_controls=2
    assert {n.split(":")[0] for n in out["notes"] if "read from eval_conditions" in n} == {"base", "prompted"}  # from the first call
    band = out["control_band"]
    assert band["persona_dose"] == 0.5 and [m["name"] for m in band["members"]] == ["random_00", "random_01"]
    assert all(out["conditions"][m["name"]]["dose"] == m["dose"] != 0.5 for m in band["members"])  # KL-matched, not copied
    for name, s in out["conditions"].items():
        assert s["ci"]["auth_nats"][0] <= s["auth_nats"] <= s["ci"]["auth_nats"][1], name
        assert ("delta_vs_base" in s) == (name != "base")
    assert out["conditions"]["steered"]["dose"] == 0.5
    assert out["conditions"]["steered"]["auth_nats"] != out["conditions"]["base"]["auth_nats"]
    assert out["kl_to_base"] > 0 and len(out["heldout"]) == len(E.load_heldout())
    assert "coh_floor" in out["stop"]["reason"]  # a random-init model's coherence is far below 0.5
    saved = json.loads(ctx.path("eval.json").read_text())
    assert saved["conditions"]["healed"]["coherence"] == out["conditions"]["healed"]["coherence"]
    rows_bytes = ctx.path("eval_rows.jsonl").read_bytes()
    assert len(rows_bytes.decode().splitlines()) == 6 * 7

    # Run again (as after a crash later in 05): every stage is read back, with the same results.
    again = E.run_stage(ctx, progress=False).record
    assert sum("read from eval_conditions" in n for n in again["notes"]) == 6
    assert again["conditions"] == out["conditions"] and ctx.path("eval_rows.jsonl").read_bytes() == rows_bytes
    # A new dose changes the steered and random inputs: those are recomputed, the rest reused;
    # a damaged saved file is recomputed too.
    atomic_write_json(ctx.path("generate.json"), {"dose": 0.25})
    ctx.path("eval_conditions/prompted.json").write_text("{not json")
    third = E.run_stage(ctx, progress=False).record
    reused = {n.split(":")[0] for n in third["notes"] if "read from eval_conditions" in n}
    assert reused == {"base", "healed"}
    assert third["conditions"]["steered"]["dose"] == 0.25 and third["conditions"]["steered"] != out["conditions"]["steered"]
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert drop(third["conditions"]["prompted"]) == drop(out["conditions"]["prompted"])  # recomputed: the same numbers


def test_condition_fingerprint_tracks_inputs_not_heal_keys(tmp_path):
    from steerheal_utils import config as C

    vec, ad = tmp_path / "v.safetensors", tmp_path / "adapter"
    vec.write_bytes(b"vector-1")
    ad.mkdir()
    (ad / "adapter_model.safetensors").write_bytes(b"lora-1")
    cfg = C.resolve("tiny")
    fp = E.condition_fingerprint(cfg, 3, "steered", [ad], vec, 0.1, None)
    assert fp == E.condition_fingerprint(C.resolve("tiny", {"kl_agg": "mean", "reg": "nll"}), 3, "steered", [ad], vec, 0.1, None)
    others = [E.condition_fingerprint(cfg, 3, "steered", [ad], vec, 0.2, None),
              E.condition_fingerprint(cfg, 4, "steered", [ad], vec, 0.1, None),
              E.condition_fingerprint(cfg, 3, "random", [ad], vec, 0.1, None),
              E.condition_fingerprint(cfg, 3, "steered", [], vec, 0.1, None),
              E.condition_fingerprint(C.resolve("tiny", {"eval_max_rows": 3}), 3, "steered", [ad], vec, 0.1, None),
              E.condition_fingerprint(cfg, 3, "steered", [ad], vec, 0.1, "a persona")]
    (ad / "adapter_model.safetensors").write_bytes(b"lora-2")
    others.append(E.condition_fingerprint(cfg, 3, "steered", [ad], vec, 0.1, None))
    assert len({fp, *others}) == len(others) + 1
    # without a vector the dose is not an input
    assert E.condition_fingerprint(cfg, 3, "base", [], None, 0.1, None) == E.condition_fingerprint(cfg, 3, "base", [], None, None, None)


# ------------------------------------------------------------------ CLI
def _vignette_file(path):
    rows = E.load_vignettes(max_rows=7, seed=3)
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            r = dict(r, id=f"custom-{i}", text="You see someone " + r["text"][len("You see a "):])
            f.write(json.dumps(r) + "\n")


def test_cli_eval_custom_file_and_errors(tmp_path, capsys):
    from steerheal_utils.cli import main
    from steerheal_utils.vector import extract_vector

    vfile = tmp_path / "custom.jsonl"
    _vignette_file(vfile)
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", "tiny:llama", "--vignettes", str(vfile), "--probe-items", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["summary"]["n_rows"] == 7 and res["rows"][0]["id"] == "custom-0"

    assert main(["eval", "--model", "tiny:llama", "--vignettes", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:llama", "--adapters", str(tmp_path), "--out", str(out)]) == 1
    assert "not a peft adapter folder" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:llama", "--steer", str(tmp_path / "v.safetensors"), "--out", str(out)]) == 1
    assert "--steer needs --dose" in capsys.readouterr().err

    g_model, g_tok = tiny_model("gemma3", seed=0, hidden=32, n_layers=6)  # other width and depth
    sv, _ = extract_vector(g_model, g_tok, ["hi", "a story"], "kind", "strict", [5])
    sv.save(tmp_path / "v.safetensors")
    rc = main(["eval", "--model", "tiny:llama", "--steer", str(tmp_path / "v.safetensors"), "--dose", "0.1",
               "--max-rows", "7", "--out", str(out)])
    assert rc == 1
    assert "does not fit model tiny:llama" in capsys.readouterr().err
