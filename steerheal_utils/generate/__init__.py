"""02_generate: steered completions at a dose calibrated so that the filter keeps ``calib_target``.

- :mod:`.sampling`: sample completions with the vector added (batched, seeded, optionally compiled);
- :mod:`.keepcurve`: the dose search's statistics (monotone fit, crossing, intervals; pure);
- :mod:`.dose`: the dose search and the collection, with sampling and judging injected; its flags;
- :mod:`.step`: the 02_generate step (``run_stage(ctx) -> GenerateResult``);
- :mod:`.figures`, :mod:`.compare`: the notebook's plots; steered next to unsteered (HTML, a widget).
"""

from .compare import compare, compare_widget, comparison_html, heldout_comparison, widget
from .dose import (DOSE_FLAGS, REUSE_ALPHA, Calibration, CalibrationError, calibrate_dose, collect, dose_checks,
                   dose_warning, probe_calls)
from .figures import figures
from .keepcurve import (MONOTONE_ALPHA, KeepCurve, binom_cdf, binom_deviance, crossing, fit_keep_curve, grid_doses,
                        isotonic_decreasing, wilson)
from .sampling import compiled_generation, permutation, sample, sample_params
from .step import ROW_KEYS, GenerateResult, filter_judge, run_stage, warn_dose

__all__ = ["compare", "compare_widget", "comparison_html", "heldout_comparison", "widget", "DOSE_FLAGS", "REUSE_ALPHA",
           "Calibration", "CalibrationError", "calibrate_dose", "collect", "dose_checks", "dose_warning", "probe_calls",
           "figures", "MONOTONE_ALPHA", "KeepCurve", "binom_cdf", "binom_deviance", "crossing", "fit_keep_curve",
           "grid_doses", "isotonic_decreasing", "wilson", "compiled_generation", "permutation", "sample",
           "sample_params", "ROW_KEYS", "GenerateResult", "filter_judge", "run_stage", "warn_dose"]
