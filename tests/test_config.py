import dataclasses

import pytest

from steerheal_utils import config as C


def test_every_knob_has_a_meaning():
    for f in dataclasses.fields(C.Config):
        assert f.metadata.get("help"), f"{f.name} has no help text"


@pytest.mark.parametrize("preset", list(C.PRESETS))
def test_presets_resolve(preset):
    cfg = C.resolve(preset)
    assert isinstance(cfg, C.Config)


def test_override_parsing_and_types():
    cfg = C.resolve("tiny", ["dose=0.3", "layers=[1,2]", "controls=prompted", "epochs=2", "dose_halflife=8"])
    assert cfg.dose == 0.3 and cfg.layers == [1, 2] and cfg.controls == ["prompted"] and cfg.epochs == 2
    assert C.resolve("tiny", ["dose=null"]).dose is None
    assert C.resolve("tiny", {"lr": 1}).lr == 1.0  # an int is a fine float


@pytest.mark.parametrize("item, words", [
    ("dosee=0.3", ["unknown config key 'dosee'", "dose"]),
    ("epochs=two", ["epochs", "integer"]),
    ("epochs=0", ["epochs", "out of range"]),
    ("kl_agg=median", ["kl_agg", "mean", "rmse", "p95", "max"]),
    ("top_p=1.5", ["top_p", "out of range"]),
    ("trust_remote_code=maybe", ["trust_remote_code", "true or false"]),
    ("layer_lo=0.9", ["layer_lo", "layer_hi"]),
    ("controls=[prompted,steered]", ["controls", "steered"]),
    ("noequals", ["key=value"]),
])
def test_bad_values_name_the_key(item, words):
    with pytest.raises(C.ConfigError) as e:
        C.resolve("tiny", [item])
    for w in words:
        assert w in str(e.value)


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="tiny"):
        C.resolve("huge")


def test_save_load_roundtrip(tmp_path):
    cfg = C.resolve("tiny", ["seed=7", "layers=[1]"])
    C.save_config(cfg, tmp_path / "config.yaml", {"git_commit": "abc"})
    assert C.load_config(tmp_path / "config.yaml") == cfg
    assert "_meta" in (tmp_path / "config.yaml").read_text()
    assert C.config_diff(cfg, C.resolve("tiny", ["seed=8", "layers=[1]"])) == ["seed: 7 -> 8"]


def test_depth_band():
    assert C.depth_band(34, 0.45, 0.55) == [15, 16, 17, 18]
    assert C.depth_band(4, 0.5, 0.5) == [2]
    assert C.resolve("tiny", ["layers=[3,1,3]"]).steered_layers(4) == [1, 3]
    with pytest.raises(C.ConfigError, match="out of range"):
        C.resolve("tiny", ["layers=[9]"]).steered_layers(4)


def test_run_config_from_a_saved_file_then_set(tmp_path):
    from steerheal_utils.cli import run_config

    C.save_config(C.resolve("tiny", ["seed=7", "lr=0.00001"]), tmp_path / "config.yaml", {"git_commit": "abc"})
    cfg = run_config("default", str(tmp_path / "config.yaml"), ["seed=9"])
    assert cfg.model == "tiny:llama" and cfg.lr == 1e-5 and cfg.seed == 9  # the file beats the preset, --set beats the file
    assert run_config("tiny", None, []) == C.resolve("tiny")
    with pytest.raises(C.ConfigError, match="no config"):
        run_config("tiny", str(tmp_path / "missing.yaml"), [])


# ------------------------------------------------------------------ sections and tables declared once
def test_the_kl_tables_are_the_configs_choices():
    from steerheal_utils import kl

    assert C.knob_field("kl_agg").metadata["choices"] == tuple(kl.AGGREGATES) == ("mean", "rmse", "p95", "max")
    assert C.knob_field("kl_dir").metadata["choices"] == tuple(kl.DIRECTIONS) == ("reverse", "forward")
    for name in kl.AGGREGATES:
        assert C.resolve("tiny", {"kl_agg": name}).kl_agg == name
    with pytest.raises(C.ConfigError, match="not one of mean, rmse, p95, max"):
        C.resolve("tiny", {"kl_agg": "median"})


def test_sections_derive_the_heal_keys_and_the_filter_thresholds():
    from steerheal_utils.filter import FilterThresholds
    from steerheal_utils.heal import HEAL_KEYS

    assert HEAL_KEYS == C.section_keys("heal") and HEAL_KEYS[0] == "lora_r" and "q1_prompts" in HEAL_KEYS
    gates = {f.name: f.default for f in dataclasses.fields(FilterThresholds)}
    assert list(gates) == [k for k in C.section_keys("filter") if k != "min_train"]
    assert gates == {k: C.default(k) for k in gates}  # one default per knob: the config's
    assert FilterThresholds.from_config(C.resolve("tiny", {"max_drift": 0.25})).max_drift == 0.25
    every = [k for s in C.SECTIONS for k in C.section_keys(s)]
    assert sorted(every) == sorted(f.name for f in dataclasses.fields(C.Config))  # each knob in one section
    with pytest.raises(ValueError, match="section"):
        C.knob(1, "x", section="nowhere")


def test_reading_the_config_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, steerheal_utils.config, steerheal_utils.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
