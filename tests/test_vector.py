import torch

from steerheal_utils import vector as V
from steerheal_utils.models import persona_system, prompt_ids

USERS = ["Write a haiku about rain.", "What is the capital of Peru?", "Fix this: print('hi'",
         "Can you summarise the meeting notes below? We agreed to ship on Friday.", "hey, how's it going?"]


def test_batched_extraction_equals_one_by_one(tiny):
    model, tok = tiny
    layers = [1, 2]
    batched, _ = V.extract_vector(model, tok, USERS, "a helper", "a follower", layers, batch_size=8)
    single, _ = V.extract_vector(model, tok, USERS, "a helper", "a follower", layers, batch_size=1)
    for layer in layers:
        torch.testing.assert_close(batched.directions[layer], single.directions[layer], atol=1e-4, rtol=1e-4)
        assert abs(batched.resid_norms[layer] - single.resid_norms[layer]) < 1e-3 * single.resid_norms[layer]


def test_vector_is_mean_difference_at_assistant_tag():
    # A fresh model: output_hidden_states makes transformers leave recording hooks on the
    # layers, which would confuse the hook-counting tests that share the session fixture.
    from steerheal_utils.models import tiny_model

    model, tok = tiny_model("llama", seed=0)
    layer = 2
    sv, details = V.extract_vector(model, tok, USERS[:2], "a helper", "a follower", [layer], batch_size=4)
    hs = []
    for persona in ("a helper", "a follower"):
        rows = []
        for u in USERS[:2]:
            ids, tag = prompt_ids(tok, u, persona_system(persona))
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0, tag])  # hidden_states[0] is the embedding
        hs.append(torch.stack(rows).mean(0))
    torch.testing.assert_close(sv.directions[layer], hs[0] - hs[1], atol=1e-4, rtol=1e-4)
    assert len(details["proj_pos"][layer]) == 2


def test_vector_file_roundtrip(tmp_path):
    sv = V.SteeringVector({3: torch.randn(8), 4: torch.randn(8)}, {3: 10.0, 4: 12.5},
                          {"model": "tiny:llama", "round": 2, "n_contexts": 5, "persona_hash": "abc"})
    sv.save(tmp_path / "v.safetensors")
    back = V.SteeringVector.load(tmp_path / "v.safetensors")
    assert back.layers == [3, 4] and back.resid_norms == sv.resid_norms and back.meta == sv.meta
    for layer in sv.layers:
        assert torch.equal(back.directions[layer], sv.directions[layer])


def test_dose_unit_is_fraction_of_residual_norm():
    sv = V.SteeringVector({0: torch.tensor([3.0, 4.0])}, {0: 20.0})
    assert torch.allclose(sv.added(0, 0.1), torch.tensor([1.2, 1.6]))  # norm 2 = 0.1 * 20


def test_random_control_keeps_norms():
    sv = V.SteeringVector({0: torch.randn(16), 1: torch.randn(16) * 5}, {0: 1.0, 1: 1.0})
    r = sv.random_like(seed=1)
    for layer in sv.layers:
        assert abs(float(r.directions[layer].norm() - sv.directions[layer].norm())) < 1e-4
        assert abs(sv.cosine(r)[layer]) < 0.9
    assert torch.equal(sv.random_like(1).directions[0], r.directions[0])


def test_contexts_are_diverse_and_stratified():
    rows = V.load_contexts()
    assert len(rows) >= 256 and len({r["id"] for r in rows}) == len(rows)
    some = V.load_contexts(24, seed=0)
    assert len(some) == 24 and len({r["kind"] for r in some}) >= 10
    assert [r["id"] for r in some] == [r["id"] for r in V.load_contexts(24, seed=0)]
