"""05 eval protocol: tiny-mfv's think path token for token, the steering the eval applies, and the
code version in the stage fingerprint (tiny random-init models around the shipped tokenizer)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from helpers import tiny_eval_round

from steerheal_utils import chat
from steerheal_utils import evaluate as E
from steerheal_utils.batching import length_sorted_batches
from steerheal_utils import vector as V
from steerheal_utils.models import get_layers, shipped_tokenizer, tiny_model

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
# The two chat formats written out by hand (not rendered through the template), for the layout tests.
HAND = {
    "llama": dict(prompt=SMOL_SYSTEM + "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
                  suffix="</think><|im_end|>\n" + SMOL_SYSTEM + "<|im_start|>user\nJust answer<|im_end|>\n<|im_start|>assistant\n"),
    "gemma3": dict(prompt="<bos><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n",
                   suffix="</think><end_of_turn>\n<bos><start_of_turn>user\nJust answer<end_of_turn>\n<start_of_turn>model\n"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rows():
    return E.load_vignettes(max_rows=3, seed=1)


def _sv(model, layers=(1,), norm=5.0, seed=0):
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    return V.SteeringVector({i: torch.randn(d, generator=g) for i in layers}, {i: norm for i in layers})


def _hooks(model):
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in get_layers(model))


@contextlib.contextmanager
def fed_ids(model):
    """Per forward: the token ids of each row that the model actually saw (left padding dropped)."""
    seen: list[list[list[int]]] = []

    def hook(_m, _args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        keep = mask[:, -ids.shape[1]:].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        seen.append([row[k].tolist() for row, k in zip(ids, keep)])

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def _think_prompts(tok, rows, layout="tinymfv", system=None):
    return E.split_prompts(tok, E.vignette_template(layout, E.FOUNDATIONS), [r["text"] for r in rows],
                           E.think_opener(tok, system), system)


# ------------------------------------------------------------------ the think path, token for token
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_think_layout_matches_hand_built_prompt(arch, rows):
    """Prompt + '<think>\\n', T thought tokens, '</think>' + turn close + 'Just answer' turn + header + prefill:
    the ids the model sees equal the hand-written conversation, and the forced read equals one full
    forward over it (so the KV-cached suffix is right)."""
    model, tok = tiny_model(arch, seed=2)
    T = 5
    ps = _think_prompts(tok, rows)
    labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    with fed_ids(model) as seen:
        lp, reads, thoughts = E.think_logprobs(model, tok, ps, labels, E.VIGNETTE_PREFILL, T, batch_size=2)
    assert all(len(t) == T for t in thoughts) and set(reads) == {"forced"}
    hand = HAND[arch]
    by_row: dict[int, list[int]] = {}
    order = length_sorted_batches([len(ps.prefix) + len(r) for r in ps.rests], 2)
    f = 0
    for b in order:  # the forwards of one batch: prompt, T - 1 decoding steps, the suffix
        for j, i in enumerate(b):
            by_row[i] = [t for fwd in seen[f:f + T + 1] for t in fwd[j]]
        f += T + 1
    assert f == len(seen)
    full = []
    for i, r in enumerate(rows):
        user = E.vignette_template("tinymfv", E.FOUNDATIONS).replace("{row}", r["text"])
        expect = (chat.encode(tok, hand["prompt"].format(user=user) + "<think>\n") + thoughts[i]
                  + chat.encode(tok, hand["suffix"]) + chat.encode(tok, E.VIGNETTE_PREFILL))
        assert by_row[i] == expect
        full.append(expect)
        # the assistant tag is the last token of the header, right before "<think>\n"
        assert chat.encode(tok, hand["prompt"].format(user=user)) == (ps.prefix + ps.rests[i])[:ps.tags[i] + 1]
    ref = E.next_token_logprobs(model, tok, E.PromptSet([], full, ps.tags), labels, reuse_prefix=False)
    assert torch.allclose(lp, ref, atol=1e-5)


def test_think_suppresses_eos_and_close_for_exactly_T_tokens():
    """A model that always wants EOS or '</think>' still thinks for exactly T tokens, never emitting either."""
    tok = shipped_tokenizer("llama")
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    model, _ = tiny_model("llama", seed=3)
    model.resize_token_embeddings(len(tok))
    close = tok.convert_tokens_to_ids("</think>")
    proto = E.think_protocol(model, tok, E.VIGNETTE_PREFILL)
    assert proto.close_id == close and {tok.eos_token_id, close} <= set(proto.suppress)
    bias = torch.zeros(len(tok))
    bias[[tok.eos_token_id, close]] = 50.0
    bias[close] = 60.0
    h = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        ids = torch.tensor([chat.encode(tok, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")])
        first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, -1]
        assert int(first) == close  # unsuppressed, the model would close its thought at once
        rows = E.load_vignettes(max_rows=2, seed=0)
        ps = _think_prompts(tok, rows)
        labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
        lp, reads, thoughts = E.think_logprobs(model, tok, ps, labels, E.VIGNETTE_PREFILL, 7, batch_size=2)
    finally:
        h.remove()
    assert [len(t) for t in thoughts] == [7, 7]
    assert not set(proto.suppress) & {t for th in thoughts for t in th}
    assert reads == ["forced", "forced"] and torch.isfinite(lp).all()


def test_tokenizer_without_think_tokens_falls_back_to_eos(tiny_llama):
    model, tok = tiny_llama
    proto = E.think_protocol(model, tok, E.VIGNETTE_PREFILL)
    assert proto.close_id == tok.eos_token_id  # '</think>' is plain text (several tokens) here
    assert len(chat.encode(tok, "</think>")) > 1
    assert E.think_opener(tok) == "<think>\n"
    reasoning = shipped_tokenizer("llama")
    reasoning.chat_template = tok.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'")
    assert reasoning.chat_template != tok.chat_template
    assert chat.render_prompt(reasoning, "x").endswith("<think>\n")
    assert E.think_opener(reasoning) == ""  # the template opens the thought itself: not a second time


def test_prefill_in_own_text_is_read_there(tiny_llama, rows):
    """A thought that writes 'This is wrong because {"violation": "3' is scored at its own '3'."""
    model, tok = tiny_llama
    labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    said = chat.encode(tok, "Hmm. " + E.VIGNETTE_PREFILL)
    script = said + [labels[2]] + chat.encode(tok, '"}')
    T = len(script) + 2
    calls = {"n": 0}

    def force(_m, _i, out):  # call 0 = the prompt forward (picks thought token 0), call j = decoding step j
        j = calls["n"]
        calls["n"] += 1
        if j < len(script):
            out = out.clone()
            out[:, -1, script[j]] += 30.0
        return out

    ps = _think_prompts(tok, rows[:1])
    h = model.get_output_embeddings().register_forward_hook(force)
    try:
        lp, reads, thoughts = E.think_logprobs(model, tok, ps, labels, E.VIGNETTE_PREFILL, T, batch_size=1)
    finally:
        h.remove()
    assert thoughts[0][:len(script)] == script and reads == ["natural"]
    start, answer = E.find_prefill(thoughts[0], E.VIGNETTE_PREFILL, tok)
    assert answer == len(said) and tok.decode(thoughts[0][start:answer]).endswith(E.VIGNETTE_PREFILL)
    assert lp[0, 2] > -1e-3  # the slot where the model itself wrote "3": nearly all mass on it


def test_read_selection_natural_forced_unscorable(tiny_llama):
    model, tok = tiny_llama
    proto = E.think_protocol(model, tok, E.VIGNETTE_PREFILL)
    own = chat.encode(tok, 'ok {"violation": "')  # the thought writes the prefill itself, then "3"
    lab3 = E.label_token_ids(tok, '{"violation": "', E.LABELS)[2]
    natural = E.ThinkProtocol(proto.suffix, proto.suppress, proto.close_id, '{"violation": "')
    step = torch.log(torch.full((12, 7), 0.1))
    step[len(own)] = torch.log(torch.tensor([0.05, 0.05, 0.8, 0.02, 0.02, 0.03, 0.03]))
    forced = torch.log(torch.full((7,), 0.125))
    gen = own + [lab3] + [11] * (12 - len(own) - 1)
    lp, kind = E.read_think_row(gen, step, forced, natural, tok)
    assert kind == "natural" and torch.equal(lp, step[len(own)])
    closed = [11, 12, proto.close_id] + [11] * 9
    lp, kind = E.read_think_row(closed, step, forced, proto, tok)
    assert kind == "unscorable" and torch.isnan(lp).all()
    lp, kind = E.read_think_row(gen[:len(own) + 1] + [proto.close_id] * 3, step, forced, natural, tok)
    assert kind == "natural"  # closed, but after writing its answer: read there
    lp, kind = E.read_think_row([11] * 12, step, forced, proto, tok)
    assert kind == "forced" and torch.equal(lp, forced)
    # the prefill as the very last thing written: no answer token follows, so it is not a natural read
    assert E.find_prefill([11] * 5 + own, '{"violation": "', tok) is None
    assert E.find_prefill([tok.pad_token_id] * 2 + own + [lab3], '{"violation": "', tok, tok.pad_token_id) == (3, 2 + len(own))


def test_unscorable_rows_are_excluded_and_counted(tiny_llama, rows, monkeypatch):
    model, tok = tiny_llama
    lp = torch.log(torch.full((3, 2, 7), 1 / 7))
    lp[0, 0, 0] = math.log(0.5)
    lp[1] = float("nan")
    reads = [["forced", "natural"], ["unscorable", "forced"], ["forced", "forced"]]
    monkeypatch.setattr(E.model_eval, "vignette_reads", lambda *a, **k: (lp.clone(), reads))
    res = E.evaluate_model(model, tok, rows, think_tokens=4)
    s = res["summary"]
    assert s["n_rows"] == 2 and s["n_unscorable"] == 1 and s["unscorable"] == pytest.approx(1 / 3)
    assert s["natural_reads"] == pytest.approx(1 / 6)
    ref = E.summarize(lp[[0, 2]], [rows[0]["foundation_coarse"], rows[2]["foundation_coarse"]])
    assert s["auth_nats"] == pytest.approx(ref["auth_nats"]) and s["coherence"] == pytest.approx(ref["coherence"])
    assert res["rows"][1]["p"] is None and res["rows"][1]["read"] == ["unscorable", "forced"]
    monkeypatch.setattr(E.model_eval, "vignette_reads", lambda *a, **k: (torch.full((3, 2, 7), float("nan")), reads))
    with pytest.raises(E.EvalError, match="none of the 3 vignettes"):
        E.evaluate_model(model, tok, rows)


def test_summary_records_protocol_and_reads(tiny_llama, rows):
    model, tok = tiny_llama
    s = E.evaluate_model(model, tok, rows[:2], layout="tinymfv", think_tokens=2, batch_size=2)["summary"]
    assert s["unscorable"] == 0.0 and 0.0 <= s["natural_reads"] <= 1.0 and s["protocol"].startswith("tiny-mfv")
    s = E.evaluate_model(model, tok, rows[:2], layout="prefix", batch_size=2)["summary"]
    assert "not the tiny-mfv prompt" in s["protocol"] and s["natural_reads"] == 0.0


# ------------------------------------------------------------------ steering as generation did it
@contextlib.contextmanager
def added_by_steering(model, layer):
    """Per forward, what the steering hooks added at ``layer``: the block's own output (captured by a
    hook registered before the eval's) subtracted from the next block's input."""
    blocks = get_layers(model)
    outs, ins = [], []
    h1 = blocks[layer].register_forward_hook(lambda _m, _i, out: outs.append((out[0] if isinstance(out, tuple) else out).clone()))
    h2 = blocks[layer + 1].register_forward_pre_hook(lambda _m, args: ins.append(args[0].clone()))
    diffs: list[torch.Tensor] = []
    try:
        yield diffs
    finally:
        h1.remove()
        h2.remove()
        diffs.extend((b - a).double() for a, b in zip(outs, ins))


def _expected(spec, g, unit):
    """dose * [g >= 0 if 'generated'] * 0.5 ** (max(g, 0) / H), times the unit-dose vector."""
    m = spec.dose * (1.0 if spec.positions == "all" or g >= 0 else 0.0)
    if spec.halflife:
        m *= 0.5 ** (max(g, 0) / spec.halflife)
    return m * unit


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_eval_adds_dose_halving_every_H_tokens_from_the_tag(tiny_llama, rows, positions):
    """Think path (prompt forward, decoding steps, suffix): the add at sequence index i of a row is
    dose * 0.5 ** ((i - tag) / H) from the tag on; before it dose ('all') or exactly 0 ('generated')."""
    model, tok = tiny_llama
    sv = _sv(model, layers=(1,), norm=6.0)
    spec = V.Steering(sv, 0.3, positions, halflife=3)
    unit = sv.added(1, 1.0).double()
    ps = _think_prompts(tok, rows[:2])
    labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    T = 4
    with added_by_steering(model, 1) as diffs:
        E.think_logprobs(model, tok, ps, labels, E.VIGNETTE_PREFILL, T, batch_size=2, steering=spec)
    add = torch.cat(diffs, 1)  # [rows, padded prompt + T - 1 + suffix]
    lens = [len(ps.prefix) + len(r) for r in ps.rests]
    L = max(lens)
    assert add.shape[1] == L + T - 1 + 1 + len(E.think_protocol(model, tok, E.VIGNETTE_PREFILL).suffix)
    order = length_sorted_batches(lens, 2)[0]
    checked_before = checked_after = 0
    for j, i in enumerate(order):
        for c in range(L - lens[i], add.shape[1]):  # real tokens only
            g = c - (L - lens[i]) - ps.tags[i]
            torch.testing.assert_close(add[j, c], _expected(spec, g, unit), rtol=1e-5, atol=1e-5)
            if g < 0 and positions == "generated":
                assert torch.equal(add[j, c], torch.zeros_like(add[j, c]))  # prompt untouched, exactly
            checked_before += g < 0
            checked_after += g > 0
    assert checked_before > 20 and checked_after > 20


@pytest.mark.parametrize("reuse", [True, False])
def test_direct_read_adds_per_row_from_each_rows_tag(tiny_llama, rows, reuse):
    """Right-padded rests after a shared prefix (reuse) and left-padded full forwards: each row's own tag."""
    model, tok = tiny_llama
    sv = _sv(model, layers=(1,), norm=6.0, seed=1)
    spec = V.Steering(sv, 0.2, "all", halflife=2)
    unit = sv.added(1, 1.0).double()
    ps = E.split_prompts(tok, E.vignette_template("prefix", E.FOUNDATIONS), [r["text"] for r in rows], E.VIGNETTE_PREFILL)
    labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    P = len(ps.prefix)
    with added_by_steering(model, 1) as diffs:
        E.next_token_logprobs(model, tok, ps, labels, batch_size=len(rows), reuse_prefix=reuse, steering=spec)
    lens = [len(r) for r in ps.rests]
    order = length_sorted_batches(lens, len(rows))[0]
    if reuse:
        pre, add = diffs
        for c in range(P):
            torch.testing.assert_close(pre[0, c], _expected(spec, -1, unit), rtol=1e-5, atol=1e-5)
        cols = {i: [(c, P + c) for c in range(lens[i])] for i in order}  # (column, sequence index)
    else:
        (add,) = diffs
        L = add.shape[1]
        cols = {i: [(c, c - (L - P - lens[i])) for c in range(L - P - lens[i], L)] for i in order}
    for j, i in enumerate(order):
        for c, seq_i in cols[i]:
            torch.testing.assert_close(add[j, c], _expected(spec, seq_i - ps.tags[i], unit), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefix_reuse_and_full_forward_agree_under_positional_steering(arch, rows):
    model, tok = tiny_model(arch, seed=1)
    spec = V.Steering(_sv(model, layers=(1, 2)), 0.5, "generated", halflife=1)
    ps = E.split_prompts(tok, E.vignette_template("tinymfv", E.FOUNDATIONS), [r["text"] for r in rows], E.VIGNETTE_PREFILL)
    ids = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    reuse = E.next_token_logprobs(model, tok, ps, ids, batch_size=2, reuse_prefix=True, steering=spec)
    full = E.next_token_logprobs(model, tok, ps, ids, batch_size=2, reuse_prefix=False, steering=spec)
    plain = E.next_token_logprobs(model, tok, ps, ids, batch_size=2, reuse_prefix=False)
    assert torch.allclose(reuse, full, atol=1e-4)
    assert not torch.allclose(full, plain, atol=1e-3)  # the steering did something


def test_think_path_cached_suffix_equals_full_forward_when_steered(rows):
    """With 'generated' + half-life, the forced read over the KV cache equals one steered full forward."""
    model, tok = tiny_model("gemma3", seed=4)  # sliding-window layers (window 16) included
    spec = V.Steering(_sv(model, layers=(1, 2), seed=3), 0.4, "generated", halflife=2)
    ps = _think_prompts(tok, rows[:2])
    labels = E.label_token_ids(tok, E.VIGNETTE_PREFILL, E.LABELS)
    lp, _, thoughts = E.think_logprobs(model, tok, ps, labels, E.VIGNETTE_PREFILL, 3, batch_size=2, steering=spec)
    suffix = E.think_protocol(model, tok, E.VIGNETTE_PREFILL).suffix
    full = [ps.prefix + r + t + suffix for r, t in zip(ps.rests, thoughts)]
    ref = E.next_token_logprobs(model, tok, E.PromptSet([], full, ps.tags), labels, reuse_prefix=False, steering=spec)
    assert torch.allclose(lp, ref, atol=1e-4)


def test_dose_zero_is_exactly_unsteered_everywhere(tiny_llama, rows):
    model, tok = tiny_llama
    probe = E.load_probe(2)
    for T in (0, 2):
        ref = E.evaluate_model(model, tok, rows[:2], probe=probe, think_tokens=T, batch_size=2)
        zero = E.evaluate_model(model, tok, rows[:2], probe=probe, think_tokens=T, batch_size=2,
                                steering=V.Steering(_sv(model), 0.0, "generated", 4))
        assert zero["rows"] == ref["rows"]
        same = lambda d: json.dumps({k: v for k, v in d.items() if k != "seconds"}, sort_keys=True)  # noqa: E731 (NaN-safe)
        assert same(zero["summary"]) == same(ref["summary"])


def test_constant_dose_is_bit_identical_to_steer_around_the_eval(tiny_llama, rows):
    """The fast path: Steering(sv, d) gives what `with steer(model, sv, d): evaluate_model(...)` gave,
    with or without persistent slots."""
    model, tok = tiny_llama
    sv = _sv(model, layers=(1, 2))
    kw = dict(probe=E.load_probe(2), batch_size=2, layout="prefix")
    with V.steer(model, sv, 0.3):
        old = E.evaluate_model(model, tok, rows, **kw)
    new = E.evaluate_model(model, tok, rows, steering=V.Steering(sv, 0.3), **kw)
    with V.steering_slots(model):
        slots = E.evaluate_model(model, tok, rows, steering=V.Steering(sv, 0.3), **kw)
    assert new["rows"] == old["rows"] == slots["rows"]
    assert new["summary"]["axis_logodds"] == old["summary"]["axis_logodds"] == slots["summary"]["axis_logodds"]
    assert _hooks(model) == 0


def test_hooks_removed_after_an_exception(tiny_llama, rows):
    model, tok = tiny_llama
    spec = V.Steering(_sv(model, layers=(1, 2)), 0.3, "generated", 2)
    calls = {"n": 0}

    def bomb(_m, _i, _o):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the think decoding loop
            raise RuntimeError("boom")

    h = get_layers(model)[3].register_forward_hook(bomb)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            E.evaluate_model(model, tok, rows[:2], think_tokens=4, batch_size=2, steering=spec)
    finally:
        h.remove()
    assert _hooks(model) == 0
    with pytest.raises(V.PositionsNotSet):  # a forward without its positions is refused, not steered blindly
        with V.steering(model, spec):
            model(input_ids=torch.tensor([[1, 2, 3]]))
    assert _hooks(model) == 0


def test_steering_spec_validation():
    with pytest.raises(ValueError, match="positions"):
        V.Steering(None, 0.1, positions="prompt")
    with pytest.raises(ValueError, match="finite"):
        V.Steering(None, float("inf"))
    with pytest.raises(ValueError, match="halflife"):
        V.Steering(None, 0.1, halflife=-1)
    s = V.Steering(None, 0.4, "generated", 2).scale(torch.tensor([-3, 0, 1, 2, 6]))
    assert torch.allclose(s, torch.tensor([0.0, 0.4, 0.4 * 0.5 ** 0.5, 0.2, 0.05]))


# ------------------------------------------------------------------ the code version in the fingerprint
def test_code_version_tracks_prompt_text_and_code(tmp_path, monkeypatch):
    from steerheal_utils import config as C

    cfg = C.resolve("tiny")
    base = E.eval_code_version()
    fp = E.condition_fingerprint(cfg, 0, "base", [], None, None, None)
    assert E.eval_code_version() == base and E.condition_fingerprint(cfg, 0, "base", [], None, None, None) == fp
    with monkeypatch.context() as m:
        m.setattr(E.prompts, "VIGNETTE_PREFILL", 'This is wrong because {"foundation": "')
        assert E.eval_code_version() != base and E.condition_fingerprint(cfg, 0, "base", [], None, None, None) != fp
    with monkeypatch.context() as m:
        m.setattr(E.prompts, "GLOSSES", {**E.GLOSSES, "Care": "care: harm"})
        assert E.eval_code_version() != base
    assert E.eval_code_version() == base  # restored constants: the same version again
    src = tmp_path / "evaluate.py"
    src.write_text("def score(): return 1\n")
    monkeypatch.setattr(E.conditions, "CODE_FILES", (str(src),))
    v1 = E.eval_code_version()
    src.write_text("def score(): return 2\n")
    assert E.eval_code_version() != v1


def test_fingerprint_tracks_the_vignette_file_contents(tmp_path):
    from steerheal_utils import config as C

    f = tmp_path / "v.jsonl"
    f.write_text("a\n")
    cfg = C.resolve("tiny", {"vignettes": str(f)})
    fp = E.condition_fingerprint(cfg, 0, "base", [], None, None, None)
    f.write_text("b\n")
    assert E.condition_fingerprint(cfg, 0, "base", [], None, None, None) != fp


# ------------------------------------------------------------------ the stage and the CLI pass the steering on
def test_stage_steers_as_generation_did(tmp_path):
    cfg, ctx, model, tok, sv = tiny_eval_round(tmp_path / "run", {
        "eval_max_rows": 3, "probe_max_items": 2, "controls": [], "heldout_max_new_tokens": 2,
        "steer_positions": "generated", "dose_halflife": 3})
    out = E.run_stage(ctx, progress=False).record
    s = out["conditions"]["steered"]
    assert s["steer_positions"] == "generated" and s["dose_halflife"] == 3 and s["dose"] == 0.5
    kw = dict(probe=E.load_probe(2), layout=cfg.eval_layout, batch_size=cfg.batch_size)
    rows = E.load_vignettes(max_rows=3, seed=cfg.seed)
    want = E.evaluate_model(model, tok, rows, steering=V.Steering(V.SteeringVector.load(ctx.path("vector.safetensors")),
                                                                  0.5, "generated", 3), **kw)["summary"]
    const = E.evaluate_model(model, tok, rows, steering=V.Steering(sv, 0.5), **kw)["summary"]
    assert s["auth_nats"] == pytest.approx(want["auth_nats"], abs=1e-6)
    assert s["axis_logodds"] == pytest.approx(want["axis_logodds"], abs=1e-6)
    assert s["axis_logodds"] != pytest.approx(const["axis_logodds"], abs=1e-6)  # not the old constant dose


def test_cli_eval_takes_positions_and_halflife(tmp_path, capsys):
    from steerheal_utils.cli import main
    from steerheal_utils.vector import extract_vector

    model, tok = tiny_model("llama", seed=0)
    sv, _ = extract_vector(model, tok, ["hi", "a story"], "kind", "strict", [1])
    sv.save(tmp_path / "v.safetensors")
    out = tmp_path / "res.json"
    base = ["eval", "--model", "tiny:llama", "--max-rows", "2", "--probe-items", "1", "--steer", str(tmp_path / "v.safetensors"),
            "--dose", "0.3", "--out", str(out)]
    assert main(base + ["--steer-positions", "generated", "--dose-halflife", "4"]) == 0
    res = json.loads(out.read_text())
    assert res["args"]["steer_positions"] == "generated" and res["summary"]["dose_halflife"] == 4
    assert main(base + ["--dose-halflife", "-1"]) == 1
    assert "--dose-halflife must be >= 0" in capsys.readouterr().err
