"""02_generate: steered completions at a dose calibrated so that the filter keeps ``calib_target``.

- :mod:`.sampling`: sample completions with the vector added (batched, seeded, optionally compiled);
- :mod:`.keepcurve`: the dose search's statistics (monotone fit, crossing, intervals; pure);
- :mod:`.dose`: the dose search and the collection, with sampling and judging injected; its flags;
- :mod:`.step`: the 02_generate step (``run_step(ctx) -> GenerateResult``);
- :mod:`.figures`, :mod:`.compare`: the notebook's plots; steered next to unsteered (HTML, a widget).
"""
