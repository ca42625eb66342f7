"""Bootstrap intervals and the control band on known cases (steerheal_utils/stats.py)."""

import math

import pytest
import torch

from steerheal_utils import evaluate as E
from steerheal_utils import stats


def _rows(p: torch.Tensor, mass: torch.Tensor, coarse):
    return [{"id": f"v{i}", "foundation_coarse": c, "p": p[i].tolist(), "mass": mass[i].tolist()} for i, c in enumerate(coarse)]


def test_constant_sample_gives_a_zero_width_interval():
    idx = stats.bootstrap_indices(30, 500, seed=1)
    s = stats.probe_stats(torch.full((30,), -0.25), idx)
    assert stats.percentile_ci(s["axis_logodds"]) == (-0.25, -0.25)
    assert stats.percentile_ci(s["axis_care_rate"]) == (0.0, 0.0)


def test_bernoulli_mean_interval_is_close_to_the_normal_approximation():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(400, generator=g) < 0.3).double()  # one probe item per draw: log-odds > 0 counts as 'care'
    idx = stats.bootstrap_indices(len(x), 4000, seed=2)
    lo, hi = stats.percentile_ci(stats.probe_stats(x - 0.5, idx)["axis_care_rate"])
    m = float(x.mean())
    half = 1.959964 * math.sqrt(m * (1 - m) / len(x))
    assert lo < m < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(m, abs=0.01)


def test_paired_deltas_of_identical_models_are_exactly_zero():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(40, 7, generator=g), -1)
    mass = torch.rand(40, 2, generator=g)
    coarse = [E.FOUNDATIONS[i % 7] for i in range(40)]
    arr = stats.vignette_arrays(_rows(p, mass, coarse), {f"v{i}": i % 7 for i in range(40)})
    items = torch.randn(12, generator=g)
    vidx, pidx = stats.bootstrap_indices(40, 300, 0), stats.bootstrap_indices(12, 300, 1)
    a = stats.condition_samples(arr, items, vidx, pidx)
    b = stats.condition_samples(stats.align(arr, list(reversed(arr["ids"]))), items.tolist(), vidx, pidx)
    point = {k: float(v[0]) for k, v in a.items()}
    u = stats.uncertainty(a, point, a, point)
    assert set(u["delta_vs_base"]) == set(stats.METRICS)
    for m, d in u["delta_vs_base"].items():
        assert (d["delta"], d["lo"], d["hi"]) == (0.0, 0.0, 0.0), m
    # the same rows in another order are another resample (align reorders; pairing is by position)
    assert not torch.equal(a["coherence"], b["coherence"])


def test_pairing_cancels_what_both_models_share():
    """Items differ a lot, models differ by a constant: the paired delta is exact, each CI is wide."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(52, generator=g) * 2
    idx = stats.bootstrap_indices(52, 1000, 5)
    sa, sb = stats.probe_stats(base + 0.1, idx), stats.probe_stats(base, idx)
    u = stats.uncertainty(sa, {"axis_logodds": float((base + 0.1).mean())}, sb, {"axis_logodds": float(base.mean())})
    d = u["delta_vs_base"]["axis_logodds"]
    assert d["delta"] == pytest.approx(0.1) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(0.1)
    lo, hi = u["ci"]["axis_logodds"]
    assert hi - lo > 0.5
    assert stats.excludes_zero(d["lo"], d["hi"]) and not stats.excludes_zero(lo, hi)


def test_point_estimate_matches_the_eval_summary():
    g = torch.Generator().manual_seed(6)
    lp = torch.log_softmax(torch.randn(21, 2, 7, generator=g), -1) - 0.4  # mass < 1 like a real model
    coarse = [E.FOUNDATIONS[i % 7] for i in range(21)]
    human = torch.rand(21, 7, generator=g)
    summ = E.summarize(lp, coarse, human)
    sc = E.score_logprobs(lp)
    arr = stats.vignette_arrays(_rows(sc["p"], sc["mass"], coarse), {f"v{i}": int(human[i].argmax()) for i in range(21)})
    point = stats.vignette_stats(arr, torch.arange(21)[None])
    for m in stats.VIGNETTE_METRICS:
        assert float(point[m][0]) == pytest.approx(summ[m], rel=1e-9, abs=1e-12), m
    items = torch.randn(9, generator=g)
    pp = stats.probe_stats(items, torch.arange(9)[None])
    assert float(pp["axis_logodds"][0]) == pytest.approx(float(items.mean()))


def test_resamples_without_a_foundation_are_left_out_of_its_interval():
    p = torch.full((5, 7), 1 / 7)
    p[0] = torch.tensor([0.0, 0, 0, 1.0, 0, 0, 0])
    arr = stats.vignette_arrays(_rows(p, torch.ones(5, 2), ["Authority", "Care", "Care", "Care", "Care"]))
    s = stats.vignette_stats(arr, stats.bootstrap_indices(5, 400, 0))
    assert torch.isnan(s["on_diag_authority"]).any()  # some resamples drew no Authority row
    assert stats.percentile_ci(s["on_diag_authority"]) == (1.0, 1.0)
    assert torch.isnan(s["agreement"]).all()  # no human majority given
    assert all(math.isnan(v) for v in stats.percentile_ci(s["agreement"]))


def test_indices_are_seeded():
    assert torch.equal(stats.bootstrap_indices(10, 20, 3), stats.bootstrap_indices(10, 20, 3))
    assert not torch.equal(stats.bootstrap_indices(10, 20, 3), stats.bootstrap_indices(10, 20, 4))
    with pytest.raises(ValueError):
        stats.bootstrap_indices(0, 20, 3)


def test_band_position_z_and_rank():
    pos = stats.band_position(5.0, [1.0, 2.0, 3.0, 4.0])
    assert pos["rank"] == 1.0 and pos["mean"] == 2.5 and pos["min"] == 1.0 and pos["max"] == 4.0
    assert pos["z"] == pytest.approx(2.5 / math.sqrt(5 / 3))  # sd with ddof=1 of 1..4
    assert stats.band_position(0.0, [1.0, 2.0])["rank"] == 0.0
    assert stats.band_position(2.0, [1.0, 2.0, 3.0, 4.0])["rank"] == pytest.approx(1.5 / 4)  # a tie counts half
    flat = stats.band_position(2.0, [2.0, 2.0])
    assert flat["z"] is None and flat["rank"] == 0.5
    assert stats.band_position(None, [1.0])["z"] is None and stats.band_position(1.0, [None, float("nan")])["n"] == 0


def test_mean_over_seeds_averages_per_resample():
    a = {"x": torch.tensor([1.0, 3.0]), "y": torch.tensor([0.0, 0.0])}
    b = {"x": torch.tensor([3.0, 5.0])}
    assert torch.equal(stats.mean_over_seeds([a, b])["x"], torch.tensor([2.0, 4.0]))
    assert set(stats.mean_over_seeds([a, b])) == {"x"}


def test_unscorable_rows_drop_out_of_every_statistic_but_keep_their_place():
    # tiny-mfv's unscorable rows carry p = None: the statistics are those of the scorable rows alone,
    # and the row keeps its index so a paired resample still lines up with the other model's rows
    good = [{"id": f"v{i}", "foundation_coarse": "Care", "p": [0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], "mass": [0.5, 0.7]}
            for i in range(3)]
    bad = {"id": "vx", "foundation_coarse": "Care", "p": None, "mass": None}
    human = {r["id"]: 0 for r in good + [bad]}
    with_bad = stats.vignette_arrays(good + [bad], human)
    alone = stats.vignette_arrays(good, human)
    assert with_bad["valid"].tolist() == [True, True, True, False]
    a = stats.vignette_stats(with_bad, torch.arange(4)[None])
    b = stats.vignette_stats(alone, torch.arange(3)[None])
    for k in b:
        assert torch.allclose(a[k], b[k], equal_nan=True), k
    assert a["agreement"].item() == 1.0 and abs(a["coherence"].item() - 0.6) < 1e-12
