"""03_filter: which steered completions are fit to train on.

- :mod:`.lexicon`: word lists and patterns (no logic);
- :mod:`.text`: model-free signals of one completion (pure functions of text);
- :mod:`.model`: signals from the base model (tail perplexity, entropy collapse);
- :mod:`.gates`: the thresholds (the config's ``filter`` knobs), the drop reasons and ``decide``;
- :mod:`.rows`: score and decide rows; precision/recall on the labelled set;
- :mod:`.step`: the 03_filter step (``run_step(ctx) -> FilterResult``);
- :mod:`.figures`, :mod:`.browser`: the notebook's plots and its row browser.
"""
