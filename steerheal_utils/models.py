"""Loading models: an HF id or folder, the embedded SmolLM2, or a random-init ``tiny:<arch>`` test model.

:func:`load_model` loads the base; :func:`load_round_model` the student of a round (the base
with earlier rounds' adapters baked in, :mod:`steerheal_utils.adapters`). Steps ask their
context for either (``ctx.base()``, ``ctx.student()``), which calls these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig,
                          PreTrainedTokenizerFast)

from . import datafiles, devices, embedded
from .adapters import adapter_dirs, bake_adapters

TINY_ARCHS = ("llama", "gemma3")


class ModelLoadError(RuntimeError):
    """A model that could not be loaded, with a message saying why and what to do instead."""


# ------------------------------------------------------------------ device and dtype
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # bf16 on CUDA; fp32 elsewhere: bf16 matmuls are ~6x slower on CPUs without native bf16.
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ------------------------------------------------------------------ tokenizers shipped with the package


def shipped_tokenizer(arch: str = "llama"):
    """The real SmolLM2 tokenizer (ChatML template), or a Gemma3-templated variant of it.

    ``gemma3`` adds Gemma's turn tokens as special tokens and uses Gemma 3's own chat
    template, so prompt rendering and the assistant-tag search are exercised on it.
    """
    d = datafiles.path("tokenizers", "smollm2")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if arch == "llama":
        tok.chat_template = (d / "chat_template.jinja").read_text()
    elif arch == "gemma3":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
                                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = datafiles.path("tokenizers", "gemma3_chat_template.jinja").read_text()
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    tok.padding_side = "left"
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 4, hidden: int = 64):
    """A random-init model of a real architecture around a real tokenizer, deterministic from ``seed``.

    Example:
        >>> model, tok = tiny_model("gemma3", seed=1)   # doctest: +SKIP
    """
    tok = shipped_tokenizer(arch)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    else:
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.name_or_path = f"tiny:{arch}"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


# ------------------------------------------------------------------ loading
def _model_path(name: str) -> str:
    """What ``from_pretrained`` should open for ``name`` (not ``tiny:``), or a ModelLoadError."""
    if name == embedded.NAME:
        try:
            return str(embedded.ensure_embedded_model())
        except embedded.EmbeddedModelError as e:
            raise ModelLoadError(f"could not prepare the embedded model {name!r}: {e}\n"
                                 "Alternatively use a local HF folder (--set model=/path/to/hf_model_folder).") from None
    is_local = Path(name).expanduser().exists()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # HF ids are "org/name"
    if not is_local and looks_like_path:
        raise ModelLoadError(f"model {name!r}: no such folder. Give an existing local folder, an HF id "
                             f"(org/name) or the embedded default {embedded.NAME!r}.")
    if is_local and not (Path(name).expanduser() / "config.json").exists():
        raise ModelLoadError(f"model {name!r}: the folder has no config.json, so it is not an HF model folder "
                             f"(save one with model.save_pretrained(folder)), or use the embedded default {embedded.NAME!r}.")
    if is_local and not any(Path(name).expanduser().glob("*.safetensors")):
        pickled = sorted(p.name for p in Path(name).expanduser().iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        why = f" (found {', '.join(pickled[:3])}: pickled weights can run code when loaded, so they are never loaded)" \
            if pickled else ""
        raise ModelLoadError(f"model {name!r}: the folder has no *.safetensors weights{why}. Save it with "
                             "model.save_pretrained(folder, safe_serialization=True), or use the embedded default "
                             f"{embedded.NAME!r}.")
    return str(Path(name).expanduser()) if is_local else name


def _tiny_arch(name: str) -> str:
    arch = name.split(":", 1)[1]
    if arch not in TINY_ARCHS:
        raise ModelLoadError(f"unknown tiny model {name!r}; choose tiny:llama or tiny:gemma3")
    return arch


def check_model(name: str, *, trust_remote_code: bool = False) -> None:
    """Fail fast, before any stage runs, when ``name`` cannot be loaded; reads no weights.

    The embedded default is fetched and converted here on first use (so its progress shows
    on the terminal); an HF id or folder has its config read (a typo, a gated repo, no
    network or code that needs ``trust_remote_code`` all show up at this point).
    """
    if name.startswith("tiny:"):
        _tiny_arch(name)
        return
    path = _model_path(name)
    if name == embedded.NAME:
        return

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        raise ModelLoadError(_explain_load_error(name, e)) from None


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, seed: int = 0,
               device_map: str | dict | None = None):
    """Load ``(model, tokenizer)`` for an HF id, a local folder, the embedded default or ``tiny:<arch>``.

    ``trust_remote_code`` is passed to transformers as given (the config's default is off:
    a model repo's own Python code never runs unless the user turned it on).
    Errors name the model and point at alternatives instead of ending in a bare stack trace.
    ``seed`` only matters for ``tiny:<arch>`` (the random init); real weights are what they are.
    ``device_map`` (a strategy or a mapping module -> device) spreads the model over devices with
    accelerate instead of moving it to ``device`` (:mod:`steerheal_utils.devices`).
    """
    dev = resolve_device(device)
    if name.startswith("tiny:"):
        model, tok = tiny_model(_tiny_arch(name), seed=seed)
        if device_map is not None:
            model = devices.dispatch(model.to(resolve_dtype(dtype, dev) if dtype != "auto" else torch.float32), device_map)
            devices.check_resident(model)
            return model, tok
        return model.to(dev, resolve_dtype(dtype, dev) if dtype != "auto" else torch.float32), tok
    path = _model_path(name)

    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **placement)  # never a pickle (see _model_path)
    except Exception as e:  # OSError, ValueError, ImportError, safetensors' own errors on a corrupted file
        raise ModelLoadError(_explain_load_error(name, e)) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    if device_map is not None:
        devices.check_resident(model)
        return model.eval(), tok
    return model.to(dev).eval(), tok


def _explain_load_error(name: str, e: Exception) -> str:
    msg = str(e)
    low = msg.lower()
    if "gated" in low or "401" in msg or "403" in msg or "restricted" in low:
        why = "it is a gated model: accept its licence on the hub and log in (`hf auth login`), or use a local copy"
    elif "not a valid model identifier" in low or "repository not found" in low or "404" in msg:
        why = "no such model on the hub (check the spelling) or no local folder of that name"
    elif "connect" in low or "offline" in low or "resolve" in low or "network" in low or "cannot find the requested files" in low:
        why = "it is not in the local HF cache and the hub cannot be reached (no network? or a misspelt id)"
    elif "trust_remote_code" in low:
        why = "its repo needs custom code: set trust_remote_code=true only if you trust it"
    else:
        why = msg.splitlines()[0][:300] if msg else type(e).__name__
    return (f"could not load model {name!r}: {why}.\n"
            f"Use a local folder (--set model=/path/to/hf_model_folder) or the embedded default "
            f"(--set model={embedded.NAME}).")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go (the input embedding's device when it is spread over devices)."""
    return devices.input_device(model)


# ------------------------------------------------------------------ layers
def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (also inside peft wrappers and multimodal Gemma 3)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and "vision" not in name:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"no decoder layer list found in {type(model).__name__}")
    return best


def n_layers(model: nn.Module) -> int:
    return len(get_layers(model))


# ------------------------------------------------------------------ the model at round k


def load_base(cfg):
    """``(model, tokenizer)``: the config's base model (``model``, ``dtype``, ``device``, ``trust_remote_code``)."""
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                      device_map=cfg.device_map)


def load_round_model(cfg, run_dir: Path | str | None, rnd: int, *, merge: bool = False):
    """``(model, tokenizer)`` for round ``rnd`` (the student): the base with rounds ``0..rnd-1`` baked in."""
    model, tok = load_base(cfg)
    dirs = adapter_dirs(run_dir, rnd) if run_dir is not None else []
    return bake_adapters(model, dirs, merge=merge), tok


def describe_model(model: nn.Module, tok) -> dict:
    """A small summary for logs and run metadata."""
    return {"class": type(model).__name__, "name": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", ""),
            "n_layers": n_layers(model), "n_params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype), "device": str(model_device(model)), "vocab": len(tok),
            **({"layer_devices": devices.layer_devices(model)} if devices.is_dispatched(model) else {})}

