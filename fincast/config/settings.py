"""The settings sections of study and sweep specs (``study:`` and ``sweep:``), checked like pipeline keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fincast.config.schema import _opt


@dataclass(frozen=True)
class StudySettings:
    """The ``study:`` section of a study spec (pipelines/stability_*.yaml): how the runs are executed and
    judged. The grid itself is the spec's ``matrix``."""
    workers: int | None = _opt(
        None, "parallel worker processes; null = one per GPU when the runs train on CUDA (each worker its GPU), else "
              "one per CPU core", ge=1, le=256)
    threads: int | None = _opt(None, "torch CPU threads per worker; null = cores / workers (at least 1)", ge=1, le=1024)
    batch_runs: int | Literal["auto"] = _opt(
        "auto", "runs trained together as one stack by the training engine (same task, data, features, model and "
                "precision; any seed, lr, optimizer, schedule, step limits, checkpoints or clip config): auto = "
                "split across the workers within the memory budget; 1 = one run at a time", ge=1, le=100000)
    divergence_factor: float = _opt(
        3.0, "a run also counts as diverged when its final validation loss exceeds this multiple of the zero "
             "forecast's validation loss (non-finite loss always counts)", gt=1)
    loss_target: float | None = _opt(
        None, "steps-to-target: the validation loss to reach (training units); null = the zero forecast's")
    confidence: float = _opt(0.95, "confidence level of the intervals in the report", gt=0.5, lt=1)
    bootstrap: int = _opt(10000, "bootstrap resamples for the confidence intervals", ge=100, le=1_000_000)
    family_alpha: float = _opt(
        0.05, "family-wise error rate of the verdicts: Holm's adjustment across every test the study makes (each "
              "clip config x learning rate, on divergence and on final validation loss)", gt=0, lt=0.5)
    equivalence_pct: float = _opt(
        2.0, "minimum effect size, in percent of the unclipped final validation loss: a comparison whose "
             "simultaneous interval lies inside +-this (with equal divergence counts) is called equivalent", gt=0,
        le=100)


@dataclass(frozen=True)
class SweepSettings:
    """The ``sweep:`` section of a sweep spec (pipelines/sweep_*.yaml): how thresholds are searched and where
    trials are coordinated. The search space itself is the spec's ``search``."""
    sampler: Literal["grid", "random", "tpe"] = _opt(
        "tpe", "grid: every point of the search's grid; random: independent draws; tpe: Bayesian optimisation "
               "(Optuna's Tree-structured Parzen Estimator)")
    trials: int | None = _opt(
        None, "trials to finish (complete or pruned); null = 30; the grid sampler runs its whole grid instead",
        ge=1,
        le=100000)
    grid_points: int = _opt(4, "grid sampler: points per {low, high} range, log-spaced, both ends included",
                            ge=2, le=100)
    seed: int = _opt(0, "seed of the random and TPE samplers (each worker draws its own stream from it)", ge=0)
    pruner: Literal["median", "none"] = _opt(
        "median", "median: stop a trial whose validation loss at an epoch is worse than the median of earlier "
                  "trials' at that epoch; none: every trial runs to its end")
    prune_startup_trials: int = _opt(5, "median pruner: trials that finish before any is pruned", ge=0)
    prune_warmup_epochs: int = _opt(3, "median pruner: epochs of a trial that are never pruned", ge=0)
    divergence_penalty: float = _opt(
        10.0, "objective of a trial whose training went non-finite: this multiple of the zero forecast's "
              "validation loss (worse than predicting nothing), so the sampler learns to avoid it", gt=1)
    range: Literal["spec", "advised"] = _opt(
        "spec", "advised: replace the range of clip.norm.max_norm with the advisor's (an unclipped probe run at "
                "the middle of search.lr: half its lowest proposal to twice its highest)")
    advise_steps: int = _opt(300, "range advised: steps of the unclipped probe run", ge=20, le=1_000_000)
    workers: int | None = _opt(
        None, "worker processes on this machine; null = one per GPU, else one per CPU core", ge=1, le=256)
    threads: int | None = _opt(None, "torch CPU threads per worker; null = cores / workers (at least 1)", ge=1,
                               le=1024)
    storage: str | None = _opt(
        None, "Optuna storage (SQLAlchemy URL) shared by the workers; null = sqlite:///optuna.db in the working "
              "directory; a PostgreSQL/MySQL URL lets workers on several machines join (--storage, --join)")
