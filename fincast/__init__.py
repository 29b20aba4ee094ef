"""fincast: LSTM forecasting on financial time series, with gradient clipping studied, not assumed."""

__version__ = "0.1.0"
