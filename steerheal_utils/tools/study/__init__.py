"""The matched-controls study (issue #7): does the KL aggregate matter, across seeds?

``python -m steerheal_utils study`` runs, then summarises, a grid of loop runs on the embedded
model: arms ``rmse`` (kl_agg=rmse), ``mean`` (kl_agg=mean) and ``nll`` (reg=nll, no barrier),
each for every seed, ``--rounds`` rounds, preset ``default``. Every arm gets the same config
apart from its one override: same reference (kl_ref), lam, data budget, and the same tau
*setting*: ``tau_mode=quantile`` for all (tau = the ``tau_quantile`` quantile of the
per-sequence D measured after the LR warm-up). An absolute tau is not comparable across
aggregates (brief section 1: the mean of a loop is ~4x smaller than its rmse), so a fixed
tau=0.5 would let the barrier bite for one aggregate and not the other; a calibrated tau
makes it bite on the same fraction of rows in both.

Resumable: every run resumes where it stopped (the driver skips finished stages), so
re-running the command continues the grid and then regenerates the outputs.

Outputs (``--out``, default docs/study/): runs.csv, summary.csv, trajectory.png,
ceo_outputs.json, study.json, results.md (see :func:`write_outputs`).

The modules:

- :mod:`.arms`: the arms, scales and common settings, run names, each run's config, which round-0
  stages arms can share;
- :mod:`.share`: copying round 0 (01-03 and the arm-independent evals) between the arms of a seed;
- :mod:`.run`: running the grid as one sweep through an executor (:func:`run_study`);
- :mod:`.loops`: the kept-data loop rate (a stricter copy of the filter's loop gates);
- :mod:`.collect`: reading the runs and summarising them over seeds, with item-bootstrap intervals;
- :mod:`.outputs`: the CSV, JSON, markdown and PNG outputs (:func:`write_outputs`);
- :mod:`.cli`: ``steerheal study``'s arguments (:func:`add_cli`).
"""

from .arms import (ARMS, COMMON, ROUND0_SHARE, SCALES, SHARED_STAGES, StudyError, arm_config, arm_overrides,
                   check_run_configs, check_shareable, run_name, shared_stages)
from .cli import add_cli
from .collect import (CONTROL_CONDITIONS, DELTA_KEYS, METRICS, PIPELINE_KEYS, SUMMARY_KEYS, collect_runs,
                      control_mismatch, is_control, item_cis, pipeline_rows, run_timings, spread, summarize,
                      summarize_pipeline)
from .loops import kept_loop_rate, labelled_flag_rates, loop_reason, strict_loop_thresholds
from .outputs import CEO_ID, base_ceo_answer, ceo_outputs, results_markdown, trajectory_png, write_outputs
from .run import adopt_old_names, run_study, study_spec
from .share import share_round0, share_round0_evals, shared_files

__all__ = [
    "ARMS", "CEO_ID", "COMMON", "CONTROL_CONDITIONS", "DELTA_KEYS", "METRICS", "PIPELINE_KEYS", "ROUND0_SHARE",
    "SCALES", "SHARED_STAGES", "SUMMARY_KEYS", "StudyError", "add_cli", "adopt_old_names", "arm_config",
    "arm_overrides", "base_ceo_answer", "ceo_outputs", "check_run_configs", "check_shareable", "collect_runs",
    "control_mismatch", "is_control", "item_cis", "kept_loop_rate", "labelled_flag_rates", "loop_reason",
    "pipeline_rows", "results_markdown", "run_name", "run_study", "run_timings", "share_round0",
    "share_round0_evals", "shared_files", "shared_stages", "spread", "strict_loop_thresholds", "study_spec",
    "summarize", "summarize_pipeline", "trajectory_png", "write_outputs",
]
