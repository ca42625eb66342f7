"""vector.steer: exact no-op at dose 0, hooks always removed, where and how much it adds."""

import pytest
import torch
from helpers import hook_count, random_vector

from steerheal_utils import vector as V
from steerheal_utils.batching import left_pad
from steerheal_utils.chat import prompt_ids
from steerheal_utils.models import get_layers



def _batch(tok, device="cpu"):
    seqs = [prompt_ids(tok, "Your manager says to skip the safety check. Do you?")[0],
            prompt_ids(tok, "Hi")[0]]
    return left_pad(seqs, tok.pad_token_id, device)


@torch.inference_mode()
def _logits(model, ids, mask, pos):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def test_dose_zero_is_exactly_unsteered(tiny):
    model, tok = tiny
    ids, mask, pos = _batch(tok)
    ref = _logits(model, ids, mask, pos)
    for positions in ("all", "generated"):
        with V.steer(model, random_vector(model), 0.0, positions=positions):
            assert hook_count(model) == 0
            assert torch.equal(_logits(model, ids, mask, pos), ref)
    with V.steer(model, None, 0.3):
        assert torch.equal(_logits(model, ids, mask, pos), ref)


def test_nonzero_dose_changes_logits_and_exit_restores(tiny):
    model, tok = tiny
    ids, mask, pos = _batch(tok)
    ref = _logits(model, ids, mask, pos)
    with V.steer(model, random_vector(model), 0.5):
        assert hook_count(model) == 2
        steered = _logits(model, ids, mask, pos)
    assert not torch.allclose(steered, ref)
    assert hook_count(model) == 0
    assert torch.equal(_logits(model, ids, mask, pos), ref)


def test_hooks_removed_when_body_raises(tiny_llama):
    model, tok = tiny_llama
    ids, mask, pos = _batch(tok)
    ref = _logits(model, ids, mask, pos)
    with pytest.raises(RuntimeError, match="boom"):
        with V.steer(model, random_vector(model), 0.5):
            _logits(model, ids, mask, pos)
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    assert torch.equal(_logits(model, ids, mask, pos), ref)


def test_hooks_removed_when_generate_raises(tiny_llama):
    model, tok = tiny_llama
    ids, mask, _ = _batch(tok)
    calls = {"n": 0}

    def bomb(_m, _i, _o):  # fails on the third decoding step, inside generate
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("mid-generation failure")

    h = get_layers(model)[3].register_forward_hook(bomb)
    try:
        with pytest.raises(ValueError, match="mid-generation"):
            with V.steer(model, random_vector(model), 0.5):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    finally:
        h.remove()
    assert hook_count(model) == 0


def test_bad_layer_raises_and_leaves_no_hooks(tiny_llama):
    model, _ = tiny_llama
    sv = random_vector(model, layers=(1, 99))
    with pytest.raises(ValueError, match="layer 99"):
        with V.steer(model, sv, 0.1):
            pass
    assert hook_count(model) == 0


def test_generated_positions_leave_the_prompt_untouched(tiny):
    """positions="generated": logits before the assistant tag are bit-identical, from the tag on they move."""
    model, tok = tiny
    ids, mask, pos = _batch(tok)
    plen = ids.shape[1] - 3  # pretend the last 3 positions were generated
    ref = _logits(model, ids, mask, pos)
    with V.steer(model, random_vector(model), 0.5, positions="generated", prompt_len=plen):
        out = _logits(model, ids, mask, pos)
    tag = plen - 1
    assert torch.equal(out[:, :tag], ref[:, :tag])
    for t in range(tag, ids.shape[1]):
        assert not torch.allclose(out[:, t], ref[:, t])


def _added_at_first_layer(model, ids, mask, pos, sv, **kw):
    """What steer adds at the first steered layer (its input is unchanged, so it is exactly the add)."""
    layer = sv.layers[0]
    with V.capture_layers(model, [layer]) as plain:
        _logits(model, ids, mask, pos)
    h0 = plain[layer].clone()
    with V.steer(model, sv, **kw), V.capture_layers(model, [layer]) as st:  # capture hook runs after steer's
        _logits(model, ids, mask, pos)
    return (st[layer] - h0).double(), sv.added(layer, 1.0).double()


def test_dose_unit_and_halflife_decay(tiny_llama):
    model, tok = tiny_llama
    ids, mask, pos = _batch(tok)
    sv = random_vector(model, layers=(1,), norm=7.0)
    n = ids.shape[1]
    plen = n - 4  # tag at n-5, "generated" positions n-4..n-1 -> gen_pos 1..4
    diff, unit = _added_at_first_layer(model, ids, mask, pos, sv, dose=0.2, positions="all", halflife=2,
                                       prompt_len=plen)
    assert abs(float(unit.norm()) - 7.0) < 1e-4  # dose 1 = the layer's residual norm
    for t in range(n):
        g = max(0, t - (plen - 1))
        expect = 0.2 * 0.5 ** (g / 2)
        torch.testing.assert_close(diff[0, t], expect * unit, rtol=1e-4, atol=1e-4)


def test_generated_positions_with_generate_counts_decoding_steps(tiny_llama):
    """Around generate the first forward is the prompt: the tag gets the dose, each new token too."""
    model, tok = tiny_llama
    ids, mask, _ = _batch(tok)
    sv = random_vector(model, layers=(1,), norm=3.0)
    seen = []
    with V.steer(model, sv, 0.1, positions="generated", halflife=1):
        with V.capture_layers(model, [1]) as st:
            h = get_layers(model)[1].register_forward_hook(lambda *_: seen.append(st[1].shape[1]))
            try:
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=[])
            finally:
                h.remove()
    assert seen == [ids.shape[1], 1, 1]


def test_invalid_arguments(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="positions"):
        with V.steer(model, random_vector(model), 0.1, positions="prompt"):
            pass
    with pytest.raises(ValueError, match="positions"):  # checked even where steering is a no-op
        with V.steer(model, random_vector(model), 0.0, positions="prompt"):
            pass
    with pytest.raises(ValueError, match="finite"):
        with V.steer(model, random_vector(model), float("nan")):
            pass
    assert hook_count(model) == 0
