"""LoRA adapters of earlier rounds: checking, baking in, switching, naming.

The student of round ``k`` is the base model plus the adapters of rounds ``0..k-1``, all active
(``W + sum_i s_i B_i A_i``), named ``r00``, ``r01``... in round order (:func:`adapter_name`; every
list of names here is in that order). They stay unmerged unless ``merge=True``, and then only on
float32 weights, where merging is exact to rounding, so ``with model.disable_adapter():``
recovers the exact base for the KL reference (the precursor merged in place and restored the
weights before ``backward()``, which made its gradients wrong).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

from .contract import path
from .runfolder import RunFolderError, marker_path

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_name(rnd: int) -> str:
    """The name of round ``rnd``'s adapter inside a model (``r00``...)."""
    return f"r{rnd:02d}"


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters a (peft) model carries, in round order; [] for a plain model."""
    cfg = getattr(model, "peft_config", None)
    return sorted(cfg) if cfg else []


def has_adapter(d: Path | str) -> bool:
    """Whether ``d`` holds a peft adapter's two files (:func:`check_adapter_dir` checks them)."""
    d = Path(d)
    return (d / "adapter_config.json").exists() and (d / ADAPTER_WEIGHTS).exists()


def check_adapter_dir(d: Path | str) -> Path:
    """Refuse an adapter folder that is not a complete, finite, safetensors-only peft folder.

    peft itself falls back to ``adapter_model.bin`` (a pickle) when no safetensors file is
    present, whatever ``use_safetensors`` says; this check is what keeps pickles out.
    Reading the header catches a truncated file; reading the tensors catches NaN/inf.
    Raises RunFolderError naming the file.
    """
    d = Path(d)
    weights = d / ADAPTER_WEIGHTS
    if not (d / "adapter_config.json").is_file():
        raise RunFolderError(f"no adapter_config.json in {d}: not a peft adapter folder")
    if not weights.is_file():
        other = sorted(p.name for p in d.glob("adapter_model.*"))
        why = f" (found {', '.join(other)}: pickled weights are never loaded)" if other else ""
        raise RunFolderError(f"no {ADAPTER_WEIGHTS} in {d}{why}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for k in f.keys():
                if not torch.isfinite(f.get_tensor(k)).all():
                    raise FloatingPointError(f"tensor {k} has NaN or inf values")
    except Exception as e:
        raise RunFolderError(f"corrupted adapter file {weights}: {e}") from None
    return d


def adapter_dirs(run_dir: Path | str, rnd: int) -> list[Path]:
    """Adapter folders of rounds ``0..rnd-1``, checked to exist, be complete and be finite."""
    out = []
    for i in range(rnd):
        d = path(run_dir, i, "adapter")
        redo = (f"delete {marker_path(run_dir, i, '04_heal')} and re-run the same command "
                f"(round {i} is healed again, later rounds are redone)")
        if not d.is_dir():
            raise RunFolderError(f"round {i} has no adapter folder {d}: {redo}")
        try:
            check_adapter_dir(d)
        except RunFolderError as e:
            raise RunFolderError(f"{e}. To recover: {redo}") from None
        out.append(d)
    return out


def bake_adapters(model: nn.Module, dirs: Sequence[Path | str], *, merge: bool = False) -> nn.Module:
    """Apply earlier rounds' LoRA adapters, all active and frozen.

    Args:
        model: the base model.
        dirs: peft adapter folders, in round order.
        merge: fold them into the weights (faster inference; the base is then gone), but only
            where that is exact to float32 rounding (:func:`merge_is_exact`): merging into
            bfloat16/float16 weights rounds ``W + s B A`` to 8/11 mantissa bits, which erases small
            LoRA updates, so the model that samples (01, 02) would not be the one healed and
            evaluated (04, 05, unmerged). There the adapters stay unmerged whatever ``merge`` says.

    Returns the model (a ``PeftModel`` when adapters stay unmerged, else the plain model).
    Adapters are read from safetensors only (:func:`check_adapter_dir`); a truncated,
    corrupted or non-finite file raises RunFolderError naming it.
    """
    if not dirs:
        return model

    for d in dirs:
        check_adapter_dir(d)
    names = [adapter_name(i) for i in range(len(dirs))]
    try:
        peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0], is_trainable=False,
                                               use_safetensors=True)
        for name, d in zip(names[1:], dirs[1:]):
            peft_model.load_adapter(str(d), adapter_name=name, is_trainable=False, use_safetensors=True)
    except Exception as e:  # safetensors raises its own error types on truncated files
        raise RunFolderError(f"could not load adapter from {[str(d) for d in dirs]}: {e}. "
                             "The file may be truncated: re-run the round that wrote it.") from e
    peft_model.base_model.set_adapter(names, inference_mode=True)
    if merge and merge_is_exact(model):
        return peft_model.merge_and_unload()
    return peft_model


def merge_is_exact(model: nn.Module) -> bool:
    """Whether folding LoRA adapters into ``model``'s weights only changes float32 rounding:
    every floating-point parameter is float32."""
    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


@contextlib.contextmanager
def active_adapters(model: nn.Module, k: int) -> Iterator[nn.Module]:
    """Only the first ``k`` baked adapters (round order) active; all of them again on exit."""
    names = adapter_names(model)
    if not names or k >= len(names):
        yield model
        return
    if k == 0:
        with model.disable_adapter():
            yield model
        return
    model.base_model.set_adapter(names[:k], inference_mode=True)
    try:
        yield model
    finally:
        model.base_model.set_adapter(names, inference_mode=True)


def set_active(model: nn.Module, active: Sequence[str], trainable: str | None) -> None:
    """Activate exactly ``active`` adapters and make only ``trainable``'s LoRA weights trainable.

    peft's ``set_adapter`` turns ``requires_grad`` on for every active adapter, so the earlier
    rounds are re-frozen here explicitly (test_baking checks the gradients).
    """
    model.base_model.set_adapter(list(active), inference_mode=True)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is not None and "lora_" in name and f".{trainable}." in name)
