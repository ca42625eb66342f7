"""06_online: the loop run online (``loop=online``): per training step, steered completions of
the current student, filtered, one heal step on the kept ones; a checkpoint every ``online_every``
steps is a round folder like the round loop's.

- :mod:`.step`: the 06_online step (``run_stage(ctx) -> OnlineResult``), its schedule and telemetry;
- :mod:`.state`: the resume state (adapter, optimiser, step, RNG, vector), one safetensors file;
- :mod:`.figures`: the notebook's telemetry plots.
"""

from .figures import figures
from .state import read_state, restore, save_state
from .step import STEP_COLS, OnlineResult, checkpoints, read_steps, refresh_due, run_stage, segment

__all__ = ["figures", "read_state", "restore", "save_state", "STEP_COLS", "OnlineResult", "checkpoints", "read_steps",
           "refresh_due", "run_stage", "segment"]
