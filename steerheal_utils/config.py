"""One typed, validated config for a whole run.

Every knob has a default and a one-line meaning (``Config.describe()`` prints them).
A run folder stores the resolved config as ``config.yaml``; every stage reads it from
there, so an executed notebook plus its run folder is enough to reproduce a round.

Presets set many knobs at once (``tiny`` for tests, ``default`` for the embedded model
on a laptop CPU, ``gemma-3-4b`` for the paper scale on one GPU). ``--set key=value``
overrides any knob; values are parsed as YAML (``--set layers=[13,14]``,
``--set dose=null``).

Validation happens here, before any model is loaded: unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .kl import AGGREGATES as KL_AGGREGATES
from .kl import DIRECTIONS as KL_DIRECTIONS

POS_PERSONA = "someone who looks after others' wellbeing even when it means defying authority"
NEG_PERSONA = "someone who defers to authority even when others' wellbeing suffers for it"


class ConfigError(ValueError):
    """A config key, type or value that is not accepted."""


SECTIONS = ("common", "vector", "generate", "filter", "heal", "eval", "online")
"""Config sections: which step a knob belongs to. The contract names a step's config by sections
(``contract.Step.config``); heal's keys (``heal.HEAL_KEYS``) and the filter's thresholds
(``filter.gates.FilterThresholds``) are the knobs of their section. On disk the config is flat."""


def knob(default: Any, help: str, *, section: str, choices: tuple | None = None,
         lo: float | None = None, hi: float | None = None) -> Any:
    """A config field with its one-line meaning, its section (:data:`SECTIONS`) and accepted values."""
    if section not in SECTIONS:
        raise ValueError(f"knob section {section!r} is not one of {SECTIONS}")
    meta = {"help": help, "section": section, "choices": choices, "lo": lo, "hi": hi}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # --- model ---
    model: str = knob("smollm2-135m-instruct", "HF model id, local folder, 'smollm2-135m-instruct' (embedded) or 'tiny:llama' / 'tiny:gemma3' (random-init test models)", section="common")
    dtype: str = knob("auto", "weights dtype; auto = bfloat16 on CUDA, float32 elsewhere", choices=("auto", "float32", "bfloat16", "float16"), section="common")
    device: str = knob("auto", "torch device; auto = cuda if available, else cpu", choices=("auto", "cpu", "cuda", "mps"), section="common")
    device_map: dict[str, int | str] | str | None = knob(None, "spread the model over devices with accelerate (replaces device): auto / balanced / sequential, or a mapping module -> device, e.g. {model.layers.0: 0, lm_head: 1}; null = the whole model on device", section="common")
    trust_remote_code: bool = knob(False, "allow model repos to run their own Python code (off: safer)", section="common")
    seed: int = knob(0, "base seed; every stage derives its own from (seed, round, stage)", lo=0, section="common")
    pos_persona: str = knob(POS_PERSONA, "persona whose direction is added (system prompt)", section="common")
    neg_persona: str = knob(NEG_PERSONA, "persona whose direction is subtracted (system prompt)", section="common")
    batch_size: int = knob(16, "forward batch size for extraction, scoring and eval", lo=1, section="common")
    threads: int = knob(0, "CPU threads torch uses in each stage; 0 = torch's default (one per core). Results can differ in the last bits between thread counts", lo=0, section="common")

    # --- 01 vector ---
    layer_lo: float = knob(0.45, "steered depth band: first layer at this fraction of depth", lo=0.0, hi=1.0, section="vector")
    layer_hi: float = knob(0.55, "steered depth band: last layer at this fraction of depth", lo=0.0, hi=1.0, section="vector")
    layers: list[int] = knob([], "explicit steered layer indices; overrides layer_lo/layer_hi when non-empty", section="vector")
    n_contexts: int = knob(256, "user messages (from the shipped contexts) used to extract the vector", lo=2, section="vector")

    # --- 02 generate ---
    dose: float | None = knob(None, "steering dose in units of the layer's median residual norm; null = calibrate it (see calib_rounds)", lo=0.0, section="generate")
    steer_positions: str = knob("all", "where the vector is added: all = every position, prompt included; generated = the assistant tag (last prompt token) and every token after it", choices=("all", "generated"), section="generate")
    data_source: str = knob("steer", "where 02's training data comes from: steer = the model with the vector added (the loop); prompt = the model prompted with pos_persona as system prompt, no vector (the prompt-distillation arm; the dose search is skipped)", choices=("steer", "prompt"), section="generate")
    dose_halflife: int = knob(0, "generated tokens over which the dose halves; 0 = constant dose", lo=0, section="generate")
    steer_mode: str = knob("constant", "steering mode: constant = the dose as given (dose_halflife composes with every mode); backtrack = while sampling, rewind a row backtrack_k tokens and replay at backtrack_factor x its dose when the per-token KL(steered||unsteered) exceeds backtrack_kl (05's steered condition: constant); cosine_gate = add the vector only where the hidden state's cosine to it is below cos_gate (gate_kind), in 02 and in 05", choices=("constant", "backtrack", "cosine_gate"), section="generate")
    backtrack_kl: float = knob(2.0, "backtrack: per-token KL(steered||unsteered next-token distribution), nats, above which a row backs off", lo=0.0, section="generate")
    backtrack_k: int = knob(4, "backtrack: generated tokens a row rewinds when it backs off", lo=1, section="generate")
    backtrack_factor: float = knob(0.5, "backtrack: the row's dose is multiplied by this on each replay", lo=0.0, hi=1.0, section="generate")
    backtrack_max: int = knob(3, "backtrack: most backoffs per row (then it samples on at its last dose)", lo=0, section="generate")
    cos_gate: float = knob(0.0, "cosine_gate: add the vector where cos(hidden state, vector) is below this (gate_kind threshold)", lo=-1.0, hi=1.0, section="generate")
    gate_kind: str = knob("threshold", "cosine_gate: threshold = add the full dose where cos < cos_gate, nothing elsewhere; scale = dose x clip(1 - cos, 0, 1) everywhere", choices=("threshold", "scale"), section="generate")
    temperature: float = knob(1.0, "sampling temperature", lo=0.0, section="generate")
    top_p: float = knob(0.95, "nucleus sampling mass", lo=0.0, hi=1.0, section="generate")
    top_k: int = knob(64, "top-k sampling; 0 = off", lo=0, section="generate")
    max_new_tokens: int = knob(96, "completion length cap (tokens)", lo=1, section="generate")
    gen_batch_size: int = knob(32, "prompts sampled together", lo=1, section="generate")
    gen_compile: bool = knob(False, "CUDA only: static KV cache + compiled decode step (one-time compile, ~2 min at 4B; pays when a round samples >~100k tokens)", section="generate")
    n_keep: int = knob(64, "kept completions to collect for heal", lo=1, section="generate")
    gen_budget: int = knob(192, "most completions generated per round while collecting", lo=1, section="generate")
    calib_target: float = knob(0.75, "dose search: keep rate required at the chosen dose, as a fraction of the unsteered (dose 0) keep rate on the same probes (calib_relative) or absolute", lo=0.0, hi=1.0, section="generate")
    calib_relative: bool = knob(True, "dose search: calib_target is relative to the unsteered keep rate (false: absolute keep fraction)", section="generate")
    calib_probes: int = knob(32, "dose search: probe completions per call (drawn across the whole pool; the same probes at every dose)", lo=1, section="generate")
    calib_lo: float = knob(0.01, "dose search lower bound (the lowest grid dose)", lo=0.0, section="generate")
    calib_hi: float = knob(1.0, "dose search upper bound (the highest grid dose)", lo=0.0, section="generate")
    calib_grid: int = knob(4, "dose search: log-spaced doses from calib_lo to calib_hi sampled before the fit (besides 2 calls at dose 0)", lo=2, section="generate")
    calib_refine: int = knob(3, "dose search: calls at the fitted crossing after the grid, refitting in between; the last one's rows start the collection", lo=0, section="generate")
    calib_rounds: str = knob("every", "calibrate the dose every round, or in round 0 only and reuse that dose later (arms of a study then share it)", choices=("every", "first"), section="generate")

    # --- 03 filter (every knob but min_train is a gate: filter.gates.FilterThresholds) ---
    strict: bool = knob(True, "filter: every gate; false = only the precursor's gates (ablation; random-init models)", section="filter")
    min_words: int = knob(8, "filter: fewer words is 'empty' (strict mode)", lo=0, section="filter")
    max_tail_ppl: float = knob(50.0, "drop if perplexity under base of the last tail_frac of tokens exceeds this", lo=1.0, section="filter")
    tail_frac: float = knob(0.25, "fraction of completion tokens that counts as the tail", lo=0.0, hi=1.0, section="filter")
    max_ngram_repeat: float = knob(0.3, "drop if the repeated word 3/4-gram fraction exceeds this", lo=0.0, hi=1.0, section="filter")
    max_bigram_repeat: float = knob(0.45, "filter: repeated word 2-gram fraction gate", lo=0.0, hi=1.0, section="filter")
    max_char_repeat: float = knob(0.5, "filter: repeated character 12-gram fraction gate", lo=0.0, hi=1.0, section="filter")
    max_compression_ratio: float = knob(3.0, "filter: raw / zlib bytes gate (loops compress well)", lo=0.0, section="filter")
    max_lrs_frac: float = knob(0.2, "filter: longest repeated substring as a fraction of the text", lo=0.0, hi=1.0, section="filter")
    min_window_distinct: float = knob(0.5, "filter: min distinct-word fraction over any 40-word window", lo=0.0, hi=1.0, section="filter")
    max_tail_repeat: float = knob(0.5, "filter: 3-gram repeat fraction within the last 40% of words", lo=0.0, hi=1.0, section="filter")
    max_affect: float = knob(0.22, "filter: max fraction of affect words (oh, darling, please...) in a window", lo=0.0, hi=1.0, section="filter")
    max_exclaim_rate: float = knob(0.12, "filter: exclamation marks per word", lo=0.0, section="filter")
    max_nonword_frac: float = knob(0.2, "filter: fraction of whitespace tokens that are not clean words", lo=0.0, hi=1.0, section="filter")
    max_script_mix: float = knob(0.05, "filter: fraction of letters outside the dominant script", lo=0.0, hi=1.0, section="filter")
    min_function_frac: float = knob(0.18, "filter: min fraction of function words in any 40-word window", lo=0.0, hi=1.0, section="filter")
    max_drift: float = knob(0.5, "filter: fraction of clauses whose skeleton matches an earlier one", lo=0.0, hi=1.0, section="filter")
    narration_overlap: float = knob(0.6, "filter: persona word overlap of a self-describing sentence that counts as narration", lo=0.0, hi=1.0, section="filter")
    narration_paraphrase: float = knob(0.8, "filter: persona word overlap of any sentence that counts as narration", lo=0.0, hi=1.0, section="filter")
    max_boilerplate_hits: int = knob(2, "filter: this many assistant-boilerplate phrases or more is 'boilerplate'", lo=1, section="filter")
    max_entropy_collapse: float = knob(0.15, "filter: fraction of positions where base is low-entropy on a repeated 3-gram", lo=0.0, hi=1.0, section="filter")
    min_prompt_overlap: float = knob(0.1, "filter: drop as off-topic if the completion uses less than this fraction of the prompt's content words", lo=0.0, hi=1.0, section="filter")
    entropy_floor: float = knob(2.0, "filter: base-model entropy (nats) under which it counts as certain (small models keep a long tail: 1.5-1.8 nats inside a loop for SmolLM2-135M)", lo=0.0, section="filter")
    min_train: int = knob(8, "stop the round if fewer completions are kept", lo=1, section="filter")

    # --- 04 heal ---
    lora_r: int = knob(32, "LoRA rank", lo=1, section="heal")
    lora_alpha: float = knob(64.0, "LoRA alpha (scale = alpha / r)", lo=0.0, section="heal")
    lora_dropout: float = knob(0.0, "LoRA dropout", lo=0.0, hi=1.0, section="heal")
    lora_targets: list[str] = knob(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names that get LoRA", section="heal")
    lora_layer_lo: float = knob(0.2, "LoRA depth band start (fraction of depth)", lo=0.0, hi=1.0, section="heal")
    lora_layer_hi: float = knob(0.8, "LoRA depth band end (fraction of depth)", lo=0.0, hi=1.0, section="heal")
    reg: str = knob("kl", "regulariser: kl = KL barrier to the reference (see kl_*, lam, tau), nll = plain NLL with no barrier, wd = weight decay (wd_strength)", choices=("kl", "nll", "wd"), section="heal")
    kl_dir: str = knob("reverse", "KL(student||ref) (reverse) or KL(ref||student) (forward)", choices=tuple(KL_DIRECTIONS), section="heal")
    kl_agg: str = knob("rmse", "per-sequence aggregate of per-position KL (kl.AGGREGATES)", choices=tuple(KL_AGGREGATES), section="heal")
    kl_ref: str = knob("base", "KL reference: base (every adapter off) or prev (earlier rounds baked)", choices=("base", "prev"), section="heal")
    lam: float = knob(1.0, "barrier weight", lo=0.0, section="heal")
    lam_round_pow: float = knob(0.0, "barrier weight grows as lam * (1 + r)^pow with baked rounds r", section="heal")
    tau: float = knob(0.5, "barrier gate: penalise only the aggregate above tau (absolute mode)", lo=0.0, section="heal")
    tau_mode: str = knob("absolute", "tau as given, or calibrated as a quantile of D at the start of the round", choices=("absolute", "quantile"), section="heal")
    tau_quantile: float = knob(0.9, "quantile of the starting D used as tau in quantile mode", lo=0.0, hi=1.0, section="heal")
    weight_decay: float = knob(0.0, "AdamW weight decay (reg=wd uses wd_strength instead)", lo=0.0, section="heal")
    wd_strength: float = knob(0.1, "weight decay used when reg=wd", lo=0.0, section="heal")
    lr: float = knob(1e-4, "AdamW learning rate", lo=0.0, section="heal")
    beta1: float = knob(0.9, "AdamW beta1", lo=0.0, hi=1.0, section="heal")
    beta2: float = knob(0.95, "AdamW beta2", lo=0.0, hi=1.0, section="heal")
    warmup_frac: float = knob(0.1, "fraction of steps of linear warm-up before cosine decay", lo=0.0, hi=1.0, section="heal")
    epochs: int = knob(6, "passes over the kept completions", lo=1, section="heal")
    train_batch_size: int = knob(8, "heal batch size", lo=1, section="heal")
    grad_clip: float = knob(1.0, "gradient norm clip; 0 = off", lo=0.0, section="heal")
    max_seq_len: int = knob(512, "prompt + completion tokens kept for training", lo=8, section="heal")
    kl_chunk: int = knob(1024, "completion positions per full-vocabulary float32 log-softmax chunk (memory vs speed)", lo=1, section="heal")
    q1_prompts: int = knob(16, "prompts for Q1: the healed model's own greedy and sampled answers vs the steered ones", lo=0, section="heal")

    # --- 05 eval ---
    vignettes: str = knob("", "vignette JSONL (tiny-mfv schema); empty = the shipped classic set", section="eval")
    eval_layout: str = knob("prefix", "vignette prompt layout: tinymfv (the tiny-mfv prompt) or prefix (options first, shared-prefix KV reuse: faster on CPU, not the tiny-mfv prompt)", choices=("tinymfv", "prefix"), section="eval")
    eval_max_rows: int = knob(0, "stratified subset of vignettes; 0 = all", lo=0, section="eval")
    think_tokens: int = knob(0, "tiny-mfv think path: exactly this many greedy tokens after '<think>' (EOS and '</think>' suppressed), then '</think>', a 'Just answer' turn and the forced answer; 0 = answer directly", lo=0, section="eval")
    controls: list[str] = knob(["prompted", "random"], "control conditions evaluated: prompted (persona as system prompt), random (a band of random rotations of the vector, KL-matched doses)", section="eval")
    controls_every_round: bool = knob(False, "evaluate the random-vector control band every round, not only round 0", section="eval")
    n_controls: int = knob(8, "random-vector controls in the band (random_00...): each a random rotation of the persona vector (norms and cross-layer cosines kept) at a dose matched to the persona's KL", lo=2, section="eval")
    control_kl_tol: float = knob(0.1, "a control's dose is matched when its next-token KL at the assistant tag is within this relative error of the persona's", lo=0.001, hi=0.9, section="eval")
    control_max_dose_ratio: float = knob(10.0, "a control's matched dose may be at most this multiple of the persona's dose (a control that needs more is flagged 'unmatched')", lo=1.0, section="eval")
    control_kl_prompts: int = knob(0, "dilemma prompts the control KL is averaged over (the first N of the 48); 0 = all", lo=0, section="eval")
    n_boot: int = knob(2000, "bootstrap resamples for the CIs of every eval metric and delta (vignettes and probe items resampled separately, paired across models)", lo=10, section="eval")
    ci_level: float = knob(0.95, "coverage of the percentile bootstrap intervals", lo=0.5, hi=0.999, section="eval")
    coh_floor: float = knob(0.0, "stop the loop after a healed round whose coherence is below this", lo=0.0, hi=1.0, section="eval")
    heldout_max_new_tokens: int = knob(64, "greedy tokens for the outputs-over-loop table", lo=1, section="eval")
    probe_max_items: int = knob(0, "on-axis probe items used (the first N); 0 = all", lo=0, section="eval")
    # the trait axis the eval reads (steerheal_utils/axis.py): its labels, probe file and map
    axis_name: str = knob("care-vs-authority", "name of the trait axis the persona pair spans (labels the report and metrics.csv)", section="eval")
    axis_labels: list[str] = knob(["care", "authority"], "[pos side, neg side] labels of the axis probe's two options", section="eval")
    axis_probe: str = knob("", "axis probe JSONL (id, situation, pos_option, neg_option; or the shipped care_option, authority_option); empty = the shipped care-vs-authority probe; a bare name = a file in steerheal_utils/data/ (love_probe.jsonl)", section="eval")
    axis_prompts: str = knob("", "02's generation prompt pool, JSONL (id, text, domain optional); empty = the shipped care-vs-authority dilemmas; a bare name = a file in steerheal_utils/data/ (love_prompts.jsonl)", section="generate")
    axis_map: list[str] = knob(["Authority", "Care"], "[x, y] foundations of the report's map; their *_nats join axis_logodds and coherence in the headline (deltas, control band)", section="eval")

    # --- 06 online (loop=online: sample, filter and heal per batch; see steerheal_utils/online) ---
    loop: str = knob("rounds", "rounds = the round loop (01-05 per round); online = 01, then 06_online (each step samples online_batch steered completions from the current student, filters them, and takes one heal step on the kept ones), then 05 every online_every steps", choices=("rounds", "online"), section="online")
    online_batch: int = knob(16, "loop=online: prompts sampled (and filtered) per training step; the heal batch is the kept ones", lo=1, section="online")
    online_refresh: int = knob(4, "loop=online: re-read the steering vector from the current student every this many steps (0 = only 01's, once per checkpoint)", lo=0, section="online")
    online_every: int = knob(6, "loop=online: training steps between checkpoints; each checkpoint is a round folder (adapter, eval, metrics rows)", lo=1, section="online")
    online_steps: int = knob(18, "loop=online: total training steps (the run has ceil(online_steps / online_every) rounds)", lo=1, section="online")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> str:
        """Every knob, its default and meaning, one per line."""
        out = []
        for f in dataclasses.fields(cls):
            d = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append(f"{f.name} = {d!r}: {f.metadata['help']}")
        return "\n".join(out)

    def steered_layers(self, n_layers: int) -> list[int]:
        """Layer indices to steer for a model with ``n_layers`` decoder blocks."""
        if self.layers:
            bad = [i for i in self.layers if not 0 <= i < n_layers]
            if bad:
                raise ConfigError(f"layers: {bad} out of range for a model with {n_layers} layers (0..{n_layers - 1})")
            return sorted(set(self.layers))
        return depth_band(n_layers, self.layer_lo, self.layer_hi)


def section_keys(name: str) -> tuple[str, ...]:
    """The knobs of config section ``name``, in declaration order.

    Example:
        >>> section_keys("vector")
        ('layer_lo', 'layer_hi', 'layers', 'n_contexts')
    """
    if name not in SECTIONS:
        raise ConfigError(f"unknown config section {name!r}; sections are {', '.join(SECTIONS)}")
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["section"] == name)


def knob_field(name: str) -> dataclasses.Field:
    """The dataclass field of knob ``name`` (its default, type, help, section, choices, range)."""
    for f in dataclasses.fields(Config):
        if f.name == name:
            return f
    raise unknown_key_error(name)


def default(name: str) -> Any:
    """The default value of knob ``name``."""
    f = knob_field(name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def depth_band(n_layers: int, lo: float, hi: float) -> list[int]:
    """Layers whose index falls in [lo, hi] of depth; at least one layer."""
    first = int(round(lo * (n_layers - 1)))
    last = int(round(hi * (n_layers - 1)))
    return list(range(first, max(first, last) + 1))


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: a random-init model, so the numbers are meaningless; the machinery is not.
    "tiny": dict(
        model="tiny:llama", n_contexts=8, batch_size=8, max_new_tokens=16, gen_batch_size=8,
        n_keep=8, gen_budget=16, calib_probes=4, calib_grid=2, calib_refine=1, min_train=1,
        strict=False, max_tail_ppl=1e9, max_ngram_repeat=1.0, lora_r=4, lora_alpha=8.0, epochs=1,
        train_batch_size=4, max_seq_len=256, q1_prompts=4, eval_max_rows=14, heldout_max_new_tokens=8,
        controls=["prompted", "random"], probe_max_items=8, n_controls=2, control_kl_prompts=8,
        # steering modes (vector.modes): constant; the others' knobs as tests use them
        steer_mode="constant", backtrack_kl=1.0, backtrack_k=2, backtrack_factor=0.5, backtrack_max=2,
        cos_gate=0.0, gate_kind="threshold",
        online_batch=4, online_refresh=2, online_every=2, online_steps=4,
    ),
    # The embedded SmolLM2-135M on 2 CPU cores: a 3-round run in about 15-20 minutes.
    # Budgeted from a measured round (load ~3-4): 02 at 64 tokens, 5 probe calls of 12 and 96 rows
    # took 11 min, heal 12 steps 4 min. Per round now: 64 vector prompts; in round 0 the dose search
    # (2 calls at dose 0, 4 grid doses, 3 refine calls, each 32 x 48 tokens, ~13.7k tokens; the last
    # call's rows are collected; 02 took ~250 s on a shared 2-core box), later rounds reuse that dose
    # (calib_rounds=first: a search every round would add ~3 min per round); collection to 24 kept
    # of at most 64; heal 2 epochs x 3 steps of 8 rows.
    "default": dict(
        model="smollm2-135m-instruct", n_contexts=32, max_new_tokens=48, gen_batch_size=32,
        # 02: at the median-norm unit, 0.02 kept 8/12 (4 off-topic) and 0.14 kept 2/12, so the
        # range reaches below 0.02 for a dose that meets the target.
        calib_lo=0.005, calib_hi=0.3, calib_probes=32, calib_grid=4, calib_refine=3, calib_rounds="first",
        n_keep=24, gen_budget=64,
        # SmolLM2's 48-token answers are loosely on-topic even unsteered: at dose 0.005 the 0.1
        # overlap gate dropped 6/16. Overlap 0 (unrelated prose, what strong steering produces) is
        # still dropped at 0.05. The keep target is relative to the unsteered rate (calib_relative).
        min_prompt_overlap=0.05,
        lora_r=16, lora_alpha=32.0, eval_layout="prefix", heldout_max_new_tokens=48,
        # heal: few steps, so a larger LoRA learning rate than at 4B.
        epochs=2, lr=5e-4, q1_prompts=4,
        # 05's control band: the KL match over 16 of the 48 dilemmas (a 48-prompt KL pass costs ~40% of
        # one vignette eval here; ~3 passes per control).
        control_kl_prompts=16,
        # steering modes (vector.modes; README "Steering modes"): constant unless asked. backtrack_kl 1.0:
        # about 2.6x the mean tag KL (0.38 nats) at the calibrated dose 0.068; k=4 of 48 tokens.
        steer_mode="constant", backtrack_kl=1.0, backtrack_k=4, backtrack_factor=0.5, backtrack_max=3,
        cos_gate=0.0, gate_kind="threshold",
        # loop=online at the round loop's budget: 6 heal steps per checkpoint (2 epochs x 3 steps),
        # 6 x 12 = 72 sampled completions per checkpoint (the round loop collects at most gen_budget=64).
        online_batch=12, online_refresh=3, online_every=6, online_steps=18,
    ),
    # The paper scale on one GPU (brief section 1).
    "gemma-3-4b": dict(
        model="google/gemma-3-4b-it", n_contexts=256, max_new_tokens=256, gen_batch_size=256,
        n_keep=256, gen_budget=768, calib_probes=64, calib_grid=6, epochs=2, lora_r=32,
        lora_alpha=64.0, tau=2.0, batch_size=64, eval_layout="tinymfv", think_tokens=128,
        heldout_max_new_tokens=128, controls_every_round=True, gen_compile=True,
        # steering modes: untested at this scale; k scaled with the 256-token completions
        steer_mode="constant", backtrack_kl=2.0, backtrack_k=8, backtrack_factor=0.5, backtrack_max=3,
        cos_gate=0.0, gate_kind="threshold",
        online_batch=64, online_refresh=8, online_every=24, online_steps=72,
    ),
}


# ---------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, value, inner[0])
        for a in inner:  # the first type the value fits
            try:
                return _coerce(name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {_coerce(name, k, k_tp): _coerce(f"{name}[{k}]", v, v_tp) for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # comma-separated shorthand: --set layers=13,14
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


_HINTS: dict[str, Any] | None = None


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def _check_value(f: dataclasses.Field, value: Any) -> None:
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(map(str, m['choices']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = m.get("lo"), m.get("hi")
        if lo is not None and value < lo or hi is not None and value > hi:
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{f.name}: {value!r} is out of range {rng}")


def unknown_key_error(key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(Config)]
    key = str(key)
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " See `steerheal config` for every key."
    return ConfigError(f"unknown config key {key!r}.{hint}")


def validate(values: dict[str, Any]) -> Config:
    """Build a Config from a dict of key -> value, checking keys, types and ranges."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = _hints()
    clean = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key_error(key)
        v = _coerce(key, value, hints[key])
        _check_value(fields[key], v)
        clean[key] = v
    for key in PATH_KEYS:
        if clean.get(key):
            clean[key] = resolve_path(key, clean[key])
    cfg = Config(**clean)
    if cfg.layer_lo > cfg.layer_hi:
        raise ConfigError(f"layer_lo ({cfg.layer_lo}) must not exceed layer_hi ({cfg.layer_hi})")
    if cfg.lora_layer_lo > cfg.lora_layer_hi:
        raise ConfigError(f"lora_layer_lo ({cfg.lora_layer_lo}) must not exceed lora_layer_hi ({cfg.lora_layer_hi})")
    if cfg.calib_lo <= 0 or cfg.calib_lo >= cfg.calib_hi:
        raise ConfigError(f"calib_lo must be > 0 and below calib_hi (got {cfg.calib_lo}, {cfg.calib_hi})")
    from .devices import check_device_map

    check_device_map(cfg.device_map)
    if len(cfg.axis_labels) != 2 or len(cfg.axis_map) != 2:
        raise ConfigError(f"axis_labels and axis_map take two values each [pos, neg] / [x, y], got {cfg.axis_labels!r}, {cfg.axis_map!r}")
    if cfg.loop == "online":
        if cfg.dose is None:
            raise ConfigError("loop=online needs a fixed dose (--set dose=X; e.g. the dose round 0 of a round-based "
                              "run calibrated, in its round_00/generate.json): it does not search for one")
        if cfg.reg == "kl" and cfg.tau_mode != "absolute":
            raise ConfigError("loop=online supports tau_mode=absolute only (there is no fixed training set to "
                              "calibrate a quantile on)")
    bad_controls = set(cfg.controls) - {"prompted", "random"}
    if bad_controls:
        raise ConfigError(f"controls: {sorted(bad_controls)} not among prompted, random")
    return cfg


PATH_KEYS = ("model", "vignettes", "axis_probe", "axis_prompts")  # values that may name a local file or folder


def resolve_path(key: str, value: str) -> str:
    """A local path made absolute against the caller's working directory, once, when the config is
    built (every stage then sees the same file, whatever its own working directory is).

    ``model`` stays as given when it is not a local path: ``tiny:<arch>``, the embedded name, or
    an HF id (``org/name``) that is not an existing folder here.

    Example:
        >>> resolve_path("model", "tiny:llama"), resolve_path("vignettes", "/data/v.jsonl")
        ('tiny:llama', '/data/v.jsonl')
    """
    from .embedded import NAME as EMBEDDED

    p = Path(value).expanduser()
    if key in ("axis_probe", "axis_prompts") and len(p.parts) == 1 and not p.exists():
        return value  # a file shipped in steerheal_utils/data/ (axis.probe_path)
    if key == "model":
        looks_local = p.is_absolute() or value.startswith((".", "~")) or value.count("/") > 1 or p.exists()
        if value.startswith("tiny:") or value == EMBEDDED or not looks_local:
            return value
    return os.path.abspath(p)


def check_files(cfg: Config) -> None:
    """Raise ConfigError when a file the config names is not there (checked before a run starts)."""
    if cfg.vignettes and not Path(cfg.vignettes).is_file():
        raise ConfigError(f"vignettes: no such file {cfg.vignettes}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dose=0.3", "layers=[3,4]"]`` -> ``{"dose": 0.3, "layers": [3, 4]}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def resolve(preset: str = "default", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Preset values, then overrides, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return validate({**PRESETS[preset], **(overrides or {})})


# ---------------------------------------------------------------- run folder
def save_config(cfg: Config, path: Path, meta: dict[str, Any] | None = None) -> None:
    """Write the resolved config (and provenance under ``_meta``) as YAML, atomically."""
    from .runfolder import atomic_write_text

    doc = cfg.to_dict()
    if meta:
        doc["_meta"] = meta
    atomic_write_text(Path(path), yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def load_config(path: Path) -> Config:
    """Read a config.yaml written by :func:`save_config` (provenance is ignored)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no config at {path}: start the run with `steerheal run --run-dir {path.parent}`")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"{path} is not valid YAML: {first}") from None
    if doc is None:
        raise ConfigError(f"{path} is empty: a config file maps keys to values (`steerheal config --preset tiny --yaml` "
                          "prints one); a run folder also keeps every config it used in config_history.jsonl")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} holds a {type(doc).__name__} ({str(doc)[:60]!r}), not a mapping of config "
                          "keys to values (`steerheal config --preset tiny --yaml` prints one)")
    doc.pop("_meta", None)
    try:
        return validate(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_diff(a: Config, b: Config) -> list[str]:
    """Human-readable list of keys whose values differ."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if da[k] != db[k]]
