"""Walk-forward backtests (layer L2): leakage-free refits, baselines, forecast and trading evaluation."""

from fincast.backtest.evaluate import (
    diebold_mariano,
    forecast_stats,
    periods_per_year,
    positions,
    strategy_returns,
    trading_stats,
)
from fincast.backtest.stacking import stack_folds
from fincast.backtest.walkforward import (
    BacktestError,
    FitRequest,
    FoldFit,
    LSTMFitter,
    WalkForward,
    clip_configs,
    model_names,
    walk_forward,
)

__all__ = ["BacktestError", "FitRequest", "FoldFit", "LSTMFitter", "WalkForward", "clip_configs", "diebold_mariano",
           "forecast_stats", "model_names", "periods_per_year", "positions", "stack_folds", "strategy_returns",
           "trading_stats", "walk_forward"]
