"""The online loop's resume state: one safetensors file, rewritten atomically after every step.

Tensors: the new adapter's weights (``adapter.*``, peft's own keys), AdamW's moments and step
counts (``opt.<param>.<key>``), the torch RNG (``rng.torch``) and the steering vector in use
(``sv.<layer>``). Metadata (one sorted-JSON key): the next step, the scheduler, Python's and
numpy's RNG, the vector's norms and provenance, the rows sampled and the telemetry so far, and a
fingerprint of the config and inputs the state belongs to (a state of another config is ignored).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save

from ..runfolder import atomic_write_bytes
from ..vector.value import SteeringVector


def _np_state() -> list | None:
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _set_np_state(st: list | None) -> None:
    if st is None:
        return
    import numpy as np

    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), st[2], st[3], st[4]))


def save_state(path: Path | str, *, model, adapter: str, optimizer: torch.optim.Optimizer, scheduler,
               next_step: int, sv: SteeringVector, fingerprint: str, extra: dict[str, Any]) -> None:
    """Write the state after a finished step (``next_step`` = the step to run on resume), atomically."""
    tensors = {f"adapter.{k}": v.detach().float().cpu().contiguous()
               for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    for layer, v in sv.directions.items():
        tensors[f"sv.{layer}"] = v.detach().float().cpu().contiguous()
    doc = {"next_step": next_step, "fingerprint": fingerprint, "param_groups": opt["param_groups"],
           "scheduler": scheduler.state_dict(), "py_random": random.getstate(), "np_random": _np_state(),
           "sv_resid_norms": {str(k): v for k, v in sv.resid_norms.items()}, "sv_meta": sv.meta, **extra}
    atomic_write_bytes(path, save(tensors, metadata={"steerheal_online": json.dumps(doc, sort_keys=True, default=str)}))


def read_state(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, doc)`` of a state file, or None when there is none or it cannot be read (a run
    killed while an older torch wrote it, a foreign file): the checkpoint then starts over."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})["steerheal_online"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    return tensors, doc


def restore(tensors: dict[str, torch.Tensor], doc: dict[str, Any], *, model, adapter: str,
            optimizer: torch.optim.Optimizer, scheduler) -> SteeringVector:
    """Load a state into a freshly built student, optimizer and scheduler; restore the RNGs.
    Returns the steering vector that was in use."""
    dev = next(p for p in model.parameters() if p.requires_grad).device
    sd = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    res = set_peft_model_state_dict(model, sd, adapter_name=adapter)
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"online state: adapter keys the student does not have: {res.unexpected_keys[:3]}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v if key == "step" else v.to(dev)
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    scheduler.load_state_dict(doc["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    py = doc["py_random"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    _set_np_state(doc.get("np_random"))
    dirs = {int(k[3:]): v for k, v in tensors.items() if k.startswith("sv.")}
    return SteeringVector(dirs, {int(k): float(v) for k, v in doc["sv_resid_norms"].items()}, doc["sv_meta"])
