"""Stage 05: the vignette eval (tiny-mfv protocol), the on-axis probe, and the round's eval.

The vignette eval (brief section 2). Each vignette is shown with a list of seven options,
one per moral foundation, each with a short gloss, in two frames (options forward and
reversed). The assistant turn is prefilled with ``This is wrong because {"violation": "``
and the next-token log-probs of the seven option labels are read from the full-vocabulary
log-softmax. For row i, frame k and foundation f (``lp[i, k, f]``)::

    score_f  = mean_k lp[i, k, f]          p = softmax_f(score)
    mass_ik  = sum_f exp(lp[i, k, f])      coherence = mean_ik mass_ik
    profile_f = mean_i p_f                 X_nats = ln(profile_X)

Labels are positional: slot j of the option list always carries the label ``"j+1"``,
whatever foundation sits there, so label bias and position bias both cancel between the
frames, except for the middle slot. Pitfall: Authority is 4th of 7, the middle slot in
both frames, so any bias towards "4" is *not* cancelled for it (tiny-mfv has the same
property; compare with the on-axis probe, which swaps its two options).

Two prompt layouts (``eval_layout``):

- ``tinymfv``: the user turn is the vignette, then the instructions and the options (the
  tiny-mfv layout). Every row is a full forward.
- ``prefix``: the instructions and options come first and the vignette last. **Not the
  tiny-mfv prompt**: a fast variant for CPUs. The chat header, instructions and options are
  one shared prefix per frame; its key/value cache is computed once and expanded over each
  batch, so only the vignette and the answer suffix are computed per row (8.5k instead of
  44k per-row tokens on the classic set).

Measured (132 vignettes x 2 frames, T = 0, SmolLM2-135M dimensions, fp32, 2 pinned CPU
cores, batch 16): prefix 17.8 s, tinymfv 87.3 s; the 52-item probe 12.3 s vs 21.7 s. On a
GPU the saving disappears (gemma-3-4b dimensions, bf16, H100, batch 64: prefix 3.6 s,
tinymfv 1.3 s), so the ``gemma-3-4b`` preset keeps the faithful layout. The two layouts are
different prompts, not the same prompt computed twice: compare runs within one layout.

Think budget (``think_tokens`` = T > 0): tiny-mfv's think path, in either layout (the
layout only orders the first user turn; prefix KV reuse is not used there, decoding
dominates). Per row and frame:

1. the generation prompt, then ``<think>\n`` (not when the template already ends its
   generation prompt with ``<think>``);
2. exactly T greedy tokens: EOS ids (tokenizer, generation config) and ``</think>`` (where it
   is one token; else the EOS stands for it) are suppressed, i.e. never chosen;
3. one forced suffix over the same KV cache: ``</think>`` + the template's assistant-turn
   close (``<end_of_turn>\n``) + a user turn ``Just answer`` rendered by the template from the
   start of a conversation (so Gemma's ``<bos>`` and SmolLM2's default system turn are in it,
   as in tiny-mfv) up to the assistant header, then the prefill; the labels' log-probs are
   read after it (``read = "forced"``);
4. if the thought already wrote the prefill and a token after it, the labels are read at
   that token instead, from the logits the decoder chose it from (suppressed ids at -inf,
   as in the HF scores tiny-mfv reads) (``"natural"``); a thought that closed itself
   (contains the close id) without doing so is ``"unscorable"``: left out of every metric,
   its share reported (``unscorable``; ~0, since the close is suppressed).

Deliberate differences from tiny-mfv's batched code, which make every row's numbers what
tiny-mfv computes for that row at batch size 1: its suffix runs over HF ``generate``'s
returned cache, which lacks the last thought token (its forced read sees T - 1 of them;
checked on a tiny model: equal to a full forward without that token); it numbers the
suffix positions from the padded length; it masks every pad-id token, which on ChatML
tokenizers whose pad is ``<|im_end|>`` also hides the prompt's own turn ends; and it
tokenises the prompt with the tokenizer's special tokens (a second ``<bos>`` on Gemma).
Here the suffix follows all T tokens, positions count real tokens, and the prompt is the
template's text exactly, as in every other stage. T = 0 answers directly (the prefill
follows the generation prompt; tiny-mfv has no T = 0 mode). A non-finite logit anywhere
raises (tiny-mfv marks such a row unscorable): a dose that breaks the arithmetic should
not yield a partial score.

Steering (``steering=``, a :class:`~steerheal_utils.vector.Steering`): the eval applies the
vector the way 02 generated with it, ``steer_positions`` and ``dose_halflife`` included,
with positions counted from each row's own assistant tag in every forward (the prompt, the
prefill, the thought and the suffix), also when rows sit right-padded after a shared prefix.

The on-axis probe: two-option care-vs-authority dilemmas written for this project; score =
mean log-odds of the care option's label over the authority option's, averaged over both
option orders. More sensitive than the vignettes on small models.

Example:
    >>> res = evaluate_model(model, tok, load_vignettes(), batch_size=16)   # doctest: +SKIP
    >>> res["summary"]["auth_nats"], res["summary"]["coherence"]           # doctest: +SKIP
"""

from .cli import add_cli
from .conditions import cached_condition, condition_dose, condition_fingerprint, eval_code_version
from .data import load_heldout, load_probe, load_vignettes
from .engine import find_prefill, greedy, next_token_logprobs, read_think_row, think_logprobs
from .evidence import add_evidence
from .maths import human_majority, probe_logodds, score_logprobs, summarize
from .model_eval import answer_kl, evaluate_model, heldout_answers, probe_logprobs, vignette_logprobs, vignette_reads
from .prompts import (FOUNDATIONS, FRAMES, GLOSSES, HUMAN_COLS, LABELS, NATS_KEYS, PROBE_INSTRUCTION, PROBE_LABELS,
                      PROBE_PREFILL, PROTOCOLS, THINK_CLOSE, THINK_NUDGE, THINK_OPEN, VIGNETTE_INSTRUCTION,
                      VIGNETTE_PREFILL, EvalError, PromptSet, ThinkProtocol, assistant_turn_close, label_token_ids,
                      options_block, probe_template, split_prompts, think_opener, think_protocol, user_turn_to_assistant,
                      vignette_template)
from .figures import figures
from .step import EvalResult, run_stage, summary_table
