"""Loading models, rendering chat prompts, batching, and "the model at round k".

:func:`load_round_model` is the single place that builds the student of a round: the
base model plus the LoRA adapters of rounds ``0..k-1``, all active (``W + sum_i s_i B_i A_i``).
The adapters stay unmerged unless ``merge=True`` (and then only on float32 weights, where
merging is exact to rounding), so ``with model.disable_adapter():`` recovers the exact base
for the KL reference (the precursor merged in place and restored
the weights before ``backward()``, which made its gradients wrong).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import embedded

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
def _data_path(*parts: str) -> Path:
    return Path(str(resources.files("steerheal_utils").joinpath("data", *parts)))


def shipped_tokenizer(arch: str = "llama"):
    """The real SmolLM2 tokenizer (ChatML template), or a Gemma3-templated variant of it.

    ``gemma3`` adds Gemma's turn tokens as special tokens and uses Gemma 3's own chat
    template, so prompt rendering and the assistant-tag search are exercised on it.
    """
    from transformers import PreTrainedTokenizerFast

    d = _data_path("tokenizers", "smollm2")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if arch == "llama":
        tok.chat_template = (d / "chat_template.jinja").read_text()
    elif arch == "gemma3":
        tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
                                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        tok.chat_template = _data_path("tokenizers", "gemma3_chat_template.jinja").read_text()
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    tok.padding_side = "left"
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 4, hidden: int = 64):
    """A random-init model of a real architecture around a real tokenizer, deterministic from ``seed``.

    Example:
        >>> model, tok = tiny_model("gemma3", seed=1)   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

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
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        raise ModelLoadError(_explain_load_error(name, e)) from None


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, seed: int = 0):
    """Load ``(model, tokenizer)`` for an HF id, a local folder, the embedded default or ``tiny:<arch>``.

    ``trust_remote_code`` is passed to transformers as given (the config's default is off:
    a model repo's own Python code never runs unless the user turned it on).
    Errors name the model and point at alternatives instead of ending in a bare stack trace.
    ``seed`` only matters for ``tiny:<arch>`` (the random init); real weights are what they are.
    """
    dev = resolve_device(device)
    if name.startswith("tiny:"):
        model, tok = tiny_model(_tiny_arch(name), seed=seed)
        return model.to(dev, resolve_dtype(dtype, dev) if dtype != "auto" else torch.float32), tok
    path = _model_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)  # never a pickle (see _model_path)
    except Exception as e:  # OSError, ValueError, ImportError, safetensors' own errors on a corrupted file
        raise ModelLoadError(_explain_load_error(name, e)) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
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


# ------------------------------------------------------------------ chat prompts
def persona_system(persona: str) -> str:
    """The system prompt that puts a model in a persona."""
    return f"You are {persona}."


def chat_messages(tok, user: str, system: str | None = None) -> list[dict]:
    """Messages for one user turn; the system text is folded into the user turn when the
    template has no system role (it raises, or silently drops the system text)."""
    if system is None:
        return [{"role": "user", "content": user}]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if system in text:
            return msgs
    except Exception:  # jinja raises TemplateError("System role not supported") for some models
        pass
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def render_prompt(tok, user: str, system: str | None = None) -> str:
    """The chat prompt text up to and including the assistant header."""
    return tok.apply_chat_template(chat_messages(tok, user, system), tokenize=False, add_generation_prompt=True)


def encode(tok, text: str) -> list[int]:
    """Token ids of already-rendered text (special tokens come from the template, not added twice)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def assistant_header(tok) -> str:
    """The text the template appends for ``add_generation_prompt`` (e.g. ``<|im_start|>assistant\\n``)."""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    if not with_gen.startswith(without) or with_gen == without:
        raise ValueError("cannot find the assistant header: the chat template renders no generation prompt")
    return with_gen[len(without):]


def prompt_ids(tok, user: str, system: str | None = None) -> tuple[list[int], int]:
    """Prompt token ids and the index of the assistant-tag token (the last header token).

    The position is checked against the rendered template rather than assumed, so a
    template that appends something after the header fails loudly.
    """
    text = render_prompt(tok, user, system)
    header = assistant_header(tok)
    if not text.endswith(header):
        raise ValueError(f"rendered prompt does not end with the assistant header {header!r}")
    ids = encode(tok, text)
    n_head = len(encode(tok, text[: len(text) - len(header)]))
    if n_head >= len(ids):
        raise ValueError("assistant header tokenised to nothing")
    return ids, len(ids) - 1


# ------------------------------------------------------------------ batching
def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None):
    """Left-pad token lists; return ``input_ids, attention_mask, position_ids``.

    Position ids count real tokens only, so a padded row sees the same positions as it
    would alone (HF's plain forward otherwise numbers the padding too).
    """
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return ids, mask, pos


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding), longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(d: Path | str) -> Path:
    """Refuse an adapter folder that is not a complete, finite, safetensors-only peft folder.

    peft itself falls back to ``adapter_model.bin`` (a pickle) when no safetensors file is
    present, whatever ``use_safetensors`` says; this check is what keeps pickles out.
    Reading the header catches a truncated file; reading the tensors catches NaN/inf.
    Raises RunFolderError naming the file.
    """
    from safetensors import safe_open

    from .runfolder import RunFolderError

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
    from .contract import path
    from .runfolder import RunFolderError, marker_path

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
    from peft import PeftModel

    from .runfolder import RunFolderError

    for d in dirs:
        check_adapter_dir(d)
    names = [f"r{i:02d}" for i in range(len(dirs))]
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


def load_round_model(cfg, run_dir: Path | str | None, rnd: int, *, merge: bool = False):
    """``(model, tokenizer)`` for round ``rnd``: the base with rounds ``0..rnd-1`` baked in."""
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    dirs = adapter_dirs(run_dir, rnd) if run_dir is not None else []
    return bake_adapters(model, dirs, merge=merge), tok


def describe_model(model: nn.Module, tok) -> dict:
    """A small summary for logs and run metadata."""
    return {"class": type(model).__name__, "name": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", ""),
            "n_layers": n_layers(model), "n_params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype), "device": str(model_device(model)), "vocab": len(tok)}

