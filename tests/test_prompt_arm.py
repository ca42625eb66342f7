"""The prompt-distillation arm (data_source: prompt): 02 samples with the persona as system prompt
and no steering hooks; its rows train and score under the plain prompt; the study has the arm."""

import pytest

from steerheal_utils import config as C
from steerheal_utils import generate as G
from steerheal_utils import stage
from steerheal_utils.chat import persona_system, render_prompt
from steerheal_utils.models import get_layers
from steerheal_utils.runfolder import read_json, read_jsonl


def _ctx(tmp_path, **over):
    return stage.open_stage("02_generate", {"run_dir": str(tmp_path / "run"), "round": 0, "preset": "tiny",
                                            "n_keep": 4, "gen_budget": 6, "max_new_tokens": 8, **over})


def test_prompt_source_samples_with_the_persona_system_prompt_and_no_hooks(tmp_path, tiny_llama, monkeypatch):
    ctx = _ctx(tmp_path, data_source="prompt")
    model, tok = ctx.student(merge=True)
    system = persona_system(ctx.cfg.pos_persona)
    calls = []
    real = model.generate

    def spy(*a, **kw):  # what the model is asked to continue, and which hooks are live while it does
        calls.append({"prompts": tok.batch_decode(kw["input_ids"]),
                      "hooks": sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in get_layers(model))})
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    res = G.run_stage(ctx)  # no vector.safetensors in the run: the prompt arm must not need one
    assert calls, "02 never sampled"
    assert all(c["hooks"] == 0 for c in calls), "a steering hook was live while sampling the prompt arm"
    assert all(system in p for c in calls for p in c["prompts"]), "a prompt was sampled without the persona"

    s = read_json(ctx.artifact("generate_summary"))
    assert s == res.summary and s["dose"] is None and s["data_source"] == "prompt" and s["system"] == system
    assert s["calibration_path"] == [] and read_jsonl(ctx.artifact("calibration")) == []
    rows = read_jsonl(ctx.artifact("generated"))
    assert len(rows) == s["n_generated"] and 1 <= len(rows) <= ctx.cfg.gen_budget
    for r in rows:
        assert set(G.ROW_KEYS) <= set(r) and r["system"] == system and r["dose"] is None
        # 03 scores and 04 trains under the plain prompt: the persona is what gets distilled
        assert r["prompt_text"] == render_prompt(tok, r["prompt"]) and system not in r["prompt_text"]
    assert res.vector is None and [f.layout.title.text for f in G.figures(res)][-1].endswith("no vector")


def test_steer_source_is_the_default_and_the_knob_is_checked():
    assert C.resolve("tiny").data_source == "steer"
    assert C.resolve("default").data_source == "steer"
    with pytest.raises(C.ConfigError, match="data_source"):
        C.resolve("tiny", {"data_source": "vector"})


def test_sample_renders_the_system_prompt_only_when_given(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=4, batch_size=2, temperature=0.0)
    plain = G.sample(model, tok, ["Hi"], **kw)[0]
    sys_ = G.sample(model, tok, ["Hi"], system="You are a pirate.", **kw)[0]
    assert "You are a pirate." in sys_["prompt_text"] and "pirate" not in plain["prompt_text"]
    assert sys_["prompt_text"] == render_prompt(tok, "Hi", "You are a pirate.")


def test_study_has_the_prompt_arm_with_the_rmse_heal():
    from steerheal_utils.tools import study

    cfg, ref = study.arm_config("prompt", 0, preset="tiny"), study.arm_config("rmse", 0, preset="tiny")
    assert cfg.data_source == "prompt" and ref.data_source == "steer"
    assert cfg.kl_agg == ref.kl_agg == "rmse" and cfg.reg == ref.reg
    # it cannot share 01-03 of round 0 with the steered arms (its 02 differs), only 01
    study.check_shareable([ref, study.arm_config("mean", 0, preset="tiny"), cfg])
    assert study.shared_stages(ref, cfg) == study.SHARED_STAGES[:1]
    assert study.shared_stages(ref, study.arm_config("mean", 0, preset="tiny")) == study.SHARED_STAGES


def test_prompt_arm_copies_only_round0s_vector_and_its_record(tmp_path):
    import os
    import time

    from conftest import fake_round
    from steerheal_utils import contract
    from steerheal_utils.driver import init_run
    from steerheal_utils.markers import Checker
    from steerheal_utils.tools import study

    ref, arm = study.arm_config("rmse", 0, preset="tiny"), study.arm_config("prompt", 0, preset="tiny")
    src, dst = tmp_path / "rmse-s0", tmp_path / "prompt-s0"
    init_run(src, ref)
    init_run(dst, arm)
    fake_round(src, 0, ref, stages=contract.STAGES[:1])
    time.sleep(0.05)  # 02-03 written after 01's record: the mtime rule must leave them out
    fake_round(src, 0, ref, stages=contract.STAGES[1:3])
    later = time.time() + 1
    for s in contract.STAGES[1:3]:
        for n in contract.step(s).writes:
            os.utime(contract.path(src, 0, n), (later, later))
    rec = study.share_round0(src, dst, study.shared_stages(ref, arm))
    assert rec["stages"] == ["01_vector"]
    assert contract.path(dst, 0, "vector").read_bytes() == contract.path(src, 0, "vector").read_bytes()
    assert not contract.path(dst, 0, "generated").exists() and not contract.marker_path(dst, 0, "02_generate").exists()
    assert contract.marker_path(dst, 0, "01_vector").exists()
    assert not [p for p in Checker(dst).problems() if p.round == 0 and "01" in p.label]  # 01's record holds there
