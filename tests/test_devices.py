"""A model placed with a device map (accelerate's hooks) computes what the plain model computes:
logits, steering, the hidden states 01 extracts, the heal loss with its KL reference, and LoRA
training. On CPU every entry is "cpu", but the model goes through the device-map code path
(``devices.dispatch`` with accelerate's hooks on every block); a block's execution device, not its
weights' device, decides where a steering buffer lives (checked with a hook that says ``meta``)."""

import types

import pytest
import torch

pytest.importorskip("accelerate")

from steerheal_utils import config as C  # noqa: E402
from steerheal_utils import devices  # noqa: E402
from steerheal_utils import heal as H  # noqa: E402
from steerheal_utils.models import ModelLoadError, get_layers, load_model, model_device  # noqa: E402
from steerheal_utils.vector import SLOT_ATTR, SteeringVector, steer, steering_slots  # noqa: E402
from steerheal_utils.vector.extract import last_token_states  # noqa: E402

ROWS = [{"prompt_id": "a", "prompt": "Should I tell my manager?", "completion": "Yes, tell them kindly and soon.",
         "truncated": False, "keep": True},
        {"prompt_id": "b", "prompt": "A friend is in trouble at work.", "completion": "Help them first, the rules can",
         "truncated": True, "keep": True},
        {"prompt_id": "c", "prompt": "What now?", "completion": "Care for people.", "truncated": False, "keep": True}]


def explicit_map(n_layers: int = 4) -> dict:
    """Every module of tiny:llama named, each on the CPU (a real map, one device)."""
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n_layers)},
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def pair():
    plain, tok = load_model("tiny:llama")
    mapped, _ = load_model("tiny:llama", device_map=explicit_map())
    return plain, mapped, tok


def _batch(tok):
    ex, _ = H.encode_rows(tok, ROWS, 512)
    return H.collate(ex, tok.pad_token_id)


def test_the_map_goes_through_accelerates_hooks(pair):
    plain, mapped, _ = pair
    assert devices.is_dispatched(mapped) and not devices.is_dispatched(plain)
    assert all(hasattr(b, "_hf_hook") for b in get_layers(mapped))  # the mapped code path, not a plain .to()
    assert devices.layer_devices(mapped) == ["cpu"] * 4 and model_device(mapped) == torch.device("cpu")


def test_logits_steering_and_extraction_match_the_plain_model(pair):
    plain, mapped, tok = pair
    b = _batch(tok)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"])
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({1: torch.randn(64, generator=g), 2: torch.randn(64, generator=g)}, {1: 3.0, 2: 4.0})
    with torch.no_grad():
        assert torch.allclose(plain(**kw).logits, mapped(**kw).logits, atol=1e-5)
        with steer(plain, vec, 0.5):
            want = plain(**kw).logits
        with steer(mapped, vec, 0.5):
            got = mapped(**kw).logits
    assert torch.allclose(want, got, atol=1e-5) and not torch.allclose(want, plain(**kw).logits, atol=1e-3)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    s_p, n_p = last_token_states(plain, tok, prompts, [1, 2])
    s_m, n_m = last_token_states(mapped, tok, prompts, [1, 2])
    assert all(torch.allclose(s_p[i], s_m[i], atol=1e-5) for i in (1, 2)) and n_p == pytest.approx(n_m, rel=1e-5)


def test_heal_kl_reference_and_lora_training_match_the_plain_model():
    cfg = C.resolve("tiny", {"epochs": 1, "train_batch_size": 2, "reg": "kl", "tau_mode": "absolute", "tau": 0.0})
    runs = []
    for dm in (None, explicit_map()):
        model, tok = load_model("tiny:llama", device_map=dm)
        student, res = H.train(model, tok, ROWS, cfg, 0, seed=0, progress=False)
        with torch.no_grad():
            _, kl = H.completion_terms(student, _batch(tok), ref="base", new=res.new)
        runs.append(([v for s in res.steps for v in (s["nll"], s["D"])], kl))
    (steps_p, kl_p), (steps_m, kl_m) = runs
    assert len(steps_p) == 4 and steps_m == pytest.approx(steps_p, rel=1e-4, abs=1e-9)  # 2 steps: (nll, D) each
    assert float(kl_p.sum()) > 0 and torch.allclose(kl_p, kl_m, atol=1e-5)  # the adapter moved, in both the same


def test_a_steering_buffer_lives_on_the_blocks_execution_device():
    """accelerate computes a block on its hook's execution device even when its weights sit elsewhere;
    the preallocated steering slot follows the hook (here one that says meta), not the weights."""
    model, _ = load_model("tiny:llama")
    block = get_layers(model)[2]
    block._hf_hook = types.SimpleNamespace(execution_device="meta")
    try:
        assert devices.block_device(block) == torch.device("meta")
        with steering_slots(model, [1, 2]):
            assert getattr(get_layers(model)[1], SLOT_ATTR).device.type == "cpu"
            assert getattr(block, SLOT_ATTR).device.type == "meta"
    finally:
        del block._hf_hook


def test_offloaded_weights_are_refused():
    model, _ = load_model("tiny:llama")
    get_layers(model)[3].to("meta")  # what a map offloading a block to the CPU or disk leaves behind
    with pytest.raises(ModelLoadError, match="model.layers.3.*every weight on a device"):
        devices.check_resident(model)


def test_device_map_values_are_validated():
    assert C.resolve("tiny", ["device_map=auto"]).device_map == "auto"
    assert C.resolve("tiny", ["device_map={model.layers.0: 0, lm_head: cuda:1}"]).device_map == {
        "model.layers.0": 0, "lm_head": "cuda:1"}
    for bad, msg in (("device_map=everywhere", "not one of auto"), ("device_map={lm_head: disk}", "cannot be trained"),
                     ("device_map=3", "expected dict or str"), ("device_map={lm_head: -1}", "not a device")):
        with pytest.raises(C.ConfigError, match=msg):
            C.resolve("tiny", [bad])
    with pytest.raises(ModelLoadError, match="does not have: model.layers.9"):
        load_model("tiny:llama", device_map={**explicit_map(), "model.layers.9": "cpu"})
