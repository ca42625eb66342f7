"""The round contract: the table is consistent, the docs are generated from it, and the stages
(run as their notebooks run them) use only the artifacts and config keys it declares."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from steerheal_utils import config as C
from steerheal_utils import contract

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, begin
    return text.split(begin, 1)[1].split("\n", 1)[1].split(end, 1)[0]


def test_architecture_and_readme_are_generated_from_the_table():
    arch = (ROOT / "ARCHITECTURE.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert _block(arch, "<!-- begin contract", "<!-- end contract -->") == contract.stage_graph_markdown()
    tree = "```\n" + contract.run_folder_tree() + "```\n"
    assert _block(arch, "<!-- begin run folder", "<!-- end run folder -->") == tree
    assert _block(readme, "<!-- begin run folder", "<!-- end run folder -->") == tree


def test_readme_stage_table_names_what_each_step_writes():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if re.match(r"\| \d \w+ \| `0\d_\w+` \|", line)]
    assert [re.search(r"`(0\d_\w+)`", r).group(1) for r in rows] == list(contract.STAGES)
    run_files = {f for f, _ in contract.RUN_FILES.values()}
    for row in rows:
        step = contract.step(re.search(r"`(0\d_\w+)`", row).group(1))
        named = set(re.findall(r"`([\w.]+/?)`", row.rsplit("|", 2)[1]))
        own = {contract.artifact(n).file + ("/" if contract.artifact(n).kind == "dir" else "") for n in step.writes
               if contract.artifact(n).kind != "cache"}
        assert named - {"keep"} <= own | run_files, (step.name, named - own - run_files)
        assert own <= named, (step.name, own - named)


def test_every_read_is_written_by_a_step_that_comes_first():
    files = [a.file for a in contract.ARTIFACTS.values()]
    assert len(files) == len(set(files)) and not set(files) & {f for f, _ in contract.RUN_FILES.values()}
    for loop, stages in contract.LOOPS.items():  # in each loop's own order, with that loop's writers
        order = {s: i for i, s in enumerate(stages)}
        for name in stages:
            st = contract.STEPS[name]
            assert set(st.writes) <= set(contract.ARTIFACTS)
            for rd in st.reads:
                src = contract.producer(rd.name, loop)
                assert src in order and rd.of in ("this", "first", "earlier"), (loop, name, rd)
                if rd.of == "this":
                    assert order[src] < order[st.name] or (src == st.name and rd.name not in st.writes), (st.name, rd)
        # within a loop every artifact has one writer
        writes = [n for s in stages for n in contract.STEPS[s].writes]
        assert len(writes) == len(set(writes)), loop
    assert set(contract.STEPS) == {s for stages in contract.LOOPS.values() for s in stages}


def test_inputs_resolve_rounds():
    assert contract.inputs("01_vector", 0) == []
    assert contract.inputs("01_vector", 2) == [("adapter", 0), ("adapter", 1), ("vector", 0)]
    assert contract.inputs("03_filter", 0) == [("generated", 0)]
    assert contract.inputs("03_filter", 1) == [("generated", 1), ("filter_summary", 0)]
    assert contract.inputs("05_eval", 0) == [("adapter", 0), ("vector", 0), ("generate_summary", 0)]
    assert contract.inputs("05_eval", 1) == [("adapter", 0), ("adapter", 1), ("vector", 1), ("generate_summary", 1),
                                            ("vector", 0), ("eval", 0), ("eval_rows", 0)]
    assert contract.inputs("02_generate", 0) == [("vector", 0)]
    assert contract.inputs("02_generate", 1) == [("adapter", 0), ("vector", 1), ("generate_summary", 0)]
    assert contract.allowed("05_eval", 1, "vector", 0) == "read" and contract.allowed("04_heal", 1, "adapter", 1) == "write"
    for stage, name, rnd in (("04_heal", "vector", 1), ("02_generate", "completions", 1), ("01_vector", "vector", 2)):
        with pytest.raises(contract.ContractError, match=f"{stage} does not declare '{name}'"):
            contract.allowed(stage, 1, name, rnd)
    with pytest.raises(contract.ContractError, match="unknown artifact 'vectors'"):
        contract.path("r", 0, "vectors")
    assert contract.path("runs/x", 3, "adapter") == Path("runs/x/round_03/adapter")


def test_config_sections_cover_every_key_once_and_heal_is_the_heal_keys():
    from steerheal_utils.heal import HEAL_KEYS

    secs = contract.sections()
    keys = [k for ks in secs.values() for k in ks]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(C.Config))
    assert set(secs["heal"]) == set(HEAL_KEYS)
    from steerheal_utils.filter import FilterThresholds

    assert {f.name for f in dataclasses.fields(FilterThresholds)} <= set(secs["filter"])
    # the study shares round 0's 01-03 between arms that differ in heal keys only
    assert not set(HEAL_KEYS) & set(contract.config_keys("01_vector") + contract.config_keys("02_generate")
                                    + contract.config_keys("03_filter"))


class _Recorder:
    """Wraps a Config: remembers every field read by attribute (to_dict, used for fingerprints and
    provenance, is not a use)."""

    def __init__(self, cfg: C.Config, seen: set):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        if name in C.Config.__dataclass_fields__:
            self._seen.add(name)
            return getattr(self._cfg, name)
        attr = getattr(type(self._cfg), name)
        if callable(attr) and name != "to_dict":
            return lambda *a, **k: attr(self, *a, **k)  # methods read fields through the recorder too
        return getattr(self._cfg, name)

    def __eq__(self, other):
        return self._cfg == getattr(other, "_cfg", other)


@pytest.mark.slow  # two tiny rounds in-process, every cell of every notebook: ~2 min quiet
def test_stages_use_only_the_artifacts_and_config_keys_they_declare(tmp_path, monkeypatch):
    """Every code cell of every stage notebook, executed in this process on the tiny preset for two
    rounds: an undeclared artifact raises ContractError in ctx.artifact, and every config field a
    stage reads must be among its declared keys (what its record holds it to)."""
    import plotly.basedatatypes

    from steerheal_utils import stage

    monkeypatch.setattr(plotly.basedatatypes.BaseFigure, "show", lambda self, *a, **k: None)
    run = tmp_path / "run"
    from steerheal_utils.driver import init_run

    init_run(run, C.resolve("tiny"))
    seen: dict[str, set] = {}
    real = stage.open_stage

    def recording(name, ns):
        ctx = real(name, ns)
        ctx.cfg = _Recorder(ctx.cfg, seen.setdefault(name, set()))
        return ctx

    monkeypatch.setattr(stage, "open_stage", recording)
    for rnd in (0, 1):
        for name in contract.STAGES:
            nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
            ns: dict = {}
            for cell in nb["cells"]:
                if cell["cell_type"] != "code":
                    continue
                src = "".join(cell["source"])
                if "parameters" in cell.get("metadata", {}).get("tags", []):
                    src = f"run_dir = {str(run)!r}\nround = {rnd}"
                exec(compile(src, f"{name}.ipynb", "exec"), ns)
    from steerheal_utils.filter import FilterThresholds

    # the recorder saw the uses that make each step's hidden edges (not an empty set by accident)
    thresholds = {f.name for f in dataclasses.fields(FilterThresholds)}
    assert seen["02_generate"] & thresholds and seen["04_heal"] & thresholds  # 02 and 04's Q1 filter
    assert {"lr", "kl_agg", "temperature"} <= seen["04_heal"] and {"eval_layout", "coh_floor"} <= seen["05_eval"]
    for name in contract.STAGES:
        extra = seen[name] - set(contract.config_keys(name))
        assert not extra, f"{name} reads config keys its contract entry does not declare: {sorted(extra)}"
    assert (run / "round_01" / "eval.json").exists()


def test_an_eval_record_made_by_an_older_version_is_refused_with_a_clear_error(tmp_path):
    from steerheal_utils.runfolder import RunFolderError, atomic_write_json

    p = contract.path(tmp_path, 0, "eval")
    p.parent.mkdir(parents=True)
    atomic_write_json(p, {"round": 0, "stages": {"base": {"auth_nats": -1.0}}, "notes": []})
    with pytest.raises(RunFolderError, match=r"made by an older version of steerheal \(it has 'stages'"):
        contract.read_eval(tmp_path, 0)
    atomic_write_json(p, {"round": 0, "conditions": {"base": {"auth_nats": -1.0}}, "notes": []})
    assert contract.read_eval(tmp_path, 0)["conditions"]["base"]["auth_nats"] == -1.0
