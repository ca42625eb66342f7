"""The steerability sweep: dose grid, recommendation, and one tiny sweep end to end (shapes, monotone
dose axis, the band with the persona's geometry and KL-matched per dose, files, figures)."""

import csv
import io
import json
import math

import pytest
import torch

from steerheal_utils import cli, controls
from steerheal_utils.vector import steerability as S


def test_dose_grid_is_log_spaced_increasing_and_checked():
    g = S.dose_grid(0.005, 0.6, 6)
    assert len(g) == 6 and g[0] == 0.005 and g[-1] == 0.6
    assert all(b > a for a, b in zip(g, g[1:]))
    ratios = [b / a for a, b in zip(g, g[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    for bad in ((0.0, 1.0, 3), (0.5, 0.1, 3), (0.1, 1.0, 1)):
        with pytest.raises(S.SteerabilityError):
            S.dose_grid(*bad)


def test_recommend_says_no_dose_when_the_persona_stays_in_the_band():
    t = [{"vector": "persona", "dose_index": k, "persona_dose": d, "dose": d, "delta_axis_logodds": 0.2,
          "delta_axis_logodds_lo": 0.05, "coherence": 0.9} for k, d in enumerate((0.1, 0.2))]
    t += [{"vector": "random_00", "dose_index": k, "persona_dose": d, "dose": 2 * d, "delta_axis_logodds": 0.3}
          for k, d in enumerate((0.1, 0.2))]
    r = S.recommend(t, coh_floor=0.5)
    assert r["dose"] is None and r["range"] is None and r["reason"].startswith("NO DOSE")
    t[-1]["delta_axis_logodds"] = 0.0  # at 0.2 the band is below the persona's CI
    assert S.recommend(t, coh_floor=0.5)["dose"] == 0.2
    assert S.recommend(t, coh_floor=0.95)["dose"] is None  # incoherent everywhere
    assert S.per_nat(1.0, 0.5, 1.5, 0.0) == (None, None, None)


@pytest.mark.slow  # 10 tiny evals + KL matching: ~25 s of test time on the shared cores (80 s with imports)
def test_tiny_sweep_end_to_end(tmp_path, tiny_llama, monkeypatch):
    seen = []  # (persona dose, control vector) of every KL match the sweep asked for
    real = controls.KLMatcher.match

    def spy(self, control):
        seen.append((self.dose, self.vector, control))
        return real(self, control)

    monkeypatch.setattr(controls.KLMatcher, "match", spy)
    png = tmp_path / "fig.png"
    code = cli.main(["steerability", "tiny", "--doses", "3", "--lo", "0.05", "--hi", "0.8", "--out", str(tmp_path),
                     "--png", str(png), "--set", "n_controls=2", "--set", "eval_max_rows=8", "--set", "probe_max_items=4",
                     "--set", "n_boot=200"])
    assert code == 0
    rec = json.loads((tmp_path / "steerability.json").read_text())
    table = list(csv.DictReader(io.StringIO((tmp_path / "steerability.csv").read_text())))
    # shapes: one row per dose and vector; the dose axis is the grid, increasing
    assert len(rec["table"]) == len(table) == 3 * (1 + 2)
    persona = [r for r in rec["table"] if r["vector"] == "persona"]
    assert [r["persona_dose"] for r in persona] == rec["doses"] == pytest.approx(S.dose_grid(0.05, 0.8, 3))
    assert [r["dose_index"] for r in persona] == [0, 1, 2]
    for r in rec["table"]:
        for m in S.METRICS:
            assert r[f"{m}_lo"] <= r[f"{m}_hi"] and math.isfinite(r[m]), (r["vector"], m)
            assert r[f"delta_{m}_lo"] <= r[f"delta_{m}_hi"]
        assert r["heldout_kl"] >= 0 and math.isfinite(r["heldout_kl"])
    # the held-out KL of the persona grows with its dose
    kls = [r["heldout_kl"] for r in persona]
    assert kls == sorted(kls) and kls[-1] > 0
    # the band: 2 controls per dose, matched against the persona at that dose, with its geometry
    assert len(seen) == 3 * 2 and sorted({d for d, _, _ in seen}) == pytest.approx(rec["doses"])
    for _, sv, ctl in seen:
        assert ctl.layers == sv.layers
        for layer in sv.layers:
            assert ctl.directions[layer].norm() == pytest.approx(float(sv.directions[layer].norm()), rel=1e-4)
        for a in sv.layers:
            for b in sv.layers:
                cos = lambda v: float(torch.nn.functional.cosine_similarity(v.directions[a], v.directions[b], dim=0))
                assert cos(ctl) == pytest.approx(cos(sv), abs=1e-4)
        assert not torch.allclose(ctl.directions[sv.layers[0]], sv.directions[sv.layers[0]])
    for b, d in zip(rec["bands"], rec["doses"]):
        assert b["dose"] == pytest.approx(d) and len(b["members"]) == 2
        assert set(b["position"]) >= set(S.METRICS)
    assert "recommended" in rec and ("NO DOSE" in rec["recommended"]["reason"]) == (rec["recommended"]["dose"] is None)
    fig = S.figure(rec)
    assert len(fig.data) == len(S.PANELS) * 3  # per panel: 2 controls + the persona
    assert png.read_bytes()[:4] == b"\x89PNG"
