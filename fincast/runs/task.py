"""The task protocol (layer L4, runs): what a task module gives the run driver.

A task is a module (``fincast.runs.forecast``, ``fincast.runs.options``) registered by name in
``fincast.runs.registry``; ``cfg.task`` picks it. The driver (``fincast.runs.driver``) does everything runs
share — device, threads, seed, DDP rank, the MLflow run, checkpoints and resume, training, the closing metrics,
the model — and asks the task only for what is its own. Tasks never import each other or the driver; adding a
task is one module and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fincast.config import PipelineConfig
from fincast.training import FitResult


class Data(Protocol):
    """What a task loads: whatever it needs, with these three for the run's record and resume check."""
    source: str
    fingerprint: str
    warnings: list[str]


class Splits(Protocol):
    """What a task prepares: the samples the engine trains on (``features.Split``-like train/val/test)."""
    train: Any
    val: Any
    test: Any


@dataclass
class Description:
    """How a run presents itself before training: its name, tickers tag, extra tags and params."""
    name: str
    tickers: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Finished:
    """What a task made of a trained run: test metrics (logged beside the closing ones), the outcome's metrics
    table, files to log as artifacts, and other TrainOutcome fields (``report``, ``dropped``)."""
    test_metrics: list[tuple[str, float]]
    metrics: dict[str, dict[str, float]]
    files: list[Path]
    outcome: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """The functions a task module defines (checked for every registered task by tests/runs/test_registry.py)."""

    def load(self, cfg: PipelineConfig, *, progress: bool = False, refresh: bool = False) -> Data:
        """The run's data (cached, fetched when stale)."""

    def fetch(self, cfg: PipelineConfig, *, progress: bool = False, refresh: bool = True) -> list[str]:
        """``fincast data``: refresh the caches; lines to print."""

    def prepare(self, cfg: PipelineConfig, data: Data) -> Splits:
        """Samples: train, validation and test splits."""

    def build_model(self, cfg: PipelineConfig, splits: Splits) -> torch.nn.Module:
        """A fresh model for these samples (the driver seeds torch first)."""

    def describe(self, cfg: PipelineConfig, data: Data, splits: Splits) -> Description:
        """Run name, tags and params (besides the config's keys, which the driver logs)."""

    def finish(self, cfg: PipelineConfig, data: Data, splits: Splits, model: torch.nn.Module,
               device: torch.device, result: FitResult, name: str, artifact_dir: Path, *,
               draw_figures: bool = True, shared: dict | None = None, precision: str = "fp32",
               progress: bool = False) -> Finished:
        """Test evaluation beside the baselines, and the files to log (written into ``artifact_dir``, a
        temporary folder, or the task's own report folder); ``draw_figures=False``: no figures (a study's runs,
        whose curves its report draws). ``shared``: one dict for the runs of a stack (same data and samples):
        the baselines' test predictions are computed by the first run and kept there for the others.
        ``precision`` and ``progress``: the run's, for any training the task does after the run's own."""

    def baselines(self, cfg: PipelineConfig, data: Data, splits: Splits) -> list[tuple[str, float]]:
        """The baselines' test metrics, as ``finish`` names them (``baseline_<name>/<metric>``), without a model:
        what a study records once on its parent run."""

    def summary(self, out: Any, seconds: float) -> str:
        """``fincast train``'s printed summary of a TrainOutcome."""

    def missing_local_data(self, cfg: PipelineConfig) -> list[str]:
        """Local files the config reads that are not there (``--skip-missing-data``)."""

    def outputs(self, cfg: PipelineConfig) -> list[tuple[str, Path]]:
        """Folders a run writes itself besides its MLflow artifacts (its report), as (what, folder): checked
        before the run loads its data (``runs.preflight``). A study's runs (no figures) write none of them."""
