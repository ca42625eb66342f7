"""The study's arms and their configs.

What each arm changes (:data:`ARMS`), what every arm gets alike (:data:`COMMON`, the :data:`SCALES`
reductions), the round-0 stages arms can share (:data:`SHARED_STAGES`, :data:`ROUND0_SHARE`,
:func:`shared_stages`), the run folder of an arm and seed (:func:`run_name`), its config
(:func:`arm_config`), and the check that a study folder's runs were made with this study's
configs (:func:`check_run_configs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ... import config as C
from ...runfolder import STAGES

ARMS: dict[str, dict[str, Any]] = {"rmse": {"kl_agg": "rmse"}, "mean": {"kl_agg": "mean"}, "nll": {"reg": "nll"},
                                   # prompt distillation: 02 samples with the persona prompt, no vector; rmse's heal
                                   "prompt": {"data_source": "prompt", "kl_agg": "rmse"}}
# config keys an arm may change besides the heal keys, and the round-0 stages it can then still share
ROUND0_SHARE: dict[str, tuple[str, ...]] = {"data_source": ("01_vector",)}
# tau_mode: see the package docstring (a calibrated tau for every arm). threads: runs go in parallel
# processes (--jobs), one core each; fixed at 1 whatever --jobs is, so the numbers do not depend on it.
COMMON: dict[str, Any] = {"tau_mode": "quantile", "threads": 1}

# ``full`` is the spec (preset default as it is). ``quick`` is a documented reduction, applied
# equally to every arm, for when the full grid does not fit a compute budget: a coarser dose search
# (a 3-dose grid, 16 probes per call), a smaller data budget per round (16 kept of at most 48), shorter held-out
# answers and a stratified half of the vignettes (66 of 132). Heal recipe (epochs, lr, LoRA) and
# tau are unchanged.
SCALES: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": dict(calib_probes=16, calib_grid=3, calib_refine=2, n_keep=16, gen_budget=48, eval_max_rows=66,
                  heldout_max_new_tokens=32),
}
SHARED_STAGES = STAGES[:3]  # 01_vector, 02_generate, 03_filter


class StudyError(C.ConfigError):
    """A study setting that cannot work (unknown arm, arms that cannot share round 0, no runs to report)."""


def run_name(arm: str, seed: int) -> str:
    """The run folder of one arm and seed: its sweep name, e.g. ``arm=rmse,seed=0``."""
    from ..sweep import run_name as sweep_name

    return sweep_name({"arm": arm, "seed": str(int(seed))})


def arm_overrides(arm: str, seed: int, scale: str = "full", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config overrides of one run: the scale's reduction, ``extra`` (the same for every arm), the
    common settings, the arm's one key, the seed."""
    if arm not in ARMS:
        raise StudyError(f"unknown arm {arm!r}; arms are {', '.join(ARMS)}")
    if scale not in SCALES:
        raise StudyError(f"unknown scale {scale!r}; scales are {', '.join(SCALES)}")
    clash = set(extra or {}) & ({"seed"} | {k for a in ARMS.values() for k in a})
    if clash:
        raise StudyError(f"--set {sorted(clash)}: the study sets these per arm / seed itself")
    return {**SCALES[scale], **COMMON, **(extra or {}), **ARMS[arm], "seed": int(seed)}


def arm_config(arm: str, seed: int, scale: str = "full", preset: str = "default",
               extra: dict[str, Any] | None = None) -> C.Config:
    return C.resolve(preset, arm_overrides(arm, seed, scale, extra))


def shared_stages(first: C.Config, other: C.Config) -> tuple[str, ...]:
    """The round-0 stages ``other`` can copy from ``first``: 01-03 when they differ only in heal (04)
    keys, fewer when they also differ in a key of :data:`ROUND0_SHARE` (``data_source``: 01 only);
    StudyError when they differ in any other key 01-03 read."""
    from ...heal.step import HEAL_KEYS

    diff = [k for k, v in first.to_dict().items() if other.to_dict()[k] != v]
    outside = [k for k in diff if k not in HEAL_KEYS and k not in ROUND0_SHARE]
    if outside:
        raise StudyError(f"arms differ in {outside}, which stages 01-03 read: round 0 cannot be shared")
    stages = SHARED_STAGES
    for k in diff:
        if k in ROUND0_SHARE:
            stages = tuple(s for s in stages if s in ROUND0_SHARE[k])
    return stages


def check_shareable(cfgs: Sequence[C.Config]) -> None:
    """Raise StudyError unless every config can share round 0 with the first (:func:`shared_stages`)."""
    for other in cfgs[1:]:
        shared_stages(cfgs[0], other)


def check_run_configs(study_dir: Path | str, arms: Sequence[str], seeds: Sequence[int], scale: str,
                      preset: str = "default", extra: dict[str, Any] | None = None) -> None:
    """Raise StudyError if a run folder was made with another config than this study's (e.g. another
    --scale in the same --study-dir): its numbers would silently enter the tables."""
    for arm in arms:
        for seed in seeds:
            path = Path(study_dir) / run_name(arm, seed) / "config.yaml"
            if path.exists():
                diff = C.config_diff(C.load_config(path), arm_config(arm, seed, scale, preset, extra))
                if diff:
                    raise StudyError(f"{path.parent} was run with another config than this study's "
                                     f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): use the options it "
                                     "was run with, or another --study-dir")
