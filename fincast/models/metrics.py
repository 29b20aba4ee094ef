"""Forecast metrics as one pure function."""

from __future__ import annotations

import numpy as np


def forecast_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and directional accuracy of log-return forecasts (same units as the inputs).

    Directional accuracy is the share of samples whose forecast has the sign of the realised return;
    a forecast of exactly 0 makes no call and counts as half a hit, so the zero (naive) forecast scores
    0.5 rather than 0.
    """
    y_true = np.asarray(y_true, float)
    y_pred = np.asarray(y_pred, float)
    err = y_pred - y_true
    hits = np.where(y_pred == 0, 0.5, (np.sign(y_pred) == np.sign(y_true)).astype(float))
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "directional_accuracy": float(np.mean(hits)),
    }
