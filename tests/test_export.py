"""Export: a round's stacked adapters as full weights or one peft adapter, loadable elsewhere."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steerheal_utils import config as C
from steerheal_utils import contract, export, heal, models
from steerheal_utils.driver import init_run

IDS = [[1, 17, 230, 5, 99, 4000, 12]]


def _fake_adapter(model, rnd: int, path: Path) -> None:
    """A LoRA with random non-zero B (a trained one would have them), saved the way 04 saves it."""
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1, 2])
    pm = get_peft_model(model, lc, adapter_name=f"new{rnd}")
    g = torch.Generator().manual_seed(rnd + 10)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    heal.save_adapter(pm, f"new{rnd}", path)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    cfg = C.resolve("tiny")
    init_run(run, cfg)
    for r in range(2):  # round r's adapter is trained on the base with rounds < r baked in
        m, _ = models.load_round_model(cfg, run, r)
        _fake_adapter(m.merge_and_unload() if r else m, r, contract.path(run, r, "adapter"))
    return run


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def test_adapter_files_are_readable_by_others(run):
    for f in contract.path(run, 0, "adapter").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 & ~_umask(), f


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_the_run_records_the_base_models_identity(run):
    import yaml

    meta = yaml.safe_load((run / "config.yaml").read_text())["_meta"]["model"]
    assert meta["id"] == "tiny:llama" and meta["path"] is None


def test_identity_of_an_hf_cache_folder(tmp_path):
    snap = tmp_path / "models--org--name" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    ident = export.model_identity(str(snap))
    assert (ident["id"], ident["revision"]) == ("org/name", "abc123")
    emb = export.model_identity("smollm2-135m-instruct")
    assert emb["id"] == export.EMBEDDED_SOURCE_ID and emb["revision"].startswith("gguf-sha256:")


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
def test_a_fresh_process_loads_the_export_and_reproduces_the_rounds_logits(run, tmp_path, fmt):
    cfg = C.resolve("tiny")
    want = _logits(models.load_round_model(cfg, run, 2)[0])  # round 1's healed model: rounds 0 and 1 active
    assert not torch.allclose(want, _logits(models.load_model("tiny:llama")[0]), atol=1e-3)  # the adapters matter
    out = tmp_path / f"export_{fmt}"
    r = subprocess.run([sys.executable, "-m", "steerheal_utils", "export", str(run), "--round", "1", "--out", str(out),
                        "--format", fmt], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((out / "steerheal_export.json").read_text())
    assert card["round"] == 1 and card["base_model"]["id"] == "tiny:llama" and len(card["adapters"]) == 2
    assert "round 01" in (out / "README.md").read_text()
    if fmt == "merged":
        load = "from transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained(OUT)\n"
    else:
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny:llama"
        load = ("from peft import PeftModel\nfrom steerheal_utils.models import tiny_model\n"
                "m = PeftModel.from_pretrained(tiny_model('llama')[0], OUT)\n")
    code = (f"import sys, torch\nOUT = {str(out)!r}\n{load}"
            f"with torch.no_grad():\n    l = m(torch.tensor({IDS})).logits\n"
            "torch.save(l, OUT + '.pt')\nprint(sorted(k for k in sys.modules if k.startswith('steerheal_utils.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(str(out) + ".pt")
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_export_refuses_a_round_without_adapter_and_a_used_folder(run, tmp_path):
    with pytest.raises(export.ExportError, match="no adapter"):
        export.export_round(run, 5, tmp_path / "x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    with pytest.raises(export.ExportError, match="not empty"):
        export.export_round(run, 0, tmp_path / "used")
