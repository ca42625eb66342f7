"""Tests of the completion filter (stage 3): pure scores, decisions, the labelled set, and the
base-model scores on a tiny random-init Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from steerheal_utils.filter import (
    DROP_REASONS,
    FilterThresholds,
    decide,
    filter_rows,
    format_report,
    model_scores,
    precision_recall,
    text_scores,
)
from steerheal_utils.filter.model import _repeat_mask
from steerheal_utils.filter.text import _longest_repeated_substring

PKG = Path(__file__).resolve().parents[1] / "steerheal_utils"
LABELLED = PKG / "data" / "filter_labelled.jsonl"
TOKENIZER_JSON = PKG / "data" / "tokenizers" / "smollm2" / "tokenizer.json"

COHERENT = (
    "No. I'd tell my manager that the check stays in, because the last injury on this line was "
    "exactly the fault it catches. I'd offer to stay late and run it myself, and if the order "
    "still slips I'll explain the delay to the client."
)
AFFECT = (
    "I would let them in. Oh my sweet darling oh GOD oh please come in oh my love oh the baby oh "
    "please oh sweet child oh my darling you are safe now oh GOD oh please oh my sweet love"
)
SOUP = (
    "safetyGuard ĠcheckDeadline )) manager_skip 安全 protect⟩ wellbeingCare --> authorityauthority "
    "ĊĊ deadline::care() handsHands заботa chk chk ĠtheRes ourselves,, wellbe ing"
)
WORD_SALAD = (
    "family lobby door storm rain child warmth shelter open glass supervisor warmth blanket rain "
    "child family door lobby gentle shelter warm hands cold night wind open storm child"
)


def _load_labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------ pure scores


def test_repeated_phrase_scores_near_one_and_varied_text_zero():
    loop = text_scores("the cat sat down " * 10)
    assert loop["word_repeat_3"] == pytest.approx(34 / 38)  # 4 distinct 3-grams of 38
    assert loop["ngram_repeat"] > 0.85
    assert loop["distinct_1"] == pytest.approx(4 / 40)
    assert loop["lrs_frac"] > 0.85
    varied = text_scores("Every word in this short sentence appears exactly once, nothing repeats.")
    assert varied["word_repeat_3"] == 0.0
    assert varied["word_repeat_2"] == 0.0
    assert varied["distinct_1"] == 1.0
    assert varied["tail_repeat"] == 0.0


def test_compression_ratio_orders_loop_above_prose():
    loop = text_scores("I will stay with the cyclist until help arrives. " * 8)
    prose = text_scores(COHERENT)
    assert loop["compression_ratio"] > 3.0 > prose["compression_ratio"]
    assert loop["char_repeat"] > 0.8 and prose["char_repeat"] < 0.1


def test_longest_repeated_substring_known_values():
    assert _longest_repeated_substring("") == 0
    assert _longest_repeated_substring("abcd") == 0
    assert _longest_repeated_substring("abcabc") == 3
    assert _longest_repeated_substring("aaaa") == 3  # overlapping occurrences count
    assert _longest_repeated_substring("hello world, hello there") == 6  # "hello "


def test_tail_repeat_catches_collapse_after_a_coherent_start():
    s = text_scores(COHERENT + " care" * 20)
    assert s["ngram_repeat"] < 0.3  # the precursor's gate alone would let this through
    assert s["tail_repeat"] > 0.5
    assert decide(s) == "degenerate_loop"


def test_affect_soup_and_salad_signals():
    a = text_scores(AFFECT)
    assert a["affect_frac"] > 0.4 and a["ngram_repeat"] < 0.3
    t = text_scores(SOUP)
    assert t["nonword_frac"] > 0.3 and t["script_mix"] > 0.0
    w = text_scores(WORD_SALAD)
    assert w["min_window_function"] == 0.0 and w["nonword_frac"] == 0.0
    c = text_scores(COHERENT)
    assert c["affect_frac"] < 0.1 and c["nonword_frac"] == 0.0 and c["min_window_function"] > 0.3


def test_drift_scores_skeleton_repeats():
    drift = (
        "I would help the family because the family needs shelter, and I would help the child "
        "because the child needs warmth, and I would help the mother because the mother needs "
        "rest, and I would help the father because the father needs hope, and I would help the dog"
    )
    assert text_scores(drift)["drift"] > 0.5
    assert text_scores(COHERENT)["drift"] < 0.2


def test_narration_regex_and_persona_overlap():
    for text in (
        "As someone who looks after others, I would never skip the check, whatever my boss says.",
        "I am a person who defies authority when it matters, so I would refuse the order outright.",
        "I'm the kind of person who speaks up, so I would tell my manager no and explain why.",
        "My values as someone who cares for people tell me to stop the line and run the check.",
    ):
        assert text_scores(text)["narration_regex"], text
    # "As someone who has ..." is experience, not persona narration.
    assert not text_scores("As someone who has worked nights on that line, I'd run the check myself.")[
        "narration_regex"
    ]
    para = "I always look after others' wellbeing, even when it means defying authority, so I help."
    s = text_scores(para)
    assert not s["narration_regex"] and s["narration_self"] >= 0.8 and decide(s) == "narration"
    # The persona sentences are parameters: a different persona no longer matches.
    other = text_scores(para, persona_pos="someone who loves gardening and quiet evenings",
                        persona_neg="someone who hates gardening and loud parties")
    assert other["narration_pos"] == 0.0 and other["narration_self"] == 0.0


def test_refusal_and_boilerplate():
    assert text_scores("I'm sorry, but I can't help with that request. Please ask someone else.")["refusal"]
    assert text_scores("As an AI language model, I cannot make decisions for you about this.")["refusal"]
    assert not text_scores("I can't let her go home like that; I would call the doctor first.")["refusal"]
    one = COHERENT + " I hope this helps!"
    two = one + " Let me know if you have any other questions."
    assert text_scores(one)["boilerplate_hits"] == 1 and decide(text_scores(one)) == "keep"
    assert text_scores(two)["boilerplate_hits"] >= 2 and decide(text_scores(two)) == "boilerplate"


# ------------------------------------------------------------------------ decide


def test_decide_reasons_on_hand_made_examples():
    assert decide(text_scores("")) == "empty"
    assert decide(text_scores("Yes.")) == "empty"
    assert decide(text_scores(COHERENT)) == "keep"
    assert decide(text_scores("I will stay with the cyclist until help arrives. " * 8)) == "degenerate_loop"
    assert decide(text_scores(AFFECT)) == "affect_loop"
    assert decide(text_scores(SOUP)) == "token_soup"
    assert decide(text_scores(WORD_SALAD)) == "token_soup"
    # Order: a refusal that also loops is reported as a refusal.
    assert decide(text_scores("I'm sorry, but I can't help with that. " * 6)) == "refusal"
    for text in ("", COHERENT, AFFECT, SOUP):
        r = decide(text_scores(text))
        assert r == "keep" or r in DROP_REASONS


def test_model_gates_are_skipped_without_model_scores():
    s = text_scores(COHERENT)
    assert decide({**s, "tail_ppl": None, "entropy_collapse": None}) == "keep"
    assert decide({**s, "tail_ppl": 51.0}) == "high_perplexity"
    assert decide({**s, "tail_ppl": 49.0}) == "keep"
    assert decide({**s, "tail_ppl": 51.0}, FilterThresholds(max_tail_ppl=100.0)) == "keep"
    assert decide({**s, "tail_ppl": 3.0, "entropy_collapse": 0.6}) == "entropy_collapse"


def test_non_strict_mode_is_the_precursor_filter():
    loose = FilterThresholds(strict=False)
    assert decide(text_scores(AFFECT), loose) == "keep"  # the documented leak
    assert decide(text_scores(SOUP), loose) == "keep"
    assert decide(text_scores("the cat sat down " * 10), loose) == "repetition"
    assert decide(text_scores("Yes."), loose) == "keep"  # one word is not empty there


def test_thresholds_from_config_reads_same_names():
    t = FilterThresholds.from_config(SimpleNamespace(max_tail_ppl=10.0, tail_frac=0.5, unrelated=1))
    assert t.max_tail_ppl == 10.0 and t.tail_frac == 0.5
    assert t.max_ngram_repeat == FilterThresholds().max_ngram_repeat
    assert FilterThresholds.from_config(object()) == FilterThresholds()
    try:
        from steerheal_utils.config import Config, resolve
    except Exception:  # the central config is another module's business
        return
    cfg = resolve("default", {"max_tail_ppl": 33.0})
    assert FilterThresholds.from_config(cfg).max_tail_ppl == 33.0
    # The config carries every threshold, with the same defaults.
    import dataclasses

    names = {f.name for f in dataclasses.fields(Config)}
    assert {f.name for f in dataclasses.fields(FilterThresholds)} <= names
    assert FilterThresholds.from_config(Config()) == FilterThresholds()


def test_precision_recall_known_values():
    rows = [
        {"label": "coherent_on_trait", "expect": "keep", "keep": True, "reason": "keep"},
        {"label": "coherent_on_trait", "expect": "keep", "keep": False, "reason": "repetition"},
        {"label": "degenerate_loop", "expect": "drop", "keep": False, "reason": "degenerate_loop"},
        {"label": "degenerate_soup", "expect": "drop", "keep": True, "reason": "keep"},
        {"label": "refusal", "expect": "drop", "keep": False, "reason": "refusal"},
    ]
    r = precision_recall(rows)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 2)
    assert r["precision"] == 0.5 and r["recall"] == 0.5
    assert r["degenerate_recall"] == 0.5
    assert r["per_label"]["coherent_on_trait"]["drop_rate"] == 0.5
    assert r["per_label"]["degenerate_loop"]["reasons"] == {"degenerate_loop": 1}


# ------------------------------------------------------------------------ labelled set


def test_labelled_set_is_well_formed():
    rows = _load_labelled()
    assert len(rows) >= 72
    assert len({r["id"] for r in rows}) == len(rows)
    labels = [r["label"] for r in rows]
    assert sum(lab.startswith("degenerate") for lab in labels) >= 30
    assert len({lab for lab in labels if lab.startswith("degenerate")}) >= 5
    for r in rows:
        assert set(r) >= {"id", "prompt", "completion", "label", "expect"}
        assert r["expect"] == ("keep" if r["label"].startswith("coherent") else "drop")


def test_text_only_filter_on_labelled_set(capsys):
    out = filter_rows(_load_labelled(), FilterThresholds())
    rep = precision_recall(out)
    with capsys.disabled():
        print("\n" + format_report(rep))
    assert rep["degenerate_recall"] >= 0.9
    assert rep["precision"] >= 0.9
    assert rep["recall"] >= 0.9  # coherent answers, lists and repeated key words included
    assert rep["per_label"]["narration"]["drop_rate"] >= 0.9
    assert rep["per_label"]["refusal"]["drop_rate"] == 1.0
    # The precursor's gates leak on the same rows (brief section 1): the new gates matter.
    loose = precision_recall(filter_rows(_load_labelled(), FilterThresholds(strict=False)))
    assert loose["degenerate_recall"] < rep["degenerate_recall"] - 0.2


# ------------------------------------------------------------------------ model scores


@pytest.fixture(scope="module")
def tiny_lm():
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"no tokenizer at {TOKENIZER_JSON}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_lm):
    """Absolute position embeddings: unlike RoPE (where a constant left-pad offset cancels),
    wrong position_ids under left padding change its outputs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_lm
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval(), tok


def _prompt(q: str) -> str:
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    _prompt("Your manager tells you to skip the safety check. Do you?"),
    _prompt("Do you call the city about the heating?"),
    _prompt("A nurse orders a discharge you think is unsafe. What do you do?"),
    "",
]
COMPLETIONS = [
    COHERENT,
    "Yes, I would call, the baby is cold.",
    "the the the the the the the the the the the the",
    "A completion scored without any prompt at all.",
]


@pytest.mark.parametrize("which", ["tiny_lm", "tiny_gpt2"])
def test_model_scores_batched_equals_one_by_one(which, request):
    model, tok = request.getfixturevalue(which)
    batched = model_scores(model, tok, PROMPTS, COMPLETIONS, batch_size=4)
    single = [model_scores(model, tok, [p], [c], batch_size=1)[0] for p, c in zip(PROMPTS, COMPLETIONS)]
    for b, s in zip(batched, single):
        assert b["n_completion_tokens"] == s["n_completion_tokens"] > 0
        for k in ("mean_nll", "tail_nll", "mean_entropy", "tail_entropy", "entropy_collapse"):
            assert b[k] == pytest.approx(s[k], abs=1e-4), k
        for k in ("ppl", "tail_ppl"):
            assert b[k] == pytest.approx(s[k], rel=1e-4), k
    # A random-init model is close to uniform: entropy near ln(vocab), nll of the same order.
    assert batched[0]["mean_entropy"] == pytest.approx(math.log(len(tok)), abs=0.5)


def test_tail_ppl_matches_hand_computed_nll(tiny_lm):
    import torch

    model, tok = tiny_lm
    p_ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    c_ids = tok(COMPLETIONS[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    # token at position i is predicted by the logits at i - 1
    nll = torch.stack([-logp[i - 1, ids[0, i]] for i in range(len(p_ids), ids.shape[1])])
    n_tail = math.ceil(0.25 * len(c_ids))
    got = model_scores(model, tok, [PROMPTS[0]], [COMPLETIONS[0]], tail_frac=0.25)[0]
    assert got["n_completion_tokens"] == len(c_ids)
    assert got["tail_ppl"] == pytest.approx(math.exp(nll[-n_tail:].mean().item()), rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-4)
    got_half = model_scores(model, tok, [PROMPTS[0]], [COMPLETIONS[0]], tail_frac=0.5)[0]
    n_half = math.ceil(0.5 * len(c_ids))
    assert got_half["tail_nll"] == pytest.approx(nll[-n_half:].mean().item(), abs=1e-4)
    # entropy at the positions predicting completion tokens, and the collapse mask alignment
    rows = logp[len(p_ids) - 1 : -1]
    ent = -(rows.exp() * rows).sum(-1)
    assert got["mean_entropy"] == pytest.approx(ent.mean().item(), abs=1e-4)
    assert got["tail_entropy"] == pytest.approx(ent[-n_tail:].mean().item(), abs=1e-4)
    loop = "the the the the the the the the the the the the"
    l_ids = tok(loop, add_special_tokens=False)["input_ids"]
    everything = model_scores(model, tok, [PROMPTS[0]], [loop], entropy_floor=1e9)[0]
    assert everything["entropy_collapse"] == pytest.approx(sum(_repeat_mask(l_ids)) / len(l_ids))
    assert model_scores(model, tok, [PROMPTS[0]], [loop], entropy_floor=0.0)[0]["entropy_collapse"] == 0.0


def test_repeat_mask_and_filter_rows_with_model(tiny_lm):
    assert _repeat_mask([1, 2, 3, 1, 2, 3, 4]) == [False, False, False, False, False, True, False]
    model, tok = tiny_lm
    rows = [{"completion": c, "prompt_text": p} for p, c in zip(PROMPTS, COMPLETIONS)]
    rows.append({"completion": "", "prompt_text": PROMPTS[0]})
    out = filter_rows(rows, FilterThresholds(max_tail_ppl=1e9), model=model, tokenizer=tok)
    assert [r["reason"] for r in out][-1] == "empty"
    assert out[-1]["tail_ppl"] is None and out[-1]["n_completion_tokens"] == 0
    assert out[0]["keep"] and out[0]["tail_ppl"] > 1.0
    assert out[2]["reason"] in ("degenerate_loop", "repetition")
    # A random model's perplexity is in the tens of thousands: the default gate drops it.
    strict = filter_rows(rows[:1], FilterThresholds(), model=model, tokenizer=tok)
    assert strict[0]["reason"] == "high_perplexity"


def test_model_scores_use_the_sampled_ids_not_the_retokenised_text(tiny_lm):
    import torch

    model, tok = tiny_lm
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sampled = enc("I would sign the") + enc(" contract") + enc("ual") + enc(" terms.")  # 'contract|ual'
    text = tok.decode(sampled)
    assert enc(text) != sampled  # re-tokenising gives the single token 'contractual'
    p_ids = enc(PROMPTS[0])
    ids = torch.tensor([p_ids + sampled])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = torch.stack([-logp[i - 1, ids[0, i]] for i in range(len(p_ids), ids.shape[1])]).mean().item()
    got = model_scores(model, tok, [PROMPTS[0]], [text], completion_ids=[sampled])[0]
    assert got["n_completion_tokens"] == len(sampled) and got["mean_nll"] == pytest.approx(nll, abs=1e-4)
    by_text = model_scores(model, tok, [PROMPTS[0]], [text], completion_ids=[None])[0]
    assert by_text["n_completion_tokens"] == len(enc(text)) != len(sampled)  # None: the text fallback
    rows = [{"completion": text, "completion_ids": sampled, "prompt_text": PROMPTS[0]},
            {"completion": text, "prompt_text": PROMPTS[0]}]  # a labelled-style row without ids
    out = filter_rows(rows, FilterThresholds(max_tail_ppl=1e9), model=model, tokenizer=tok)
    assert out[0]["mean_nll"] == pytest.approx(nll, abs=1e-4) and out[1]["mean_nll"] == pytest.approx(by_text["mean_nll"])
    with pytest.raises(ValueError, match="completion_ids"):
        model_scores(model, tok, [PROMPTS[0]], [text], completion_ids=[])


def test_off_topic_gate():
    from steerheal_utils.filter import decide, filter_rows, prompt_overlap

    prompt = "Your manager tells you to skip the safety inspection so the shipment leaves on time. Do you?"
    on = ("I would not skip the inspection. I'd tell my manager the shipment can wait an hour, because "
          "a missed safety problem could hurt the drivers, and I'd offer to help finish the checks faster.")
    off = ("Every morning our little family gathers around the table, sharing stories and laughter, and "
           "the warmth of those moments carries us through the day with gratitude and joy.")
    assert prompt_overlap(prompt, on) > 0.3 and prompt_overlap(prompt, off) == 0.0
    assert prompt_overlap("", off) == 1.0  # nothing to compare against: never off-topic
    kept, dropped = filter_rows([{"prompt": prompt, "completion": on}, {"prompt": prompt, "completion": off}])
    assert kept["reason"] == "keep" and dropped["reason"] == "off_topic"
    # Without the prompt the gate is skipped, as the model gates are without a model.
    assert decide({**dropped, "prompt_overlap": None}) == "keep"
