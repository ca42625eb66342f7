"""Random-vector controls matched in effect: the dose search on known curves, the KL match on a tiny
model, the band summary, and a 1-round tiny run that carries the band and the CIs into metrics.csv."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from steerheal_utils import controls as K
from steerheal_utils.models import tiny_model
from steerheal_utils.vector import extract_vector


# ------------------------------------------------------------------ the search on known curves
def test_quadratic_kl_is_matched_in_one_step():
    m = K.match_dose(lambda d: 3.0 * d ** 2, target=0.12, start=0.1)
    assert m["matched"] and m["dose"] == pytest.approx(0.2) and m["steps"] == 2 and m["ratio"] == pytest.approx(2.0)
    assert m["trace"][0] == [0.1, pytest.approx(0.03)] and m["reason"] is None


@pytest.mark.parametrize("curve", [lambda d: d ** 3 + 0.1 * d,  # not a power law: the secant has to iterate
                                   lambda d: 1 - math.exp(-40 * d * d),  # saturating
                                   lambda d: 0.02 * d])  # slope 1, not 2
def test_other_monotone_curves_are_matched_within_tolerance(curve):
    target = curve(0.3)
    m = K.match_dose(curve, target, start=0.05, tol=0.02, max_dose=5.0)
    assert m["matched"], m
    assert abs(m["kl"] / target - 1) <= 0.02 and m["steps"] <= 12


def test_a_kl_that_cannot_reach_the_target_is_flagged_at_the_bound():
    m = K.match_dose(lambda d: 0.5 * (1 - math.exp(-d)), target=0.9, start=0.1, max_dose=1.0)
    assert not m["matched"] and m["dose"] == 1.0 and m["trace"][-1][0] == 1.0
    assert "cannot be matched inside the bound" in m["reason"]


def test_non_finite_kl_counts_as_overshoot():
    curve = lambda d: 100 * d ** 4 if d < 0.15 else float("nan")  # noqa: E731 - logits blow up above 0.15
    m = K.match_dose(curve, target=curve(0.14), start=0.1, tol=0.05)
    assert m["matched"] and m["dose"] < 0.15
    assert any(math.isnan(kl) for _, kl in m["trace"])


def test_zero_dose_needs_no_search():
    m = K.match_dose(lambda d: pytest.fail("not called"), target=0.0, start=0.0)
    assert m["matched"] and m["dose"] == 0.0 and m["steps"] == 0


# ------------------------------------------------------------------ on a tiny model
@pytest.fixture(scope="module")
def model_and_vector():
    model, tok = tiny_model("llama", seed=0)
    model.eval()
    sv, _ = extract_vector(model, tok, ["hello", "write a poem", "sum 2 and 3", "a story about a cat"],
                           "someone kind", "someone strict", [1, 2])
    return model, tok, sv


def test_kl_is_zero_unsteered_and_grows_with_the_dose(model_and_vector):
    model, tok, sv = model_and_vector
    prompts = K.kl_prompts(tok, 6)
    assert len(prompts) == 6
    ref = K.tag_logprobs(model, tok, prompts)
    assert K.tag_kl(model, tok, prompts, sv, 0.0, ref=ref) == pytest.approx(0.0, abs=1e-9)
    kls = [K.tag_kl(model, tok, prompts, sv, d, ref=ref) for d in (0.1, 0.2, 0.4)]
    assert 0 < kls[0] < kls[1] < kls[2]
    assert K.tag_kl(model, tok, prompts, sv, 0.2) == pytest.approx(kls[1], rel=1e-6)  # ref computed inside


def test_matched_controls_have_the_persona_kl_within_tolerance(model_and_vector):
    model, tok, sv = model_and_vector
    prompts = K.kl_prompts(tok, 6)
    target, band = K.match_band(model, tok, sv, 0.3, [11, 12, 13], prompts=prompts, tol=0.1)
    assert target > 0 and len(band) == 3
    for ctl, m in band:
        assert m["matched"], m
        assert abs(m["kl"] / target - 1) <= 0.1
        assert K.tag_kl(model, tok, prompts, ctl, m["dose"]) == pytest.approx(m["kl"], rel=1e-5)  # recorded = measured
        torch.testing.assert_close(ctl.gram(), sv.gram(), rtol=1e-5, atol=1e-4)
        rec = K.match_record(m, ctl)
        assert rec["persona_dose"] == 0.3 and rec["kl_matched"] and rec["control_seed"] == m["seed"]
    assert all(abs(m["ratio"] - 1) > 0.05 for _, m in band)  # a rotation at the persona's dose is not matched here
    assert band[1][1]["trace"][0][0] == pytest.approx(band[0][1]["dose"])  # warm start at the dose the first one needed


def test_a_bound_too_tight_is_reported(model_and_vector):
    model, tok, sv = model_and_vector
    prompts = K.kl_prompts(tok, 4)
    m = K.KLMatcher(model, tok, sv, 0.3, prompts, max_ratio=1.0)
    res = [m.match(sv.rotated(s)) for s in (1, 2, 3, 4)]
    # at ratio 1 a control is matched only if it happens to be within 10% at the persona's dose
    for r in res:
        assert r["dose"] <= 0.3 + 1e-12
        assert r["matched"] == (abs(r["kl"] / m.target - 1) <= 0.1)
        if not r["matched"] and r["kl"] < m.target:
            assert "cannot be matched" in r["reason"]


# ------------------------------------------------------------------ the band
def test_band_summary_places_the_persona():
    members = {K.control_name(i): {"axis_logodds": v, "care_nats": -2.0, "auth_nats": -1.0 - v, "coherence": 0.9,
                                   "control_seed": i, "dose": 0.1 + i, "dose_ratio": 1.0, "tag_kl": 0.5,
                                   "kl_matched": i != 2, "persona_dose": 0.1, "persona_tag_kl": 0.5}
               for i, v in enumerate((0.0, 0.1, 0.2, 0.3))}
    persona = {"axis_logodds": 0.5, "care_nats": -2.0, "auth_nats": -1.2, "coherence": 0.95}
    base = {"axis_logodds": 0.05, "care_nats": -2.1, "auth_nats": -1.0, "coherence": 0.96}
    band = K.band_summary(persona, members, base)
    assert band["unmatched"] == ["random_02"] and band["persona_tag_kl"] == 0.5 and len(band["members"]) == 4
    pos = band["position"]["axis_logodds"]
    assert pos["rank"] == 1.0 and pos["mean"] == pytest.approx(0.15)
    assert pos["z"] == pytest.approx((0.5 - 0.15) / torch.tensor([0.0, 0.1, 0.2, 0.3]).std().item())
    assert band["position"]["auth_nats"]["rank"] == 0.375  # -1.2 in (-1.0, -1.1, -1.2, -1.3): one below, one tie
    assert band["position"]["care_nats"]["z"] is None  # a band without spread
    d = band["delta_position"]["axis_logodds"]
    assert d["value"] == pytest.approx(0.45) and d["z"] == pytest.approx(pos["z"]) and d["rank"] == pos["rank"]
    assert [r["metric"] for r in K.band_table({"control_band": band})] == list(band["position"])
    assert K.is_control_name("random_07") and not K.is_control_name("random") and not K.is_control_name("random_x")


# ------------------------------------------------------------------ through the driver
@pytest.mark.slow  # one tiny round through papermill: ~1-2 min quiet, ~4 min on shared cores
def test_tiny_round_writes_the_band_and_the_intervals(tmp_path):
    env = {**__import__("os").environ, "STEERHEAL_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "run", "--preset", "tiny", "--rounds", "1",
                        "--run-dir", str(run), "--set", "dose=0.3", "--set", "n_boot=200"],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((run / "round_00" / "eval.json").read_text())
    assert {"base", "prompted", "steered", "random_00", "random_01", "healed"} == set(ev["conditions"])
    band = ev["control_band"]
    assert [m["name"] for m in band["members"]] == ["random_00", "random_01"] and band["persona_dose"] == 0.3
    for m in band["members"]:
        assert m["kl_matched"] is (abs(m["tag_kl"] / band["persona_tag_kl"] - 1) <= 0.1)
        assert m["dose"] != 0.3  # scaled, not copied
    assert set(band["position"]) == {"axis_logodds", "care_nats", "auth_nats", "coherence"}
    healed = ev["conditions"]["healed"]
    lo, hi = healed["ci"]["auth_nats"]
    assert lo <= healed["auth_nats"] <= hi and lo < hi
    assert "delta_vs_base" in healed and "delta_vs_base" not in ev["conditions"]["base"]
    with open(run / "metrics.csv") as f:
        rows = {row["condition"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["base", "prompted", "random", "random_00", "random_01", "steered", "healed"]
    for stage in ("base", "steered", "healed"):
        assert float(rows[stage]["auth_nats_lo"]) <= float(rows[stage]["auth_nats"]) <= float(rows[stage]["auth_nats_hi"])
        assert rows[stage]["interval"] == "bootstrap"
    assert rows["base"]["delta_auth_nats"] == "" and rows["healed"]["delta_auth_nats_lo"] != ""
    assert rows["random"]["interval"] == "band_min_max" and rows["random"]["n_controls"] == "2"
    assert float(rows["random"]["axis_logodds_lo"]) == min(float(rows[f"random_0{i}"]["axis_logodds"]) for i in (0, 1))
    assert rows["steered"]["axis_logodds_band_rank"] in ("0", "0.5", "1")
    assert float(rows["steered"]["tag_kl"]) == pytest.approx(band["persona_tag_kl"], rel=1e-5)
    html = (run / "report.html").read_text()
    assert "Control band" in html and "random band" in html


def test_band_matches_are_saved_and_read_back_by_fingerprint(tmp_path):
    from steerheal_utils.vector import SteeringVector

    sv = SteeringVector({0: torch.randn(8), 1: torch.randn(8)}, {0: 1.0, 1: 1.0})
    band = [(K.control_name(i), sv.rotated(s)) for i, s in enumerate(K.control_seeds(3, 2))]
    made = []

    class Fake:
        target = 0.5

        def match(self, vec):
            made.append(vec.meta["control_seed"])
            return K.match_dose(lambda d: d * d, 0.5, 0.1, first=None)

    path = tmp_path / "control_match.json"
    a = K.band_matches(path, "fp-1", Fake, band)
    assert list(a) == ["random_00", "random_01"] and made == K.control_seeds(3, 2)
    assert a["random_01"]["seed"] == K.control_seeds(3, 2)[1] and json.loads(path.read_text())["persona_tag_kl"] == 0.5
    assert K.band_matches(path, "fp-1", lambda: pytest.fail("recomputed"), band) == a  # same inputs: read back
    K.band_matches(path, "fp-2", Fake, band)  # another persona dose / vector / adapters: matched again
    assert len(made) == 4
    assert K.control_seeds(3, 2) != K.control_seeds(4, 2) and len(set(K.control_seeds(3, 8))) == 8
