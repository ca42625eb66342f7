"""Models across several devices (``--set device_map=auto``): loading, and where each layer runs.

A model too large for one GPU is loaded with a *device map* (accelerate): each decoder block on
one device, e.g. ``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.layers.40": 1,
"model.norm": 1, "lm_head": 1}``. accelerate wraps every mapped module's ``forward`` with a hook
that moves its inputs to the module's *execution device*; the top module gets its outputs back
on the device its inputs came from, so the logits of a mapped model are where its ``input_ids``
were (:func:`input_device`).

What the loop does on such a model, and why it stays correct:

- inputs go to :func:`input_device` (the input embedding's device), not "the model's device";
- a steering vector is added inside each block's forward hook on the block's hidden state, so it
  is moved to that state's device (``vector.steering``), and a preallocated slot lives on
  :func:`block_device`;
- the KL reference is the same model with its adapters switched off (``adapters``), so it runs
  on the same device layout as the student; LoRA weights are created by peft next to the layer
  they adapt, and the optimizer follows the parameters;
- every weight must be resident: a map that offloads modules (``"disk"``, or ``"cpu"`` next to a
  GPU) leaves weights on the ``meta`` device, which LoRA training cannot use, so it is refused
  (:func:`check_resident`).

accelerate is needed only when a device map is set (it is imported here, lazily).
"""

from __future__ import annotations

from typing import Any

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's named placements (``device_map="auto"`` fills the GPUs in order, then the CPU)."""


def check_device_map(value: Any) -> None:
    """Raise ConfigError unless ``value`` is None, a named strategy or a mapping module -> device.

    Example:
        >>> check_device_map({"model.layers.0": 0, "lm_head": "cpu"})
        >>> check_device_map("everywhere")
        Traceback (most recent call last):
        ...
        steerheal_utils.config.ConfigError: device_map: 'everywhere' is not one of auto, balanced, balanced_low_0, sequential (or a mapping module -> device)
    """
    from .config import ConfigError

    if value is None:
        return
    if isinstance(value, str):
        if value not in STRATEGIES:
            raise ConfigError(f"device_map: {value!r} is not one of {', '.join(STRATEGIES)} (or a mapping module -> device)")
        return
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"device_map: expected a strategy ({', '.join(STRATEGIES)}) or a non-empty mapping "
                          f"module -> device, got {value!r}")
    for module, dev in value.items():
        if dev == "disk" or dev == "meta":
            raise ConfigError(f"device_map: {module!r} -> {dev!r}: offloaded weights cannot be trained (LoRA); "
                              "put every module on a GPU or the CPU")
        if isinstance(dev, bool) or not (isinstance(dev, int) and dev >= 0 or isinstance(dev, str) and dev):
            raise ConfigError(f"device_map: {module!r} -> {dev!r} is not a device (a GPU index like 0, or 'cpu', 'cuda:1')")


def is_dispatched(model) -> bool:
    """Whether ``model`` (or the model inside a peft wrapper) was placed with a device map."""
    return bool(getattr(model, "hf_device_map", None))


def _hook_device(module):
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        return None
    import torch

    return torch.device(dev) if not isinstance(dev, torch.device) else dev


def input_device(model):
    """The device a model's ``input_ids`` go to: the input embedding's (execution) device when the
    model has a device map, else the device of its first parameter."""
    if is_dispatched(model):
        emb = model.get_input_embeddings()
        return _hook_device(emb) or emb.weight.device
    return next(model.parameters()).device


def block_device(block):
    """The device a decoder block computes on: its accelerate hook's execution device if it has one
    (its weights may then be elsewhere), else the device of its first parameter."""
    return _hook_device(block) or next(block.parameters()).device


def check_resident(model) -> None:
    """Raise ModelLoadError if some weights are on the ``meta`` device (offloaded by the device map)."""
    from .models import ModelLoadError

    meta = sorted({name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.device.type == "meta"})
    if meta:
        shown = ", ".join(meta[:4]) + (f" and {len(meta) - 4} more" if len(meta) > 4 else "")
        raise ModelLoadError(f"the device map left {shown} off any device (offloaded to the CPU or disk): LoRA training "
                             "needs every weight on a device. Use more GPUs, a smaller dtype (--set dtype=bfloat16), "
                             "or an explicit map that puts whole blocks on the CPU only when no GPU is used")


def dispatch(model, device_map: str | dict):
    """Place an already built model (a ``tiny:`` test model) with ``device_map`` through accelerate's
    hooks, also when every entry is the CPU (``force_hooks``), so that tests run the mapped code path.

    A named strategy is turned into a map by ``infer_auto_device_map`` (blocks kept whole).
    """
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        from .models import ModelLoadError

        raise ModelLoadError("device_map needs accelerate: pip install accelerate") from None
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=list(model._no_split_modules or []))
    unknown = sorted(set(device_map) - {n for n, _ in model.named_modules()})
    if unknown:
        from .models import ModelLoadError

        raise ModelLoadError(f"device_map names modules the model does not have: {', '.join(unknown[:4])}")
    model = dispatch_model(model, device_map=dict(device_map), force_hooks=True)
    model.hf_device_map = dict(device_map)
    return model


def layer_devices(model) -> list[str]:
    """The device each decoder block computes on, in layer order (for logs and run metadata)."""
    from .models import get_layers

    return [str(block_device(b)) for b in get_layers(model)]
