"""vector.steer's fast path (constant dose at every position) and persistent steering slots.

The fast path must add exactly what the general, position-counting path adds; slots must
keep the set of hooks fixed (so a compiled forward never recompiles or silently drops the
steering) while doses change, and leave the model exactly as it was at dose 0 and on exit.
"""

import pytest
import torch

from steerheal_utils import vector as V
from steerheal_utils.batching import left_pad
from steerheal_utils.chat import prompt_ids
from steerheal_utils.models import get_layers


def _hooks(model):
    return sum(len(b._forward_hooks) for b in get_layers(model))


def _slot_attrs(model):
    return sum(hasattr(b, V.SLOT_ATTR) for b in get_layers(model))


def _sv(model, layers=(1, 2), seed=0, norm=5.0):
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    return V.SteeringVector({i: torch.randn(d, generator=g) for i in layers}, {i: norm for i in layers})


def _batch(tok):
    seqs = [prompt_ids(tok, "Your manager says to skip the safety check. Do you?")[0], prompt_ids(tok, "Hi")[0]]
    return left_pad(seqs, tok.pad_token_id)


@torch.inference_mode()
def _logits(model, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _general(model, sv, dose):
    """The general path adding the dose everywhere: positions='generated' from position 0."""
    return V.steer(model, sv, dose, positions="generated", prompt_len=1)


def test_fast_path_equals_general_path_bit_for_bit(tiny):
    model, tok = tiny
    ids, mask, pos = _batch(tok)
    sv = _sv(model)
    with _general(model, sv, 0.3):
        ref = _logits(model, ids, mask, pos)
    with V.steer(model, sv, 0.3):
        assert _hooks(model) == 2
        fast = _logits(model, ids, mask, pos)
    assert torch.equal(fast, ref)
    assert _hooks(model) == 0 and _slot_attrs(model) == 0


def test_fast_path_equals_general_path_in_generate(tiny_llama):
    model, tok = tiny_llama
    ids, mask, _ = _batch(tok)
    sv = _sv(model, norm=40.0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=[],
              output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        with _general(model, sv, 0.5):
            ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with V.steer(model, sv, 0.5):
            fast = model.generate(input_ids=ids, attention_mask=mask, **kw)
        plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(torch.stack(fast.logits), torch.stack(ref.logits))
    assert not torch.allclose(torch.stack(fast.logits), torch.stack(plain.logits))


def test_slots_write_in_place_and_restore_exactly(tiny):
    model, tok = tiny
    ids, mask, pos = _batch(tok)
    sv = _sv(model)
    plain = _logits(model, ids, mask, pos)
    with V.steer(model, sv, 0.4):
        steered = _logits(model, ids, mask, pos)
    n = len(get_layers(model))
    with V.steering_slots(model) as layers:
        assert layers == list(range(n)) and _hooks(model) == n
        assert torch.equal(_logits(model, ids, mask, pos), plain)  # zero buffers add exactly 0
        bufs = [getattr(b, V.SLOT_ATTR) for b in get_layers(model)]
        with V.steer(model, sv, 0.4):
            assert _hooks(model) == n  # nothing registered: the slots are written
            assert torch.equal(_logits(model, ids, mask, pos), steered)
        assert all(float(b.abs().sum()) == 0.0 for b in bufs)  # zeroed on exit
        assert all(getattr(b, V.SLOT_ATTR) is buf for b, buf in zip(get_layers(model), bufs))  # same tensors
        with V.steer(model, sv, 0.0):
            assert torch.equal(_logits(model, ids, mask, pos), plain)
    assert _hooks(model) == 0 and _slot_attrs(model) == 0
    assert torch.equal(_logits(model, ids, mask, pos), plain)


def test_slots_removed_and_zeroed_when_body_raises(tiny_llama):
    model, tok = tiny_llama
    ids, mask, pos = _batch(tok)
    plain = _logits(model, ids, mask, pos)
    with pytest.raises(RuntimeError, match="boom"):
        with V.steering_slots(model, [1, 2]):
            with V.steer(model, _sv(model), 0.4):
                raise RuntimeError("boom")
    assert _hooks(model) == 0 and _slot_attrs(model) == 0
    assert torch.equal(_logits(model, ids, mask, pos), plain)


def test_nested_fast_steering_adds_up(tiny_llama):
    """A second steer() on a busy slot gets its own hook, so the two doses add (as on the general path)."""
    model, tok = tiny_llama
    ids, mask, pos = _batch(tok)
    sv = _sv(model)
    with V.steer(model, sv, 0.2):
        with V.steer(model, sv, 0.2):
            twice = _logits(model, ids, mask, pos)
    with V.steering_slots(model, sv.layers):
        with V.steer(model, sv, 0.2):
            with V.steer(model, sv, 0.2):
                assert _hooks(model) == 4
                slotted = _logits(model, ids, mask, pos)
    torch.testing.assert_close(slotted, twice)
    with V.steer(model, sv, 0.4):
        once = _logits(model, ids, mask, pos)
    torch.testing.assert_close(twice, once, rtol=1e-4, atol=1e-4)


def test_compiled_static_cache_generate_follows_the_dose_without_recompiling(tiny_llama):
    """Inside slots one compiled decode graph serves every dose (dynamo's eager backend on CPU).

    Without slots a hook added after compiling a hook-free model is silently ignored by the
    compiled decode step: that is why generation compiles only inside steering_slots().
    """
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    torch._dynamo.reset()
    counters.clear()
    model, tok = tiny_llama
    ids, mask, _ = _batch(tok)
    sv = _sv(model, norm=40.0)
    cc = CompileConfig(backend="eager", mode=None)
    cc._compile_all_devices = True
    base = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=[],
                output_logits=True, return_dict_in_generate=True)

    def run(dose, compiled):
        kw = dict(base, cache_implementation="static", compile_config=cc) if compiled else base
        with torch.inference_mode(), V.steer(model, sv, dose):
            return torch.stack(model.generate(input_ids=ids, attention_mask=mask, **kw).logits)

    try:
        eager = {d: run(d, False) for d in (0.0, 0.5, 1.0)}
        with V.steering_slots(model):
            for d in (0.5, 0.0, 1.0, 0.5):
                torch.testing.assert_close(run(d, True), eager[d], rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
        for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
            if hasattr(model, attr):
                delattr(model, attr)
    assert _hooks(model) == 0 and _slot_attrs(model) == 0
