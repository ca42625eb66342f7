"""Sampling completions from a model with the steering vector added.

Steering adds ``dose * r_L * v_L / ||v_L||`` to the output of every steered block (see
:mod:`steerheal_utils.vector.steering`): **the dose is a fraction of the layer's median residual
norm**, so dose 0.1 pushes each hidden state by a tenth of a typical hidden state's length along
the persona axis, whatever the model.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from ..progress import tqdm  # a plain final line, not a frozen widget, in the journal

from ..batching import eos_ids, left_pad, length_sorted_batches
from ..chat import prompt_ids, render_prompt
from ..devices import is_dispatched
from ..models import model_device
from ..vector.modes import backtrack_kwargs
from .backtrack import sample_backtrack
from ..vector.steering import steer, steering_slots
from ..vector.value import SteeringVector
from .warp import generate_kwargs


def permutation(n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(n)``: probes and collection order span the whole pool."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def sample_params(cfg) -> dict[str, Any]:
    """The keyword arguments of :func:`sample` that come from the config."""
    params = dict(positions=cfg.steer_positions, halflife=cfg.dose_halflife, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                  compile=cfg.gen_compile)
    if cfg.steer_mode == "cosine_gate":  # only then: the constant mode's calls stay exactly as before
        params.update(gate=cfg.cos_gate, gate_kind=cfg.gate_kind)
    if cfg.steer_mode == "backtrack":
        params["backtrack"] = backtrack_kwargs(cfg)
    return params


def sample(model: nn.Module, tok, prompts: Sequence[str] | Sequence[Sequence[int]], *,
           sv: SteeringVector | None = None, dose: float = 0.0, positions: str = "all", halflife: int = 0,
           temperature: float = 1.0, top_p: float = 0.95, top_k: int = 64, max_new_tokens: int = 96,
           batch_size: int = 32, seed: int = 0, min_new_tokens: int = 0, compile: bool = False,
           progress: bool = False, gate: float | None = None, gate_kind: str = "threshold",
           backtrack: dict[str, Any] | None = None, system: str | None = None) -> list[dict]:
    """Sample one completion per prompt, batched, with the vector added at ``dose``.

    Args:
        model, tok: the model to sample from and its tokenizer (left padding).
        prompts: user messages (rendered with the chat template and ``system``, default none) or
            already-rendered prompt token ids.
        sv, dose, positions, halflife: steering, as in :func:`steerheal_utils.vector.steer`.
        temperature: 0 means greedy. top_k 0 means off.
        batch_size: prompts per ``generate`` call; prompts are length-sorted into batches.
        seed: batch ``b`` (in sorted order) samples with seed ``seed + b``, recorded per row, so
            the same prompts, seed and batch size give the same completions.
        min_new_tokens: forces length; for benchmarks only (it suppresses EOS).
        compile: on CUDA, a static KV cache and a compiled decode step (:func:`compiled_generation`);
            ignored elsewhere and for steering settings other than a constant dose at every position.
        gate, gate_kind: the ``cosine_gate`` steering mode (:mod:`steerheal_utils.vector.modes`); None = off.
        backtrack: the ``backtrack`` mode's knobs (:func:`steerheal_utils.vector.modes.backtrack_kwargs`):
            sampled by :func:`steerheal_utils.generate.backtrack.sample_backtrack` instead (its rows add
            the backoff records).
        system: system prompt for string prompts (the prompt-distillation arm: the persona).

    Returns:
        One dict per prompt, in input order: ``prompt_index``, ``prompt_text`` (the rendered
        prompt), ``completion`` (special tokens stripped), ``completion_ids`` (up to and excluding
        the EOS), ``n_tokens``, ``truncated`` (no EOS within ``max_new_tokens``), ``seed``,
        ``dose``, ``positions``, ``halflife``.

    Example:
        >>> rows = sample(model, tok, ["Your boss says ... Do you?"], sv=sv, dose=0.05)  # doctest: +SKIP
    """
    if backtrack is not None:
        if system is not None:
            raise ValueError("the backtrack sampler takes no system prompt (the prompt arm samples without a vector)")
        return sample_backtrack(model, tok, prompts, sv=sv, dose=dose, positions=positions, halflife=halflife,
                                temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, seed=seed, progress=progress, **backtrack)
    if not prompts:
        return []
    if not math.isfinite(dose):
        raise ValueError(f"dose must be finite, got {dose}")
    seqs = [list(p) if not isinstance(p, str) else prompt_ids(tok, p, system)[0] for p in prompts]
    texts = [render_prompt(tok, p, system) if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in prompts]
    eos = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    dev = model_device(model)
    gen_kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)
    # temperature, top-k and top-p in one processor: top-p on the k survivors, not a sort of the
    # whole vocabulary every step (same kept tokens and scores as transformers' three warpers)
    gen_kw.update(generate_kwargs(temperature, top_k, top_p))
    if min_new_tokens:
        gen_kw["min_new_tokens"] = min_new_tokens
    static = compiled_generation(model, enable=compile and (sv is None or dose == 0 or (positions == "all" and halflife == 0
                                                                                     and gate is None)))
    if static:
        gen_kw.update(static)
    out: list[dict | None] = [None] * len(seqs)
    batches = length_sorted_batches([len(s) for s in seqs], batch_size)
    fork_devices = [dev] if dev.type == "cuda" else []
    eos_t = torch.tensor(eos, device=dev)
    for b, idx in enumerate(tqdm(batches, desc=f"sampling (dose {dose:.3g})", disable=not progress, leave=False)):
        rows = [seqs[i] for i in idx]
        if static:  # one shape for every call: full batches, prompt width rounded up (no recompiles)
            rows += [rows[-1]] * (batch_size - len(rows))
        ids, mask, _ = left_pad(rows, pad_id, dev)
        if static and ids.shape[1] % PROMPT_BUCKET:
            extra = PROMPT_BUCKET - ids.shape[1] % PROMPT_BUCKET
            ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1)
            mask = torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], 1)
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed + b)
            # One steer() per batch: its position counter starts at this batch's padded prompt.
            with steer(model, sv, dose, positions=positions, halflife=halflife, prompt_len=ids.shape[1], gate=gate,
                       gate_kind=gate_kind):
                gen = model.generate(input_ids=ids, attention_mask=mask, **gen_kw)
        new = gen[:, ids.shape[1]:]
        is_eos = torch.isin(new, eos_t)
        has_eos = is_eos.any(-1)
        first = torch.where(has_eos, is_eos.int().argmax(-1), torch.full_like(has_eos, new.shape[1], dtype=torch.long))
        for r, i in enumerate(idx):
            n = int(first[r])
            cids = new[r, :n].tolist()
            out[i] = {"prompt_index": i, "prompt_text": texts[i],
                      "completion": tok.decode(cids, skip_special_tokens=True).strip(), "completion_ids": cids,
                      "n_tokens": n, "truncated": not bool(has_eos[r]), "seed": seed + b, "dose": float(dose),
                      "positions": positions, "halflife": halflife}
    return out  # type: ignore[return-value]


PROMPT_BUCKET = 64  # compiled generation pads prompts to a multiple of this many tokens


COMPILE_DEVICES = ("cuda",)  # where compiled generation pays (tests add "cpu" with dynamo's eager backend)


COMPILE_CONFIG = None  # transformers' CompileConfig for generate; None = its default (inductor, CUDA graphs)


def compiled_generation(model: nn.Module, enable: bool = True) -> dict[str, Any]:
    """``generate`` keywords for a static KV cache with a compiled decode step, or ``{}``.

    Only on CUDA (transformers compiles the forward there; on a CPU it would cost more than it
    saves). The first call compiles (about 2 minutes at gemma-3-4b size), later calls of the
    same shape reuse the graph, so :func:`sample` pads every batch to ``batch_size`` rows and
    every prompt to a multiple of :data:`PROMPT_BUCKET` tokens (transformers keeps the largest
    cache length seen). Steering must then go through persistent slots (see
    :func:`steerheal_utils.vector.steering_slots`): they are attached to every decoder block
    here, once, and stay for the model's life, so the compiled graph always contains them
    (a hook added after compiling would be silently ignored) and never recompiles across doses.
    """
    if not enable or model_device(model).type not in COMPILE_DEVICES or is_dispatched(model):
        return {}  # a model spread over devices (accelerate's hooks) is not compiled: not measured
    if not getattr(model, "_steerheal_slots", None):
        cm = steering_slots(model)
        cm.__enter__()  # deliberately never exited: the slots live as long as the compiled graph
        model._steerheal_slots = cm
    return {"cache_implementation": "static", **({"compile_config": COMPILE_CONFIG} if COMPILE_CONFIG else {})}
