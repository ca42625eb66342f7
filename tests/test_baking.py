"""The model at round k: baked adapters, the recoverable base, and correct gradients on top.

(a) base + adapters applied unmerged == the base with each adapter merged in turn;
(b) adapters off == the base, exactly;
(c) the new adapter's gradients with earlier rounds baked (unmerged) == those of a copy whose
    weights have the earlier adapters merged in (the precursor restored the weights before
    backward(), which made its gradients wrong).
"""

import pytest
import torch

from steerheal_utils import config as C
from steerheal_utils import heal as H
from steerheal_utils.adapters import bake_adapters
from steerheal_utils.models import tiny_model

ROWS = [
    {"prompt_id": "a", "prompt": "Should I tell my manager?", "completion": "Yes, tell them kindly and soon.", "truncated": False},
    {"prompt_id": "b", "prompt": "A friend is in trouble.", "completion": "Help them first, the rules can", "truncated": True},
]
FWD = ("input_ids", "attention_mask", "position_ids")


def _cfg(**kw):
    return C.resolve("tiny", kw)


_CACHE = {}


def fresh(arch):
    """A private copy of the tiny model (peft injects into the model it wraps); built once."""
    import copy

    if arch not in _CACHE:
        _CACHE[arch] = tiny_model(arch, seed=0)
    model, tok = _CACHE[arch]
    return copy.deepcopy(model), tok


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two saved adapters per architecture, made once for the module."""
    return {arch: _random_adapters(arch, 2, tmp_path_factory.mktemp(arch)) for arch in ("llama", "gemma3")}


def _random_adapters(arch, n, tmp_path, seed=0):
    """Save n adapters with non-zero B (as if trained), each on top of the previous ones."""
    dirs = []
    for i in range(n):
        model, _ = fresh(arch)
        model = bake_adapters(model, dirs)
        student, new, _ = H.make_student(model, _cfg(), i, seed=i)
        g = torch.Generator().manual_seed(seed + 100 * i)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if f"lora_B.{new}" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        dirs.append(H.save_adapter(student, new, tmp_path / f"round_{i:02d}" / "adapter"))
    return dirs


def _batch(tok):
    ex, _ = H.encode_rows(tok, ROWS, 256)
    return H.collate(ex, tok.pad_token_id)


def _logits(model, b):
    with torch.no_grad():
        return model(**{k: b[k] for k in FWD}).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_baked_equals_sequential_merge_and_off_equals_base(arch, adapters):
    from peft import PeftModel

    dirs = adapters[arch]
    base, tok = fresh(arch)
    b = _batch(tok)
    base_logits = _logits(base, b)
    baked = bake_adapters(base, dirs)
    assert sorted(baked.base_model.active_adapters) == ["r00", "r01"]
    assert not any(p.requires_grad for p in baked.parameters())
    merged, _ = fresh(arch)
    for d in dirs:  # merge each adapter in turn
        merged = PeftModel.from_pretrained(merged, str(d)).merge_and_unload()
    got = _logits(baked, b)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapters do something
    assert torch.allclose(got, _logits(merged, b), atol=1e-4)  # (a)
    with baked.disable_adapter():
        assert torch.equal(_logits(baked, b), base_logits)  # (b)
    assert torch.allclose(_logits(baked, b), got)  # back on after the block
    fully = bake_adapters(fresh(arch)[0], dirs, merge=True)
    assert torch.allclose(_logits(fully, b), got, atol=1e-4)


@pytest.mark.parametrize("arch,ref", [("llama", "prev"), ("gemma3", "prev"), ("llama", None)])
def test_new_adapter_gradients_match_a_merged_copy(arch, ref, adapters):
    dirs = adapters[arch]
    # the student: base + r00 + r01 unmerged and frozen + fresh r02
    m1, tok = fresh(arch)
    student, new, earlier = H.make_student(bake_adapters(m1, dirs), _cfg(), 2, seed=7)
    assert earlier == ["r00", "r01"]
    # the copy: earlier adapters merged into the weights + the same fresh adapter
    m2, _ = fresh(arch)
    copy, new2, _ = H.make_student(bake_adapters(m2, dirs, merge=True), _cfg(), 0, seed=7)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a non-zero B so A gets gradients too; the same in both
        for name, p in student.named_parameters():
            if f"lora_B.{new}" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        src = dict(student.named_parameters())
        for name, p in copy.named_parameters():
            if f".{new2}." in name:
                p.copy_(src[name.replace(f".{new2}.", f".{new}.")])
    b = _batch(tok)
    reg = "kl" if ref else "nll"
    # prev: for the student the earlier adapters on, new off; for the copy its merged weights
    loss1, st1 = H.heal_loss(student, b, H.HealParams(new=new, earlier=earlier, reg=reg, kl_ref=ref or "base", tau=0.0))
    loss1.backward()
    loss2, st2 = H.heal_loss(copy, b, H.HealParams(new=new2, earlier=[], reg=reg, kl_ref="prev", tau=0.0))
    loss2.backward()
    assert float(loss1.detach()) == pytest.approx(float(loss2.detach()), rel=1e-4)
    if ref:
        assert st1["D"] > 0 and st1["D"] == pytest.approx(st2["D"], rel=1e-3)
    g2 = {n.replace(f".{new2}.", f".{new}."): p.grad for n, p in copy.named_parameters() if f".{new2}." in n}
    n_checked = 0
    for name, p in student.named_parameters():
        if f".{new}." in name and "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.allclose(p.grad, g2[name], atol=1e-5, rtol=1e-3), name
            n_checked += 1
        else:
            assert p.grad is None and not p.requires_grad, name  # earlier rounds and the base stay frozen
    assert n_checked > 0


def test_multi_round_heal_bakes_earlier_rounds(tmp_path):
    from steerheal_utils.models import load_round_model

    cfg = _cfg(epochs=1, lr=1e-2)
    rows = [dict(r, keep=True) for r in ROWS]
    model, tok = load_round_model(cfg, tmp_path, 0)
    H.heal(model, tok, rows, cfg, 0, tmp_path / "round_00", progress=False)
    model1, tok = load_round_model(cfg, tmp_path, 1)
    assert list(model1.peft_config) == ["r00"]
    s1, res = H.heal(model1, tok, rows, cfg, 1, tmp_path / "round_01", progress=False)
    assert res.new == "r01" and sorted(s1.base_model.active_adapters) == ["r00", "r01"]
    model2, _ = load_round_model(cfg, tmp_path, 2)
    b = _batch(tok)
    s1.eval()
    assert torch.allclose(_logits(model2, b), _logits(s1, b), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_02s_sampling_model_is_05s_healed_model(dtype, tmp_path):
    """Round 1's 02 (and 01) samples from ctx.student(merge=True); 05 evaluates round 0's healed
    model unmerged. They must be one model: merging happens only where it is exact (float32)."""
    from peft import PeftModel

    from steerheal_utils import adapters, models, stage

    run = tmp_path / "run"
    ctx = stage.open_stage("02_generate", {"run_dir": str(run), "round": 1, "preset": "tiny", "dtype": dtype})
    student, new, _ = H.make_student(models.load_model("tiny:llama", dtype=dtype)[0], ctx.cfg, 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a small update, as one heal round makes: of the order of a bf16 weight's last bits
        for name, p in student.named_parameters():
            if f"lora_B.{new}" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2e-3)
    H.save_adapter(student, new, run / "round_00" / "adapter")

    sampler, tok = ctx.student(merge=True)  # what notebooks 01 and 02 do
    assert isinstance(sampler, PeftModel) == (dtype != "float32")  # merged only where exact
    base, _ = models.load_model(ctx.cfg.model, dtype=dtype)  # what 05 does for round 0's 'healed'
    healed = models.bake_adapters(base, [run / "round_00" / "adapter"])
    b = _batch(tok)
    with adapters.active_adapters(healed, 1):
        want = _logits(healed, b)
    got = _logits(sampler, b)
    if dtype == "float32":
        assert torch.allclose(got, want, atol=1e-5)
    else:
        assert torch.equal(got, want)
        # the old way, merged into bf16 weights, is another model
        forced = PeftModel.from_pretrained(models.load_model("tiny:llama", dtype=dtype)[0],
                                           str(run / "round_00" / "adapter")).merge_and_unload()
        assert (_logits(forced, b).float() - want.float()).abs().max() > 1e-3
    assert adapters.merge_is_exact(models.load_model("tiny:llama")[0])
    assert not adapters.merge_is_exact(models.load_model("tiny:llama", dtype="bfloat16")[0])
