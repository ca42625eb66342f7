import pytest
import torch

from steerheal_utils import batching, chat
from steerheal_utils import models as M


def test_assistant_tag_position_chatml(tiny_llama):
    _, tok = tiny_llama
    ids, pos = chat.prompt_ids(tok, "What is 2+2?", system="You are terse.")
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert pos == len(ids) - 1
    header_ids = chat.encode(tok, "<|im_start|>assistant\n")
    assert ids[-len(header_ids):] == header_ids
    assert "You are terse." in text


def test_assistant_tag_position_gemma3_folds_system(tiny_gemma3):
    _, tok = tiny_gemma3
    ids, pos = chat.prompt_ids(tok, "What is 2+2?", system="You are terse.")
    text = tok.decode(ids)
    assert chat.assistant_header(tok) == "<start_of_turn>model\n"
    assert text.endswith("<start_of_turn>model\n") and pos == len(ids) - 1
    # Gemma 3 has no system turn: the persona sits at the start of the first user turn.
    assert "<start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>" in text
    assert "system" not in text


def test_system_folded_when_template_rejects_it(tiny_llama):
    _, tok = tiny_llama
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<u>{{ m['content'] }}</u>{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    msgs = chat.chat_messages(strict, "hi", "Be kind.")
    assert msgs == [{"role": "user", "content": "Be kind.\n\nhi"}]
    assert chat.render_prompt(strict, "hi", "Be kind.") == "<u>Be kind.\n\nhi</u><a>"


def test_left_pad_positions():
    ids, mask, pos = batching.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_forward_equals_one_by_one(tiny):
    model, tok = tiny
    seqs = [chat.prompt_ids(tok, u)[0] for u in ["Hello", "A much longer message about the weather today", "Hi there you"]]
    ids, mask, pos = batching.left_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        for i, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-4, rtol=1e-4)


def test_tiny_models_are_deterministic_and_distinct():
    a, _ = M.tiny_model("llama", seed=3)
    b, _ = M.tiny_model("llama", seed=3)
    c, _ = M.tiny_model("llama", seed=4)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert M.n_layers(a) == 4
    # load_model("tiny:...") honours its seed (it used to build seed 0 whatever it was given)
    la, lc = M.load_model("tiny:llama", seed=3)[0], M.load_model("tiny:llama", seed=4)[0]
    assert torch.equal(next(la.parameters()), pa) and torch.equal(next(lc.parameters()), pc)
    assert torch.equal(next(M.load_model("tiny:llama")[0].parameters()), next(M.tiny_model("llama", seed=0)[0].parameters()))


def test_load_model_errors_are_explained(tmp_path):
    with pytest.raises(M.ModelLoadError, match="no such folder"):
        M.load_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(M.ModelLoadError, match="tiny:llama"):
        M.load_model("tiny:mamba")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model(str(empty))
    assert "empty_model" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_unreachable_hub_id_is_explained():
    # HF_HUB_OFFLINE=1 (conftest): an id that is not cached cannot be fetched.
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model("nobody-here/no-such-model-xyz")
    msg = str(e.value)
    assert "nobody-here/no-such-model-xyz" in msg and "local folder" in msg


def test_dtype_device_defaults():
    cpu = torch.device("cpu")
    assert M.resolve_dtype("auto", cpu) == torch.float32
    assert M.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert M.resolve_dtype("bfloat16", cpu) == torch.bfloat16
