"""loop=online: the schedule, a tiny online checkpoint, resume after a crash to the same result,
and the barrier acting on each online batch."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from steerheal_utils import config as C
from steerheal_utils import contract, online, stage
from steerheal_utils.runfolder import read_jsonl

# 3 steps in one checkpoint, the vector re-read at step 2; tau 0: every batch with D > 0 is above it
ONLINE = {"loop": "online", "dose": 0.1, "online_batch": 3, "online_every": 3, "online_steps": 3,
          "online_refresh": 2, "max_new_tokens": 8, "tau": 0.0, "lr": 1e-3, "n_contexts": 4}


def test_config_online_needs_a_dose_and_absolute_tau():
    with pytest.raises(C.ConfigError, match="loop=online needs a fixed dose"):
        C.resolve("tiny", {"loop": "online"})
    with pytest.raises(C.ConfigError, match="tau_mode=absolute"):
        C.resolve("tiny", {"loop": "online", "dose": 0.1, "tau_mode": "quantile"})
    with pytest.raises(C.ConfigError, match="loop"):
        C.resolve("tiny", {"loop": "batch"})
    for preset in C.PRESETS:  # every preset has online values that make whole checkpoints
        cfg = C.resolve(preset, {"loop": "online", "dose": 0.1})
        assert cfg.online_steps % cfg.online_every == 0 and cfg.online_batch >= 1


def test_schedule_segments_and_refresh():
    cfg = C.resolve("tiny", {**ONLINE, "online_steps": 7, "online_every": 3})
    assert online.checkpoints(cfg) == 3
    assert [list(online.segment(cfg, r)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6], []]
    assert [s for s in range(7) if online.refresh_due(s, 0, 2)] == [2, 4, 6]  # not 0: the start of a checkpoint...
    assert not online.refresh_due(3, 3, 3) and online.refresh_due(6, 3, 3)   # ...where 01 just read it
    assert not any(online.refresh_due(s, 0, 0) for s in range(7))


def test_contract_online_loop_producers():
    assert contract.loop_stages("online") == ("01_vector", "06_online", "05_eval")
    assert contract.producer("adapter", "online") == "06_online" and contract.producer("adapter") == "04_heal"
    assert contract.producer("generate_summary", "online") == "06_online"
    assert contract.producer("online_steps") == "06_online"
    # 05 reads nothing the online loop does not write
    for name, _ in contract.inputs("05_eval", 1):
        assert contract.producer(name, "online") in contract.ONLINE_STAGES
    with pytest.raises(contract.ContractError):
        contract.loop_stages("batch")


def _start(run, overrides):
    """A run folder with round 0's vector (01), ready for 06."""
    from steerheal_utils import vector
    from steerheal_utils.driver import init_run

    init_run(run, C.resolve("tiny", overrides))
    vector.run_stage(stage.open_stage("01_vector", {"run_dir": str(run), "round": 0}))


def _online(run, **kw):
    return online.run_stage(stage.open_stage("06_online", {"run_dir": str(run), "round": 0}), **kw)


class Crash(RuntimeError):
    pass


def _no_seconds(steps):
    return [{k: v for k, v in s.items() if k != "seconds"} for s in steps]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """One uninterrupted tiny online checkpoint."""
    run = tmp_path_factory.mktemp("online") / "run"
    _start(run, ONLINE)
    return run, _online(run)


def test_tiny_online_checkpoint_writes_a_round(online_run):
    run, res = online_run
    for name in contract.step("06_online").writes:
        if contract.artifact(name).kind != "cache":
            assert contract.path(run, 0, name).exists(), name
    assert not contract.path(run, 0, "online_state").exists()  # removed once the checkpoint is written
    assert [s["step"] for s in res.steps] == [0, 1, 2] and [s["refreshed"] for s in res.steps] == [False, False, True]
    rows = read_jsonl(contract.path(run, 0, "completions"))
    assert len(rows) == 9 and {r["step"] for r in rows} == {0, 1, 2}
    assert [s["kept"] for s in res.steps] == [sum(r["keep"] for r in rows if r["step"] == k) for k in range(3)]
    assert res.summary["dose"] == 0.1 and res.summary["tokens"]["collection"] == sum(s["gen_tokens"] for s in res.steps)
    written = online.read_steps(contract.path(run, 0, "online_steps"))
    assert [w["kept"] for w in written] == [s["kept"] for s in res.steps]


def test_barrier_acts_on_every_online_batch(online_run):
    """tau = 0: every heal step after the first (where the fresh adapter equals the base, D = 0)
    has D above tau, a positive barrier and a loss above its NLL; and on a batch the loop trained
    on, the barrier's gradient is not zero (and is zero when tau is above that batch's D)."""
    from steerheal_utils import heal as H
    from steerheal_utils.models import load_round_model

    run, res = online_run
    trained = [s for s in res.steps if s["trained"]]
    assert len(trained) >= 2
    for s in trained[1:]:
        assert s["D"] > 0 and s["barrier"] > 0 and s["hinge_frac"] == 1.0 and s["loss"] > s["nll"]

    cfg = C.resolve("tiny", ONLINE)
    model, tok = load_round_model(cfg, run, 0)
    model, new, earlier = H.make_student(model, cfg, 0)
    from peft import set_peft_model_state_dict

    sd = load_file(str(contract.path(run, 0, "adapter") / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, {k: v for k, v in sd.items()}, adapter_name=new)
    kept = [r for r in read_jsonl(contract.path(run, 0, "completions")) if r["keep"]][:3]
    examples, _ = H.encode_rows(tok, kept, cfg.max_seq_len)
    batch = H.collate(examples, tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(tau):
        hp = H.HealParams.from_config(cfg, new, earlier)
        hp.tau = tau
        loss, stats = H.heal_loss(model, batch, hp)
        return torch.autograd.grad(loss, params), stats

    g_off, off = grads(1e9)   # D below tau: NLL only
    g_on, on = grads(0.0)     # D above tau: NLL + lam * barrier
    assert off["barrier"] == 0.0 and on["barrier"] > 0 and on["D"] > 0
    diff = max(float((a - b).abs().max()) for a, b in zip(g_on, g_off))
    assert diff > 0
    g_off2, _ = grads(1e9)
    assert all(torch.equal(a, b) for a, b in zip(g_off, g_off2))


def test_resume_after_a_crash_gives_the_same_checkpoint(online_run, tmp_path):
    """Crash right after step 1's state is saved, resume: the same adapter, telemetry and rows as
    the uninterrupted run (CPU, bit for bit)."""
    ref_run, ref = online_run
    run = tmp_path / "run"
    from steerheal_utils.driver import init_run

    init_run(run, C.resolve("tiny", ONLINE))
    contract.round_dir(run, 0).mkdir(parents=True)
    shutil.copy(contract.path(ref_run, 0, "vector"), contract.path(run, 0, "vector"))  # 01 is deterministic

    def crash(s):
        if s == 1:
            raise Crash(f"killed after step {s}")

    with pytest.raises(Crash):
        _online(run, on_step=crash)
    assert contract.path(run, 0, "online_state").exists() and not contract.path(run, 0, "adapter").exists()
    res = _online(run)
    assert res.resumed_at == 2
    assert _no_seconds(res.steps) == _no_seconds(ref.steps)
    a = load_file(str(contract.path(run, 0, "adapter") / "adapter_model.safetensors"))
    b = load_file(str(contract.path(ref_run, 0, "adapter") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(contract.path(run, 0, "completions")) == read_jsonl(contract.path(ref_run, 0, "completions"))


def test_a_state_of_another_config_is_not_resumed(online_run, tmp_path):
    ref_run, _ = online_run
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    src = contract.path(run, 0, "online_state")
    # a state written for other inputs (a different fingerprint) must be ignored, not loaded
    from steerheal_utils.online.state import read_state

    assert read_state(src) is None  # none left after a finished checkpoint
    src.write_bytes(b"not a state")
    assert read_state(src) is None


@pytest.mark.slow
def test_driver_runs_the_online_loop_with_report(tmp_path):
    """`steerheal run --set loop=online`: 01, 06 and 05 per checkpoint, metrics rows and the report."""
    import csv

    from steerheal_utils.driver import run_loop

    run = tmp_path / "run"
    cfg = C.resolve("tiny", {**ONLINE, "online_every": 1, "online_steps": 2, "controls": [], "eval_max_rows": 6})
    run_loop(run, cfg, 5)  # capped at the 2 checkpoints
    assert not contract.round_dir(run, 2).exists()
    for rnd in (0, 1):
        for s in contract.ONLINE_STAGES:
            assert contract.marker_path(run, rnd, s).exists()
        assert not contract.marker_path(run, rnd, "04_heal").exists()
    rows = list(csv.DictReader(contract.run_path(run, "metrics").open()))
    assert {int(r["round"]) for r in rows} == {0, 1} and {"healed", "steered"} <= {r["condition"] for r in rows}
    assert contract.run_path(run, "report").exists()
    from steerheal_utils.online.compare import arm_summary, healed_difference

    a = arm_summary(run)  # the docs/online table reads an online run like a round-based one
    assert a["loop"] == "online" and a["rounds"] == 2 and a["generated"] == 6 and a["optimizer_steps"] <= 2
    assert all(v["delta"] == 0 for v in healed_difference(run, run).values())
