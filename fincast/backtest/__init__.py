"""Walk-forward backtests (layer L2): leakage-free refits, baselines, forecast and trading evaluation."""

from fincast.backtest.evaluate import (
    diebold_mariano,
    forecast_stats,
    periods_per_year,
    positions,
    strategy_returns,
    trading_stats,
)
from fincast.backtest.naming import clip_configs, family, lstm_families, model_names
from fincast.backtest.stacking import stack_folds
from fincast.backtest.walkforward import (
    BacktestError,
    FitRequest,
    FoldFit,
    LSTMFitter,
    WalkForward,
    walk_forward,
)

__all__ = ["BacktestError", "FitRequest", "FoldFit", "LSTMFitter", "WalkForward", "clip_configs", "diebold_mariano",
           "family", "forecast_stats", "lstm_families", "model_names", "periods_per_year", "positions", "stack_folds", "strategy_returns",
           "trading_stats", "walk_forward"]
