"""LSTM forecaster: (batch, lookback, features) -> one number per sample."""

from __future__ import annotations

import torch
from torch import nn

from fincast.config import ModelConfig


class LSTMForecaster(nn.Module):
    def __init__(self, n_features: int, hidden_size: int = 32, num_layers: int = 1, dropout: float = 0.0,
                 layer_norm: bool = False):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        last = self.drop(self.norm(out[:, -1]))
        return self.head(last).squeeze(-1)


def build_model(cfg: ModelConfig, n_features: int) -> LSTMForecaster:
    return LSTMForecaster(n_features, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.layer_norm)
