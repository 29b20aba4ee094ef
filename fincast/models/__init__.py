"""Models, baselines and forecast metrics (layer L1)."""

from fincast.models.baselines import naive_forecast, ridge_forecast
from fincast.models.lstm import LSTMForecaster, build_model
from fincast.models.metrics import forecast_metrics

__all__ = ["LSTMForecaster", "build_model", "forecast_metrics", "naive_forecast", "ridge_forecast"]
