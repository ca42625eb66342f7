"""04_heal: distil the kept steered completions into a fresh LoRA adapter, under a KL barrier.

- :mod:`.data`: kept rows as token ids, batches and their loss masks;
- :mod:`.student`: the student (a new adapter on the round's model) and the KL reference;
- :mod:`.forward`: the completion positions' NLL and per-position KL, in chunks (the memory-lean path);
- :mod:`.train`: the loss, one step, the training loop, tau calibration;
- :mod:`.step`: the 04_heal step (``run_stage(ctx) -> HealResult``) and what it writes;
- :mod:`.q1`: Q1, "can we heal?": the healed model's own answers scored like the steered ones;
- :mod:`.figures`: the notebook's plots.
"""

from .data import Example, collate, completion_token_ids, encode_rows, end_of_turn_id, kept_rows
from .figures import figures, kl_heatmap, q1_figure
from .forward import completion_terms, final_hidden, head_logits, position_kl
from .q1 import q1_scores, run_q1, token_kl
from .step import HEAL_KEYS, heal, run_stage, save_adapter, steps_csv
from .student import causal_lm, lora_target_regex, make_student, reference
from .train import HealParams, HealResult, barrier_weight, calibrate_tau, heal_loss, heal_step, lr_lambda, sequence_d, train

__all__ = ["Example", "collate", "completion_token_ids", "encode_rows", "end_of_turn_id", "kept_rows", "figures",
           "kl_heatmap", "q1_figure", "completion_terms", "final_hidden", "head_logits", "position_kl", "q1_scores",
           "run_q1", "token_kl", "HEAL_KEYS", "heal", "run_stage", "save_adapter", "steps_csv", "causal_lm",
           "lora_target_regex", "make_student", "reference", "HealParams", "HealResult", "barrier_weight",
           "calibrate_tau", "heal_loss", "heal_step", "lr_lambda", "sequence_d", "train"]
