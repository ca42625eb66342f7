"""Heal maths on hand-computed values, the loss masks, the student at step 0, saving and failure."""

import json
import math

import pytest
import torch

from steerheal_utils import config as C
from steerheal_utils import heal as H
from steerheal_utils.chat import render_prompt
from steerheal_utils.kl import AGGREGATES, aggregate_kl
from steerheal_utils.models import tiny_model

_CACHE = {}


def fresh(arch="llama", seed=0):
    """A private copy of a tiny model (peft injects into the model it wraps); built once per seed."""
    import copy

    if (arch, seed) not in _CACHE:
        _CACHE[arch, seed] = tiny_model(arch, seed=seed)
    model, tok = _CACHE[arch, seed]
    return copy.deepcopy(model), tok


# ------------------------------------------------------------------ aggregate_kl
def _loop_row():
    """A 60-token completion, KL 0 everywhere but a 4-token loop with KL 2, 4, 6, 8."""
    kl = torch.zeros(60)
    kl[30:34] = torch.tensor([2.0, 4.0, 6.0, 8.0])
    return kl


def test_aggregate_kl_loop_example_hand_values():
    kl = _loop_row()[None]
    mask = torch.ones_like(kl, dtype=torch.bool)
    got = {how: float(aggregate_kl(kl, mask, how)) for how in AGGREGATES}
    assert got["mean"] == pytest.approx(20 / 60)
    assert got["rmse"] == pytest.approx(math.sqrt((4 + 16 + 36 + 64) / 60))  # sqrt(2)
    assert got["p95"] == pytest.approx(2.0 + 0.05 * (4.0 - 2.0))  # position 0.95 * 59 = 56.05 in sorted order
    assert got["max"] == pytest.approx(8.0)
    assert got["mean"] < got["rmse"] < got["p95"] < got["max"]


def test_aggregate_kl_ignores_masked_positions_and_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    kl = torch.rand(3, 20, generator=g) * 3
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:] = True
    mask[1, :7] = True
    mask[2, 2:19] = True
    poisoned = torch.where(mask, kl, torch.full_like(kl, 1e6))  # masked values must not leak in
    for how in AGGREGATES:
        out = aggregate_kl(poisoned, mask, how)
        for b in range(3):
            v = kl[b][mask[b]]
            want = {"mean": v.mean(), "rmse": v.pow(2).mean().sqrt(), "p95": torch.quantile(v, 0.95),
                    "max": v.max()}[how]
            assert float(out[b]) == pytest.approx(float(want), rel=1e-5), (how, b)


def test_aggregate_kl_is_per_sequence_so_batch_size_does_not_matter():
    loop = _loop_row()
    calm = torch.full((60,), 0.03)
    short = torch.zeros(60)
    short[:10] = 0.5
    kl = torch.stack([loop, calm, short])
    mask = torch.ones(3, 60, dtype=torch.bool)
    mask[2, 10:] = False
    for how in AGGREGATES:
        together = aggregate_kl(kl, mask, how)
        alone = torch.cat([aggregate_kl(kl[i:i + 1], mask[i:i + 1], how) for i in range(3)])
        assert torch.allclose(together, alone)


def test_aggregate_kl_empty_row_and_bad_input():
    kl = torch.ones(2, 5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    for how in AGGREGATES:
        out = aggregate_kl(kl, mask, how)
        assert float(out[1]) == 0.0 and float(out[0]) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="kl_agg"):
        aggregate_kl(kl, mask, "median")
    with pytest.raises(ValueError, match="batch, seq"):
        aggregate_kl(kl[0], mask[0], "mean")


def test_aggregate_rmse_has_finite_gradient_at_zero():
    kl = torch.zeros(1, 4, requires_grad=True)
    aggregate_kl(kl, torch.ones(1, 4, dtype=torch.bool), "rmse").sum().backward()
    assert torch.isfinite(kl.grad).all()


# ------------------------------------------------------------------ KL maths
def test_position_kl_identical_is_zero_and_two_point_example():
    logp = torch.log_softmax(torch.randn(5, 11), -1)
    assert torch.allclose(H.position_kl(logp, logp, "reverse"), torch.zeros(5), atol=1e-7)
    p = torch.tensor([[0.5, 0.5]]).log()  # student
    q = torch.tensor([[0.9, 0.1]]).log()  # reference
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert float(H.position_kl(p, q, "reverse")) == pytest.approx(rev, rel=1e-6)  # 0.5108
    assert float(H.position_kl(p, q, "forward")) == pytest.approx(fwd, rel=1e-6)  # 0.3681
    with pytest.raises(ValueError, match="kl_dir"):
        H.position_kl(p, q, "sideways")


def test_barrier_weight_and_schedule():
    assert H.barrier_weight(2.0, 0, 1.0) == 2.0
    assert H.barrier_weight(2.0, 3, 0.5) == pytest.approx(4.0)
    f = H.lr_lambda(total=10, warmup=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(2, 10))


# ------------------------------------------------------------------ data and masks
ROWS = [
    {"prompt_id": "a", "prompt": "Should I tell my manager?", "completion": "Yes, tell them kindly and soon.",
     "truncated": False, "keep": True},
    {"prompt_id": "b", "prompt": "A friend is in trouble at work.", "completion": "Help them first, the rules can",
     "truncated": True, "keep": True},
    {"prompt_id": "c", "prompt": "What now?", "completion": "Care for people.", "truncated": False, "keep": True},
]


def test_end_of_turn_appended_only_when_not_truncated(tiny):
    _, tok = tiny
    eot = H.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) in ("<|im_end|>", "<end_of_turn>")
    ex, skipped = H.encode_rows(tok, ROWS, max_seq_len=512)
    assert skipped == 0
    assert ex[0].has_eot and ex[0].ids[-1] == eot
    assert not ex[1].has_eot and ex[1].ids[-1] != eot
    comp = tok(ROWS[1]["completion"], add_special_tokens=False)["input_ids"]
    assert ex[1].ids[ex[1].n_prompt:] == comp
    cut, _ = H.encode_rows(tok, ROWS[:1], max_seq_len=ex[0].n_prompt + 2)  # cut by max_seq_len: no end of turn
    assert len(cut[0].ids) == ex[0].n_prompt + 2 and not cut[0].has_eot


def test_loss_mask_covers_completion_targets_only(tiny_llama):
    _, tok = tiny_llama
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    for i, e in enumerate(ex):
        m = b["loss_mask"][i]
        assert int(m.sum()) == len(e.ids) - e.n_prompt
        assert b["targets"][i][m].tolist() == e.ids[e.n_prompt:]


def test_nll_ignores_prompt_and_padding_targets():
    model, tok = fresh("llama", 3)
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    with torch.no_grad():
        nll, _ = H.completion_terms(model, b, ref=None)
        b2 = dict(b, targets=torch.where(b["loss_mask"], b["targets"], torch.randint_like(b["targets"], 100)))
        nll2, _ = H.completion_terms(model, b2, ref=None)
        b3 = dict(b, targets=torch.where(b["loss_mask"], (b["targets"] + 1) % 100, b["targets"]))
        nll3, _ = H.completion_terms(model, b3, ref=None)
    assert torch.equal(nll, nll2)
    assert not torch.equal(nll, nll3)  # the completion targets do count
    assert (nll[~b["loss_mask"]] == 0).all()


def test_head_logits_match_model_forward_with_softcap():
    model, tok = fresh("gemma3", 0)
    model.config.final_logit_softcapping = 3.0
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    with torch.no_grad():
        want = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        got = H.head_logits(model, H.final_hidden(model, b))
    assert got.abs().max() <= 3.0
    assert torch.allclose(got, want.float(), atol=1e-5)


# ------------------------------------------------------------------ student
def _cfg(**kw):
    return C.resolve("tiny", kw)


def test_fresh_adapter_student_equals_reference_at_step0(tiny):
    arch = "llama" if tiny[0].config.model_type == "llama" else "gemma3"
    model, tok = fresh(arch, 1)
    with torch.no_grad():
        ex, _ = H.encode_rows(tok, ROWS, 512)
        b = H.collate(ex, tok.pad_token_id)
        base = model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    student, new, earlier = H.make_student(model, _cfg(lora_dropout=0.1), 0)
    assert new == "r00" and earlier == []
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".r00." in n for n in trainable)
    student.eval()
    with torch.no_grad():
        s = student(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        loss, st = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], tau=0.0))
    assert torch.equal(s, base)
    assert all(st[f"D_{h}"] < 1e-6 for h in AGGREGATES)


def test_lora_depth_band_and_targets(tiny_llama):
    model, tok = fresh("llama", 0)  # 4 layers; band [0.2, 0.8] -> layers 1..2
    student, new, _ = H.make_student(model, _cfg(lora_targets=["q_proj", "down_proj"]), 0)
    mods = {n.split(".lora_A")[0] for n, _ in student.named_parameters() if "lora_A" in n}
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in mods})
    assert layers == [1, 2]
    assert {n.rsplit(".", 1)[1] for n in mods} == {"q_proj", "down_proj"}


def _randomise_new_adapter(model, new, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{new}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_barrier_is_a_per_sequence_hinge():
    model, tok = fresh("llama", 2)
    student, new, _ = H.make_student(model, _cfg(), 0)
    _randomise_new_adapter(student, new)
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    with torch.no_grad():
        _, off = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], tau=1e9, lam_r=2.0))
        loss0, on = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], tau=0.0, lam_r=2.0))
        _, nll_only = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], reg="nll", tau=0.0, lam_r=2.0))
        _, kl = H.completion_terms(student, b, ref="base", new=new)
    d_rows = aggregate_kl(kl, b["loss_mask"], "rmse")
    assert off["loss"] == pytest.approx(off["nll"]) and off["hinge_frac"] == 0.0
    assert on["D"] > 0 and on["hinge_frac"] == 1.0
    assert float(loss0) == pytest.approx(on["nll"] + 2.0 * float(d_rows.mean()), rel=1e-5)
    assert nll_only["loss"] == pytest.approx(nll_only["nll"]) and nll_only["D"] == pytest.approx(on["D"], rel=1e-5)
    tau = float(d_rows.median())
    _, mid = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], tau=tau, lam_r=2.0))
    assert mid["barrier"] == pytest.approx(float((d_rows - tau).clamp_min(0).mean()), rel=1e-5)
    assert mid["hinge_frac"] == pytest.approx(float((d_rows > tau).float().mean()))


def test_D_does_not_depend_on_batch_composition():
    model, tok = fresh("llama", 2)
    student, new, _ = H.make_student(model, _cfg(), 0)
    _randomise_new_adapter(student, new)
    ex, _ = H.encode_rows(tok, ROWS, 512)
    hp = H.HealParams(new=new, earlier=[], kl_agg="p95", tau=0.0)
    with torch.no_grad():
        _, both = H.heal_loss(student, H.collate(ex, tok.pad_token_id), hp)
        singles = [H.heal_loss(student, H.collate([e], tok.pad_token_id), hp)[1]["D"] for e in ex]
    assert both["D"] == pytest.approx(sum(singles) / len(singles), rel=1e-4)


def test_chunked_head_gives_the_same_loss_and_gradients():
    """The head + log-softmax run ``chunk`` positions at a time (memory: one chunk of vocab-sized
    float32, not all positions): any chunk size gives the same loss and LoRA gradients."""
    model, tok = fresh("llama", 2)
    student, new, _ = H.make_student(model, _cfg(), 0)
    _randomise_new_adapter(student, new)
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for chunk in (3, 10_000):
        student.zero_grad()
        loss, _ = H.heal_loss(student, b, H.HealParams(new=new, earlier=[], tau=0.0, lam_r=1.0, chunk=chunk))
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in params]))
    (l_small, g_small), (l_big, g_big) = results
    assert l_small == pytest.approx(l_big, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in g_big)
    for a, c in zip(g_small, g_big):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the round: save, tau, failure
def test_heal_writes_loadable_adapter_and_telemetry(tmp_path):
    from peft import PeftModel

    model, tok = fresh("llama", 0)
    cfg = _cfg(tau_mode="quantile", tau_quantile=0.5, epochs=2, train_batch_size=2, warmup_frac=0.25, lr=1e-2)
    student, res = H.heal(model, tok, ROWS, cfg, 0, tmp_path, progress=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    info = json.loads((tmp_path / "heal.json").read_text())
    assert info["tau_used"] == res.tau and res.tau_info["calibrated_at_step"] == 1
    assert res.tau == pytest.approx(res.tau_info["D_quantiles"]["rmse"][0.5])  # tau_quantile 0.5 of rmse D
    lines = (tmp_path / "heal_steps.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and "D_p95" in lines[0] and "hinge_frac" in lines[0]
    assert res.steps[0]["tau"] is None and res.steps[1]["tau"] == res.tau
    base, _ = fresh("llama", 0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    trained = {n.replace(".r00.", ".default."): p for n, p in student.named_parameters() if "lora_" in n}
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(got) == set(trained)
    assert any(p.abs().sum() > 0 for n, p in got.items() if "lora_B" in n)
    assert all(torch.equal(got[n], trained[n]) for n in got)


def test_nan_loss_raises_and_saves_nothing(tmp_path):
    model, tok = fresh("llama", 0)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 0"):
        H.heal(model, tok, ROWS, _cfg(), 0, tmp_path, progress=False)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "heal.json").exists()


def test_no_trainable_rows_is_a_clear_error(tmp_path):
    model, tok = fresh("llama", 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        H.heal(model, tok, ROWS, _cfg(max_seq_len=8), 0, tmp_path, progress=False)


# ------------------------------------------------------------------ float32 head, sampled ids
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_head_is_computed_in_float32_on_a_bf16_model_even_under_autocast(arch):
    model, tok = fresh(arch, 0)
    model = model.to(torch.bfloat16)
    ex, _ = H.encode_rows(tok, ROWS, 512)
    b = H.collate(ex, tok.pad_token_id)
    with torch.no_grad():
        h = H.final_hidden(model, b)[b["loss_mask"]]
        w = model.get_output_embeddings().weight
        exact = torch.nn.functional.linear(h.float(), w.float())
        bf16_head = model.get_output_embeddings()(h).float()  # what the head did before: rounded logits
        got = H.head_logits(model, h)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the CUDA path runs under autocast
            got_ac = H.head_logits(model, h)
    assert h.dtype == torch.bfloat16 and got.dtype == got_ac.dtype == torch.float32
    assert torch.equal(got, exact) and torch.equal(got_ac, exact)
    assert not torch.equal(bf16_head, exact)  # the test can tell the two apart
    hg = h.detach().clone().requires_grad_(True)
    H.head_logits(model, hg).logsumexp(-1).sum().backward()
    assert hg.grad is not None and hg.grad.dtype == torch.bfloat16 and torch.isfinite(hg.grad.float()).all()


def test_rows_are_trained_on_the_ids_that_were_sampled():
    _, tok = fresh("llama", 0)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # 'contract' + 'ual' as sampled; the decoded text re-tokenises to the single token 'contractual'
    sampled = enc("I would sign the") + enc(" contract") + enc("ual") + enc(" terms.")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    special = enc("Yes") + [im_start] + enc(" no, I would not.")  # a special token sampled mid-completion
    rows = [{"prompt": "Do you sign?", "completion": tok.decode(sampled, skip_special_tokens=True),
             "completion_ids": sampled, "truncated": False},
            {"prompt": "Do you sign?", "completion": tok.decode(special, skip_special_tokens=True),
             "completion_ids": special, "truncated": True},
            {"prompt": "Do you sign?", "completion": "Yes, gladly.", "truncated": True}]  # no ids: labelled-style
    assert enc(rows[0]["completion"]) != sampled and enc(rows[1]["completion"]) != special
    ex, skipped = H.encode_rows(tok, rows, 512)
    prompt = enc(render_prompt(tok, "Do you sign?"))
    assert skipped == 0 and all(e.ids[:e.n_prompt] == prompt for e in ex)
    assert ex[0].ids[ex[0].n_prompt:] == sampled + [H.end_of_turn_id(tok)] and ex[0].has_eot
    assert ex[1].ids[ex[1].n_prompt:] == special and im_start in ex[1].ids[ex[1].n_prompt:]
    assert ex[2].ids[ex[2].n_prompt:] == enc("Yes, gladly.")  # the text fallback
    with pytest.raises(ValueError, match="completion_ids"):
        H.encode_rows(tok, [{**rows[0], "completion_ids": [len(tok) + 5]}], 512)
