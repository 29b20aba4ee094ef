"""A trained model's predictions and scores on a split (the pipeline's test evaluation)."""

from __future__ import annotations

import numpy as np
import torch

from fincast.features import Split
from fincast.models.metrics import forecast_metrics


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, device: torch.device,
            batch_size: int = 8192) -> np.ndarray:
    """Model outputs (in training-target units) for every sample."""
    model.eval()
    out = []
    xt = torch.as_tensor(x)
    for i in range(0, len(xt), batch_size):
        out.append(model(xt[i:i + batch_size].to(device, non_blocking=True)).float().cpu())
    model.train()
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def evaluate(model: torch.nn.Module, split: Split, device: torch.device) -> tuple[float, dict[str, float], np.ndarray]:
    """(loss in training units, metrics in log-return units, predictions in log-return units)."""
    return score(predict(model, split.x, device), split)


def score(pred: np.ndarray, split: Split) -> tuple[float, dict[str, float], np.ndarray]:
    """``evaluate`` from predictions in training units (float64)."""
    loss = float(np.mean((pred - split.y) ** 2))
    pred_raw = pred * split.scale
    return loss, forecast_metrics(split.y_raw, pred_raw), pred_raw
