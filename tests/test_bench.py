"""The benchmark's CI-sized run: every stage present, sane positive numbers (no timing assertions)."""

import json
import math

from steerheal_utils.tools import bench as B
from steerheal_utils.cli import main


def test_small_bench_writes_every_stage(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--small", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    st = {r["stage"]: r for r in res["stages"]}
    want = {"vector", "generate_b8", "generate_naive_b1", "filter", "filter_naive_b1", "eval_prefix_steered",
            "eval_tinymfv_steered", "eval_naive_b1", "heal_step"}
    assert want <= set(st), sorted(want - set(st))
    for r in st.values():
        assert r["seconds"] > 0 and math.isfinite(r["seconds"])
        assert r["peak_mib"] > 0
    for name in ("vector", "generate_b8", "generate_naive_b1", "filter", "heal_step"):
        assert st[name]["tokens"] > 0 and st[name]["tokens_per_s"] > 0
    # random weights: generations forced to full length, so token counts are exact
    sz = res["meta"]["sizes"]
    assert st["generate_b8"]["tokens"] == sz["prompts"] * sz["new_tokens"]
    assert st["generate_naive_b1"]["tokens"] == sz["naive_prompts"] * sz["naive_tokens"]
    assert st["heal_step"]["tokens"] == sz["heal_batch"] * sz["heal_len"]
    for key in ("generate_b8_vs_b1", "filter_vs_b1", "eval_prefix_steered_vs_b1", "eval_tinymfv_steered_vs_b1"):
        assert res["ratios"][key] > 0
    assert 0 < st["eval_prefix_steered"]["coherence"] <= 1
    assert "generate_b8" in capsys.readouterr().out  # the table


def test_round_estimate_counts_calls_and_parts():
    from steerheal_utils.config import resolve

    cfg = resolve("gemma-3-4b")
    stages = [{"stage": "vector", "seconds": 2.0, "contexts": 128},
              {"stage": "generate_b256", "seconds": 20.0, "prompts": 256, "batch": 256},
              {"stage": "generate_compiled", "seconds": 10.0},
              {"stage": "generate_compiled_first", "seconds": 110.0},
              {"stage": "filter", "seconds": 4.0, "rows": 256},
              {"stage": "heal_step", "seconds": 0.5},
              {"stage": "eval_tinymfv_steered", "seconds": 30.0}]
    res = {"stages": stages, "meta": {"sizes": {"prompts": 256}}}
    est = B.round_estimate(res, cfg)
    calls = est["generate"]["calls"]
    from steerheal_utils.generate import probe_calls

    assert probe_calls(cfg) == 2 + cfg.calib_grid + cfg.calib_refine - 1  # the last refine call is collected
    assert calls[:probe_calls(cfg)] == [cfg.calib_probes] * probe_calls(cfg)
    assert sum(calls[probe_calls(cfg):]) <= cfg.gen_budget  # the budget counts collected rows
    assert est["parts_s"]["01_vector"] == 4.0  # 2 s for 128 contexts -> 256
    assert est["parts_s"]["02_generate"] == 10.0 * len(calls)  # compiled calls padded to full batches
    assert est["heal_steps"] == cfg.epochs * math.ceil(cfg.n_keep / cfg.train_batch_size)
    assert est["parts_s"]["05_eval"] == 30.0 * (2 + cfg.n_controls)  # steered, healed, the control band (every round)
    assert est["one_time_compile_s"] == 100.0
    assert abs(est["total_s"] - sum(est["parts_s"].values())) < 0.5


def test_collect_calls_mirror_generate_collect():
    from steerheal_utils import generate as G

    rate = 0.5
    calls = B._collect_calls(n_keep=40, budget=200, batch=32, probes_kept=8, n_probes=16, rate=rate)
    seen = []

    def gen(off, n):
        seen.append(n)
        return [{"i": off + j} for j in range(n)]

    def judge(rows):  # keeps every other row: rate 0.5
        return [r["i"] % 2 == 0 for r in rows]

    probes = [{"i": j, "reason": "keep" if j % 2 == 0 else "drop"} for j in range(16)]
    G.collect(gen, judge, n_keep=40, budget=200, batch_size=32, rows=probes)
    assert calls == seen
