"""Checks a run's config against its files and its model before any stage runs (no weights read).

``steerheal run`` calls :func:`check` after the config is validated and before the first stage:
a vignette file that does not parse, or ``layers`` beyond the model's depth, then costs seconds
instead of the rounds' stages that run before the one that reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import config as C


def model_layers(name: str) -> int | None:
    """The decoder depth of model ``name`` from its ``config.json`` (no weights read), or None when
    the config is not on this machine (an HF id not in the local cache).

    Example:
        >>> model_layers("tiny:llama")   # doctest: +SKIP
        4
    """
    if name.startswith("tiny:"):
        import inspect

        from .models import tiny_model

        return inspect.signature(tiny_model).parameters["n_layers"].default
    from . import embedded

    if name == embedded.NAME:
        folder = embedded.model_dir()
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
        except Exception:  # no hub library or a malformed id: unknown here, checked when the model loads
            return None
        folder = Path(hit).parent if isinstance(hit, str) else None
    if folder is None:
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):  # multimodal configs (Gemma 3) nest the language model
        n = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_layers(cfg: C.Config) -> None:
    """``layers`` within the model's depth (when its config.json is at hand)."""
    if not cfg.layers:
        return
    n = model_layers(cfg.model)
    if n is not None:
        cfg.steered_layers(n)  # raises ConfigError naming the bad indices and the valid range


def check_vignettes(cfg: C.Config) -> None:
    """The vignette file exists, parses and has the tiny-mfv schema (ConfigError otherwise)."""
    if not cfg.vignettes:
        return
    C.check_files(cfg)
    from .evaluate import EvalError, load_vignettes

    try:
        load_vignettes(cfg.vignettes)
    except EvalError as e:
        raise C.ConfigError(f"vignettes: {e}") from None


def check_axis(cfg: C.Config) -> None:
    """The axis knobs and the probe file they name (ConfigError with the probe's line number)."""
    from . import axis

    try:
        axis.check(cfg)
    except axis.ProbeError as e:
        raise C.ConfigError(str(e)) from None


def check(cfg: C.Config) -> None:
    """Everything that can be checked before a model loads (ConfigError on the first problem)."""
    C.check_files(cfg)
    check_vignettes(cfg)
    check_axis(cfg)
    check_layers(cfg)
