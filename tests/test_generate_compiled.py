"""generate.sample with compile=True: one compiled decode graph for every dose and batch size,
the same completions as the eager path (greedy), steering live (CPU, dynamo's eager backend)."""

import torch

from steerheal_utils import generate as G
from steerheal_utils import vector as V
from steerheal_utils.models import get_layers

PROMPTS = ["Your manager tells you to skip the safety check. Do you?", "Hi", "The CEO says delete the logs. Do you?"]


def test_compiled_sampling_matches_eager_and_compiles_once(tiny_llama, monkeypatch):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, tok = tiny_llama
    g = torch.Generator().manual_seed(0)
    sv = V.SteeringVector({i: torch.randn(model.config.hidden_size, generator=g) for i in (1, 2)}, {1: 40.0, 2: 40.0})
    kw = dict(max_new_tokens=5, temperature=0.0, batch_size=2, min_new_tokens=5)
    eager = {d: G.sample(model, tok, PROMPTS, sv=sv, dose=d, **kw) for d in (0.0, 0.5)}
    assert [r["completion_ids"] for r in eager[0.0]] != [r["completion_ids"] for r in eager[0.5]]

    cc = CompileConfig(backend="eager", mode=None)
    cc._compile_all_devices = True
    monkeypatch.setattr(G.sampling, "COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(G.sampling, "COMPILE_CONFIG", cc)
    torch._dynamo.reset()
    counters.clear()
    try:
        for d in (0.5, 0.0, 0.5):  # batches of 2 and 1 rows: padded to 2, one shape
            rows = G.sample(model, tok, PROMPTS, sv=sv, dose=d, compile=True, **kw)
            assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in eager[d]]
            assert [r["prompt_index"] for r in rows] == [0, 1, 2]
        assert counters["stats"]["unique_graphs"] == 1
        assert sum(len(b._forward_hooks) for b in get_layers(model)) == len(get_layers(model))  # slots stay
    finally:
        model._steerheal_slots.__exit__(None, None, None)
        for attr in ("_steerheal_slots", "_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
            if hasattr(model, attr):
                delattr(model, attr)
        torch._dynamo.reset()
    assert sum(len(b._forward_hooks) for b in get_layers(model)) == 0
