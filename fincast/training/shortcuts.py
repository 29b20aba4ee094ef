"""Shortcuts over the engine's ``train_runs`` (layer L2): ``fit`` (one run, K = 1) and ``fit_batched`` (the name
earlier versions used for K runs stacked)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fincast.config import ClipConfig, MonitorConfig, TrainConfig
from fincast.features import Split
from fincast.training.engine import train_runs
from fincast.training.recorder import FitResult, MetricSink


def fit(model: torch.nn.Module, train: Split, val: Split, cfg: TrainConfig, clip: ClipConfig, *,
        device: torch.device, precision: str = "fp32", log_every: int = 50, sink: MetricSink | None = None,
        progress: bool = False, monitor: MonitorConfig | None = None,
        checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
        restore_best: bool = True, on_epoch: Callable[[int, float], bool] | None = None,
        loss_scale: float = 2.0 ** 16, cuda_graphs: bool = True, metric_every: int = 1) -> FitResult:
    """One run: :func:`train_runs` with K = 1 (see there)."""
    return train_runs([model], train, val, [cfg], [clip], device=device, precision=precision, log_every=log_every,
                      sinks=[sink], monitor=monitor, progress=progress, checkpoints=[checkpoint],
                      resumes=None if resume is None else [resume], restore_best=restore_best, on_epochs=[on_epoch],
                      loss_scale=loss_scale, cuda_graphs=cuda_graphs, metric_every=metric_every)[0]


def fit_batched(models: list[torch.nn.Module], train: Split, val: Split, cfgs: list[TrainConfig],
                clips: list[ClipConfig], *, device: torch.device, log_every: int = 50,
                sinks: list[MetricSink | None] | None = None, monitor: MonitorConfig | None = None,
                progress: bool = False, **kwargs) -> list[FitResult]:
    """K runs stacked: :func:`train_runs` (the name earlier versions used)."""
    return train_runs(models, train, val, cfgs, clips, device=device, log_every=log_every, sinks=sinks,
                      monitor=monitor, progress=progress, **kwargs)
