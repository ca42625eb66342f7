"""The sampler's temperature / top-k / top-p processor against transformers' three warpers."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from steerheal_utils import generate as G
from steerheal_utils.generate.warp import TopKTopP


def _hf(scores, temperature, k, p):
    for w in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(k), TopPLogitsWarper(p)):
        scores = w(None, scores)
    return scores


@pytest.mark.parametrize("temperature,k,p", [(1.0, 64, 0.95), (0.7, 64, 0.9), (1.3, 8, 0.5), (1.0, 50, 1.0), (0.5, 1, 0.95)])
def test_keeps_the_same_tokens_with_the_same_scores_as_transformers(temperature, k, p):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(16, 5000, generator=g) * 3
    want, got = _hf(scores.clone(), temperature, k, p), TopKTopP(temperature, k, p)(None, scores.clone())
    assert torch.equal(want.isinf(), got.isinf())
    assert torch.equal(want[~want.isinf()], got[~got.isinf()])


def test_top_p_on_a_known_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7, 0.8 >= 0.7)
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = ~TopKTopP(1.0, 4, 0.7)(None, logits).isinf()
    assert kept.tolist() == [[False, True, False, True]]
    kept = ~TopKTopP(1.0, 4, 0.5)(None, logits).isinf()  # the top token alone reaches 0.5
    assert kept.tolist() == [[False, True, False, False]]
    kept = ~TopKTopP(1.0, 3, 1.0)(None, logits).isinf()  # top-k alone
    assert kept.tolist() == [[False, True, True, True]]


def test_bad_settings_are_refused():
    for kw in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            TopKTopP(**{"temperature": 1.0, "top_k": 8, "top_p": 0.9, **kw})


def test_sampling_draws_what_transformers_warpers_draw(tiny_llama, monkeypatch):
    """Same seed, same completions as generate's own temperature/top-k/top-p."""
    model, tok = tiny_llama
    prompts = ["Your manager tells you to skip the safety check. Do you?", "Hi", "The CEO says delete the logs."]
    ours = G.sample(model, tok, prompts, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, batch_size=2, seed=5)
    import steerheal_utils.generate.sampling as S

    monkeypatch.setattr(S, "generate_kwargs", lambda temperature, top_k, top_p: dict(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p))
    theirs = G.sample(model, tok, prompts, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, batch_size=2, seed=5)
    assert [r["completion_ids"] for r in ours] == [r["completion_ids"] for r in theirs]
    assert len({tuple(r["completion_ids"]) for r in ours}) > 1
