"""Figures by topic (layer L3, reports): ``training`` (one run), ``stability`` (a study), ``backtest``,
``options``, ``sweep``; ``canvas`` is the only module that imports matplotlib. Every figure is a PNG written
atomically."""

from fincast.reports.figures.backtest import equity_drawdown, fold_errors, forecast_scatter, rolling_sharpe
from fincast.reports.figures.canvas import save_figure
from fincast.reports.figures.options import option_bucket_heatmap, option_scatter
from fincast.reports.figures.stability import band_curves, distributions, heatmap, heatmaps
from fincast.reports.figures.sweep import sweep_objective
from fincast.reports.figures.training import grad_norm_histogram, training_curves

__all__ = ["band_curves", "distributions", "equity_drawdown", "fold_errors", "forecast_scatter", "grad_norm_histogram",
           "heatmap", "heatmaps", "option_bucket_heatmap", "option_scatter", "rolling_sharpe", "save_figure",
           "sweep_objective", "training_curves"]
