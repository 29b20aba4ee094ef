"""How a walk-forward backtest's folds are grouped into stacks that train together (layer L2)."""

from __future__ import annotations

import math

import numpy as np

from fincast.config import PipelineConfig


def stack_folds(cfg: PipelineConfig, cuda: bool) -> int:
    """Folds whose LSTMs train as one stack: ``backtest.stack_folds``; auto = every fold on CUDA (a small run is
    bound by kernel launches there, which a stack shares), 32 on a CPU (measured: docs/backtests.md). One with
    warm_start: each fold starts from the weights of the one before."""
    if cfg.backtest.warm_start:
        return 1
    stack = cfg.backtest.stack_folds
    return (1 << 30 if cuda else 32) if stack == "auto" else int(stack)


def fold_stacks(folds: int, most: int, workers: int = 1) -> list[range]:
    """Fold indices in consecutive stacks of at most ``most``, as even as possible, as many as a multiple of
    ``workers`` where there are folds enough (129 in stacks of 64: 43 x 3; for 2 workers 32.25 x 4)."""
    n = math.ceil(folds / max(1, most))
    n = min(folds, math.ceil(n / max(1, workers)) * max(1, workers))
    size, extra = divmod(folds, n)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(n)])
    return [range(int(a), int(z)) for a, z in zip(bounds[:-1], bounds[1:])]
