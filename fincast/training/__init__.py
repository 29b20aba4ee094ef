"""Training (layer L2): one engine for one run and for K runs stepping together.

* :mod:`.engine`: the loop (:func:`train_runs`; :func:`fit` is K = 1), stop rules, checkpoints and resume, DDP;
* :mod:`.optim`: stacked optimizers, learning-rate schedules, per-run fp16 loss scaling;
* :mod:`.recorder`: a run's statistics, metric rows, early stopping and :class:`FitResult`;
* :mod:`.checkpoint`: a run's state in and out of a stack; :mod:`.graphs`: the step as CUDA graphs;
* :mod:`.device` (device, precision, seeds, torchrun) and :mod:`.evaluate` (a trained model on a split).

Clipping (``fincast.clipping``) sits after ``backward()`` (and the fp16 unscale; under DDP after the all-reduce)
and before the optimizer.
"""

from fincast.training.device import dist_info, resolve_device, resolve_precision, seed_everything
from fincast.training.engine import Engine, train_runs
from fincast.training.evaluate import evaluate, predict, score
from fincast.training.optim import lr_factor, lr_table
from fincast.training.recorder import FitResult, MetricSink, SpikeCounter
from fincast.training.shortcuts import fit, fit_batched

__all__ = ["Engine", "FitResult", "MetricSink", "SpikeCounter", "dist_info", "evaluate", "fit", "fit_batched",
           "lr_factor", "lr_table", "predict", "resolve_device", "resolve_precision", "score", "seed_everything",
           "train_runs"]
