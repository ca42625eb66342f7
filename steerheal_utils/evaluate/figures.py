"""05_eval's plots: the run's trajectory so far (the report's panels, from metrics of every round that holds)."""

from __future__ import annotations

from ..report import figures as report_figures
from .step import EvalResult


def figures(result: EvalResult) -> list:
    """The report's figures A-D for the run this round belongs to: the rounds whose step records hold."""
    return report_figures(result.run_dir)
