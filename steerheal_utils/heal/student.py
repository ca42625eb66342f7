"""The student of a heal round: a fresh LoRA adapter on top of the earlier rounds' (frozen), and
its KL reference (``base``: every adapter off; ``prev``: earlier rounds on, the new one off).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model

from ..adapters import adapter_name, adapter_names, set_active
from ..config import depth_band
from ..models import get_layers


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_target_regex(model: nn.Module, targets: Sequence[str], lo: float, hi: float) -> tuple[str, list[int]]:
    """A peft ``target_modules`` regex for the named linears of the decoder blocks in [lo, hi]
    of depth. Anchored on the decoder's own layer list, so a vision tower's blocks of the same
    names (multimodal Gemma 3) are never touched."""
    causal = causal_lm(model)
    blocks = get_layers(causal)
    prefix = next(n for n, m in causal.named_modules() if m is blocks)
    layers = depth_band(len(blocks), lo, hi)
    if not targets:
        raise ValueError("lora_targets is empty: name at least one linear module (e.g. q_proj)")
    rx = rf"{re.escape(prefix)}\.({'|'.join(map(str, layers))})\.(.*\.)?({'|'.join(map(re.escape, targets))})"
    names = [n for n, _ in causal.named_modules() if re.fullmatch(rx, n)]
    if not names:
        raise ValueError(f"lora_targets {list(targets)} match no module in layers {layers} of {type(causal).__name__}")
    return rx, layers


def make_student(model: nn.Module, cfg, rnd: int, seed: int = 0) -> tuple[nn.Module, str, list[str]]:
    """Add this round's fresh LoRA adapter to the model at round ``rnd``.

    Args:
        model: base model (round 0) or the PeftModel from :func:`models.bake_adapters`.
        cfg: Config (lora_* knobs).
        rnd: round number; the new adapter is named ``r{rnd:02d}``.

    Returns ``(peft_model, new_name, earlier_names)``; all adapters active, only the new one
    trainable. B is zero-initialised (peft's LoRA default), so the student equals the model
    it starts from.
    """
    earlier = adapter_names(model) if isinstance(model, PeftModel) else []
    if len(earlier) != rnd:
        raise ValueError(f"round {rnd} expects {rnd} baked adapters, the model has {len(earlier)}: {earlier}")
    new = adapter_name(rnd)
    rx, layers = lora_target_regex(model, cfg.lora_targets, cfg.lora_layer_lo, cfg.lora_layer_hi)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=rx,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # A's kaiming init
        if isinstance(model, PeftModel):
            model.add_adapter(new, lcfg)
        else:
            model = get_peft_model(model, lcfg, adapter_name=new)
    set_active(model, earlier + [new], new)
    return model, new, earlier


@contextlib.contextmanager
def reference(model: nn.Module, ref: str, new: str, earlier: Sequence[str]) -> Iterator[None]:
    """The KL reference inside the block: ``base`` (every adapter off) or ``prev`` (earlier on,
    new off). Restores all adapters active and only ``new`` trainable on exit."""
    if ref == "base" or (ref == "prev" and not earlier):
        try:
            with model.disable_adapter():
                yield
        finally:  # peft re-enables the adapters with requires_grad on for every active one
            set_active(model, list(earlier) + [new] if new else list(earlier), new or None)
    elif ref == "prev":
        try:
            set_active(model, earlier, None)
            yield
        finally:
            set_active(model, list(earlier) + [new], new)
    else:
        raise ValueError(f"kl_ref must be 'base' or 'prev', got {ref!r}")
