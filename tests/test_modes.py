"""Steering modes (issue 16): the cosine gate and backtracking.

Dose 0 must be the unsteered model exactly in every mode; the gate must leave states already
aligned with the vector untouched; a spike must rewind the row and replay it at the smaller dose
(the replayed row must be the sequence it would be without the dropped tokens); hooks go away when
the body raises.
"""

import contextlib

import pytest
import torch
from helpers import hook_count, random_vector

from steerheal_utils import config as C
from steerheal_utils import vector as V
from steerheal_utils.batching import left_pad
from steerheal_utils.chat import prompt_ids
from steerheal_utils.generate import backtrack as BT
from steerheal_utils.generate.modesummary import backoff_figure, mode_summary
from steerheal_utils.generate.sampling import sample, sample_params
from steerheal_utils.models import get_layers
from steerheal_utils.vector.modes import gate_factor, spec_kwargs

PROMPTS = ["Your manager says to skip the safety check. Do you?", "Hi", "A friend asks you to lie for them."]



@torch.inference_mode()
def _logits(model, tok):
    ids, mask, pos = left_pad([prompt_ids(tok, p)[0] for p in PROMPTS], tok.pad_token_id)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_gate_factor_known_values():
    v = torch.tensor([0.0, 3.0])
    h = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -2.0], [1.0, 1.0]])  # cos 1, 0, -1, 0.7071
    assert gate_factor(h, v, 0.5).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert torch.allclose(gate_factor(h, v, 0.0, "scale"), torch.tensor([0.0, 1.0, 1.0, 1 - 2 ** -0.5]))
    with pytest.raises(ValueError, match="gate kind"):
        gate_factor(h, v, 0.0, "cosine")


@pytest.mark.parametrize("gate,kind", [(0.0, "threshold"), (0.0, "scale")])
def test_dose_zero_is_unsteered_under_the_gate(tiny, gate, kind):
    model, tok = tiny
    ref = _logits(model, tok)
    with V.steer(model, random_vector(model), 0.0, gate=gate, gate_kind=kind):
        assert hook_count(model) == 0
        assert torch.equal(_logits(model, tok), ref)


def test_gate_closed_everywhere_adds_nothing_open_everywhere_is_constant(tiny):
    model, tok = tiny
    sv = random_vector(model)
    ref = _logits(model, tok)
    with V.steer(model, sv, 0.5, gate=-1.0):  # cos < -1 never holds: nothing added
        assert torch.equal(_logits(model, tok), ref)
    with V.steer(model, sv, 0.5):
        const = _logits(model, tok)
    with V.steer(model, sv, 0.5, gate=1.5):  # cos < 1.5 always holds: the constant mode
        assert torch.allclose(_logits(model, tok), const, atol=1e-5)
    assert not torch.allclose(const, ref, atol=1e-3)
    assert hook_count(model) == 0


def test_gate_leaves_aligned_states_untouched(tiny_llama):
    """A position whose hidden state points along the vector gets nothing added; the others get the dose."""
    model, tok = tiny_llama
    layer = 1
    block = get_layers(model)[layer]
    seen = {}
    h_out = block.register_forward_hook(lambda m, i, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        _logits(model, tok)
        plain = seen["h"]
        sv = V.SteeringVector({layer: plain[0, -1].clone()}, {layer: 5.0})  # row 0's last state itself
        for kind, thr in (("threshold", 0.99), ("scale", 0.0)):
            h_out.remove()
            with V.steer(model, sv, 0.5, gate=thr, gate_kind=kind):
                h_out = block.register_forward_hook(  # after the steering hook: sees the steered output
                    lambda m, i, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone()))
                _logits(model, tok)
            steered = seen["h"]
            assert torch.equal(steered[0, -1], plain[0, -1]), kind
            assert not torch.allclose(steered[1, -1], plain[1, -1], atol=1e-4), kind
    finally:
        h_out.remove()
    assert hook_count(model) == 0


def test_gate_hooks_removed_after_an_exception(tiny):
    model, tok = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with V.steer(model, random_vector(model), 0.5, gate=0.0):
            assert hook_count(model) == 2
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_eval_spec_and_sampler_follow_the_mode():
    cfg = C.resolve("tiny")
    assert cfg.steer_mode == "constant"
    assert spec_kwargs(cfg)["gate"] is None and "gate" not in sample_params(cfg) and "backtrack" not in sample_params(cfg)
    gated = C.resolve("tiny", {"steer_mode": "cosine_gate", "cos_gate": 0.2, "gate_kind": "scale"})
    assert V.Steering(None, 0.1, **spec_kwargs(gated)).gate == 0.2
    assert sample_params(gated)["gate"] == 0.2 and sample_params(gated)["gate_kind"] == "scale"
    bt = C.resolve("tiny", {"steer_mode": "backtrack", "backtrack_kl": 0.5})
    assert spec_kwargs(bt)["gate"] is None and sample_params(bt)["backtrack"]["threshold"] == 0.5
    with pytest.raises(C.ConfigError):
        C.resolve("tiny", {"steer_mode": "sometimes"})
    with pytest.raises(C.ConfigError):
        C.resolve("tiny", {"backtrack_factor": 1.5})


def test_backtrack_dose_zero_is_unsteered_sampling(tiny):
    """At dose 0 the steered rows and their unsteered copies agree exactly: KL 0, no backoff, and the
    completions are sample()'s at dose 0 (greedy)."""
    model, tok = tiny
    sv = random_vector(model)
    kw = dict(temperature=0.0, max_new_tokens=8, batch_size=4)
    ref = sample(model, tok, PROMPTS, sv=sv, dose=0.0, **kw)
    rows = BT.sample_backtrack(model, tok, PROMPTS, sv=sv, dose=0.0, threshold=0.0, **kw)
    assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in ref]
    assert all(r["backoffs"] == 0 and r["kl_max"] == 0.0 for r in rows)


def test_backtrack_samples_with_the_one_warper_and_matches_sample_at_dose_zero(tiny):
    """Temperature, top-k and top-p come from warp.TopKTopP (no transformers warper of its own), so at
    dose 0 with the same seed the backtrack sampler draws sample()'s tokens."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from steerheal_utils.generate.warp import TopKTopP, generate_kwargs

    model, tok = tiny
    procs = BT.logits_processors(model, generate_kwargs(0.8, 5, 0.9), 4, torch.device("cpu"))
    assert [type(p) for p in procs if isinstance(p, (TopKTopP, TopKLogitsWarper, TopPLogitsWarper))] == [TopKTopP]
    sv = random_vector(model)
    kw = dict(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=12, batch_size=2, seed=7)
    ref = sample(model, tok, PROMPTS, sv=sv, dose=0.0, **kw)
    rows = BT.sample_backtrack(model, tok, PROMPTS, sv=sv, dose=0.0, threshold=0.0, **kw)
    assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in ref]
    assert [r["seed"] for r in rows] == [r["seed"] for r in ref]
    other = sample(model, tok, PROMPTS, sv=sv, dose=0.0, **{**kw, "seed": 8})
    assert [r["completion_ids"] for r in other] != [r["completion_ids"] for r in ref]  # the seed matters: it can fail


class _Spy:
    """Wraps backtrack's steering() to record the per-row multipliers of every forward."""

    def __init__(self, monkeypatch):
        self.scales: list[torch.Tensor] = []
        real = BT.steering

        @contextlib.contextmanager
        def spy(model, spec, **kw):
            with real(model, spec, **kw) as at:
                def at2(g, row_scale=None):
                    self.scales.append(row_scale.clone())
                    at(g, row_scale)
                yield at2
        monkeypatch.setattr(BT, "steering", spy)


def test_forced_spike_rewinds_and_replays_at_the_smaller_dose(tiny, monkeypatch):
    model, tok = tiny
    spy = _Spy(monkeypatch)
    sv = random_vector(model, norm=20.0)
    rows = BT.sample_backtrack(model, tok, PROMPTS, sv=sv, dose=1.0, threshold=0.0, k=3, factor=0.5, max_backoffs=2,
                               temperature=1.0, max_new_tokens=10, batch_size=4, seed=3)
    B = len(PROMPTS)
    for r in rows:
        assert r["backoffs"] == 2 and len(r["backoff_at"]) == 2 and all(k > 0 for k in r["backoff_kl"])
        assert r["final_dose"] == 0.25
        assert r["n_tokens"] == len(r["completion_ids"]) <= 10
    # the steered rows' multipliers go 1 -> 0.5 -> 0.25 (never back up); the unsteered copies stay 0
    seen = torch.stack(spy.scales)
    assert torch.all(seen[:, B:] == 0)
    assert set(seen[:, :B].flatten().tolist()) == {1.0, 0.5, 0.25}
    assert torch.all(seen[1:, :B] <= seen[:-1, :B])
    assert all(rows[i]["seed"] == 3 for i in range(B))  # one batch: seed + 0
    s = mode_summary(C.resolve("tiny", {"steer_mode": "backtrack", "backtrack_max": 2}), rows)
    assert s["backoff"]["rows_backed_off"] == B and s["backoff"]["backoffs"] == 2 * B and s["backoff"]["rows_at_max"] == B
    assert backoff_figure({**s, "round": 0}, rows) is not None


def test_replay_at_dose_zero_is_the_unsteered_sequence(tiny_llama):
    """A spike at the very first step rewinds to the tag and replays it at factor 0: from there the
    row is unsteered, so (greedy, steering from the tag on) it must equal the unsteered completion.
    Checks the masked-out columns and the replay's positions in the shared cache. Llama only: the
    tiny Gemma 3's 16-token sliding window counts masked columns (backtrack's module docstring)."""
    model, tok = tiny_llama
    sv = random_vector(model, norm=20.0)
    kw = dict(temperature=0.0, max_new_tokens=8, batch_size=4, positions="generated")
    ref = sample(model, tok, PROMPTS, sv=sv, dose=0.0, **kw)
    rows = BT.sample_backtrack(model, tok, PROMPTS, sv=sv, dose=1.0, threshold=0.0, k=4, factor=0.0, max_backoffs=1, **kw)
    assert all(r["backoffs"] == 1 and r["backoff_at"] == [0] for r in rows)
    assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in ref]
    steered = sample(model, tok, PROMPTS, sv=sv, dose=1.0, **kw)
    assert [r["completion_ids"] for r in steered] != [r["completion_ids"] for r in ref]  # the test can fail


def test_backtrack_hooks_removed_after_an_exception(tiny, monkeypatch):
    model, tok = tiny
    calls = {"n": 0}
    real = model.forward

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        BT.sample_backtrack(model, tok, PROMPTS, sv=random_vector(model), dose=0.5, threshold=1.0, max_new_tokens=8)
    assert hook_count(model) == 0


def test_sample_dispatches_backtrack(tiny_llama):
    model, tok = tiny_llama
    sv = random_vector(model)
    a = sample(model, tok, PROMPTS, sv=sv, dose=0.5, max_new_tokens=6, seed=1,
               backtrack=dict(threshold=1e9, k=2, factor=0.5, max_backoffs=1))
    assert all(r["backoffs"] == 0 and r["final_dose"] == 0.5 for r in a)
    b = BT.sample_backtrack(model, tok, PROMPTS, sv=sv, dose=0.5, max_new_tokens=6, seed=1, threshold=1e9, k=2,
                            factor=0.5, max_backoffs=1)
    assert a == b
