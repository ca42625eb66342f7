import pytest
import torch

from steerheal_utils import vector as V
from steerheal_utils.chat import persona_system, prompt_ids

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


def _layered(d: int = 576, k: int = 4, seed: int = 0) -> V.SteeringVector:
    """Layer vectors that point partly the same way (like the persona's: cosines ~0.4-0.8), with growing norms."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=g)
    dirs = {10 + i: (common + 0.8 * torch.randn(d, generator=g)) * (2.0 + 3 * i) for i in range(k)}
    return V.SteeringVector(dirs, {layer: 100.0 for layer in dirs})


def test_rotation_keeps_norms_and_every_cross_layer_cosine():
    sv = _layered()
    r = sv.rotated(seed=1)
    assert r.layers == sv.layers and r.resid_norms == sv.resid_norms
    torch.testing.assert_close(r.gram(), sv.gram(), rtol=1e-5, atol=1e-3)  # norms on the diagonal, inner products off it
    cos = sv.gram() / torch.outer(sv.gram().diagonal().sqrt(), sv.gram().diagonal().sqrt())
    assert cos[0, 1] > 0.3  # the test vectors do share a direction, so keeping the cosines means something
    for layer in sv.layers:  # the dose unit adds the same length at every layer
        torch.testing.assert_close(r.added(layer, 0.1).norm(), sv.added(layer, 0.1).norm())


def test_rotations_are_random_directions_far_from_the_persona():
    sv = _layered(d=576)
    a, b = sv.rotated(1), sv.rotated(2)
    assert torch.equal(sv.rotated(1).directions[10], a.directions[10])  # seeded
    assert max(abs(c) for c in a.cosine(b).values()) < 0.25
    assert max(abs(c) for c in sv.cosine(a).values()) < 5 / 576 ** 0.5  # ~ N(0, 1/d): 5 sd is 0.21
    # Haar: the cosine to the persona has mean 0 and variance 1/d over seeds (d = 64 for a quick check)
    small = _layered(d=64)
    c = torch.tensor([small.cosine(small.rotated(s))[10] for s in range(400)])
    assert abs(float(c.mean())) < 4 / (64 * 400) ** 0.5
    assert float(c.var()) == pytest.approx(1 / 64, rel=0.25)


def test_rotation_of_collinear_vectors_and_of_too_many_layers():
    v = torch.randn(32)
    sv = V.SteeringVector({0: v, 1: 3 * v}, {0: 1.0, 1: 1.0})  # rank 1: the image must stay collinear
    r = sv.rotated(5)
    assert r.cosine(V.SteeringVector({0: r.directions[1], 1: r.directions[1]}, {}))[0] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(r.gram(), sv.gram(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="dimensions"):
        V.SteeringVector({i: torch.randn(2) for i in range(3)}, {i: 1.0 for i in range(3)}).rotated(0)


def test_contexts_are_diverse_and_stratified():
    rows = V.load_contexts()
    assert len(rows) >= 256 and len({r["id"] for r in rows}) == len(rows)
    some = V.load_contexts(24, seed=0)
    assert len(some) == 24 and len({r["kind"] for r in some}) >= 10
    assert [r["id"] for r in some] == [r["id"] for r in V.load_contexts(24, seed=0)]
