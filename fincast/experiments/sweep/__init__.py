"""Clipping-threshold sweeps (layer L4, experiments): ``fincast sweep SPEC.yaml``, on Optuna.

Split by concern: ``spec`` (the spec, its search axes, each trial's config), ``coordination`` (the Optuna
storage, sampler, pruner and trial bookkeeping; the only module importing optuna), ``driving`` (trials as runs
in worker processes, the parent run, the summary).
"""

from fincast.experiments.coordination import FINISHED, importance, trials_table
from fincast.experiments.sweep.driving import SweepOutcome, describe, join, objective, run
from fincast.experiments.sweep.spec import THRESHOLD_KEYS, TRIAL_TAG, Sweep, load, trial_config
from fincast.experiments.workers import plan_workers

__all__ = ["FINISHED", "THRESHOLD_KEYS", "TRIAL_TAG", "Sweep", "SweepOutcome", "describe", "importance", "join", "load",
           "objective", "plan_workers", "run", "trial_config", "trials_table"]
