"""03_filter: which steered completions are fit to train on.

- :mod:`.lexicon`: word lists and patterns (no logic);
- :mod:`.text`: model-free signals of one completion (pure functions of text);
- :mod:`.model`: signals from the base model (tail perplexity, entropy collapse);
- :mod:`.gates`: the thresholds (the config's ``filter`` knobs), the drop reasons and ``decide``;
- :mod:`.rows`: score and decide rows; precision/recall on the labelled set;
- :mod:`.step`: the 03_filter step (``run_stage(ctx) -> FilterResult``);
- :mod:`.figures`, :mod:`.browser`: the notebook's plots and its row browser.
"""

from .browser import browser
from .figures import figures
from .gates import DROP_REASONS, GATES, LOOP_REASONS, THRESHOLD_KEYS, FilterThresholds, decide, loop_reason
from .model import MODEL_SCORE_KEYS, model_scores
from .rows import filter_rows, format_report, labelled_rows, precision_recall, reason_counts
from .step import FilterResult, TooFewKept, require_min_train, run_stage
from .text import prompt_overlap, text_scores

__all__ = ["browser", "figures", "DROP_REASONS", "GATES", "LOOP_REASONS", "THRESHOLD_KEYS", "FilterThresholds",
           "decide", "loop_reason", "MODEL_SCORE_KEYS", "model_scores", "filter_rows", "format_report",
           "labelled_rows", "precision_recall", "reason_counts", "FilterResult", "TooFewKept", "require_min_train",
           "run_stage", "prompt_overlap", "text_scores"]
