"""The LSTM option-pricing model and option-pricing evaluation (layer L1).

The network follows the LSTM variants of the option-pricing literature (Ruf & Wang 2020 survey them): an LSTM
reads the underlying's recent daily returns, its last state summarises the volatility regime, and an MLP head
joins it with the contract's terms (log-moneyness, time to expiry, rate, call/put) to price the contract. The
input row is packed as ``[contract features | return window, time-major]`` (``fincast.features.options``), so it
trains with the same loop, clipping and AMP as the price model.

``evaluate`` scores any set of price predictions against the market on the same contracts: price and implied-vol
errors overall and by moneyness x maturity bucket, and the share of predictions that break no-arbitrage bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fincast.config import ModelConfig
from fincast.models import pricing


class OptionLSTM(nn.Module):
    """``x = [contract features (n_contract) | floor | window (lookback x channels, time-major)]`` -> one value per
    contract in target units. With ``bounded`` the output is ``floor + softplus(head)``: never below the no-arbitrage
    lower bound (price target) or below 0 (implied vol); otherwise the head's linear output."""

    def __init__(self, n_contract: int, lookback: int, channels: int, hidden_size: int = 32, num_layers: int = 1,
                 dropout: float = 0.0, layer_norm: bool = False, head_hidden: int = 64, head_layers: int = 2,
                 bounded: bool = True):
        super().__init__()
        self.n_contract, self.lookback, self.channels, self.bounded = n_contract, lookback, channels, bounded
        self.lstm = nn.LSTM(channels, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        layers: list[nn.Module] = []
        width = hidden_size + n_contract
        for _ in range(head_layers):
            layers += [nn.Linear(width, head_hidden), nn.SiLU()]
            width = head_hidden
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)  # the output layer (AGC's skip_output leaves it unclipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contract = x[:, :self.n_contract]
        seq = x[:, self.n_contract + 1:].reshape(x.shape[0], self.lookback, self.channels)
        out, _ = self.lstm(seq)
        state = self.drop(self.norm(out[:, -1]))
        z = self.head(self.mlp(torch.cat([state, contract], dim=1))).squeeze(-1)
        return x[:, self.n_contract] + F.softplus(z) if self.bounded else z


def build_option_model(cfg: ModelConfig, n_contract: int, lookback: int, channels: int) -> OptionLSTM:
    return OptionLSTM(n_contract, lookback, channels, cfg.hidden_size, cfg.num_layers, cfg.dropout, cfg.layer_norm,
                      cfg.head_hidden, cfg.head_layers, cfg.bounded_output)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

STATS = ["Contracts", "Priced [%]", "Price RMSE", "Price MAE", "Price RMSE / market RMS [%]", "IV RMSE [vol pts]", "IV MAE [vol pts]",
         "IV defined [%]", "Below lower bound [%]", "Above upper bound [%]", "Non-monotone in strike [%]",
         "Any violation [%]"]


@dataclass
class OptionEvaluation:
    stats: pd.DataFrame  # one row per model, STATS columns
    buckets: pd.DataFrame  # model, moneyness, maturity, contracts, price_rmse, price_mae, iv_rmse
    ivs: pd.DataFrame  # per model the implied vol of its prices (NaN where none exists), row-aligned with contracts


def implied_vols(prices: np.ndarray, c: pd.DataFrame) -> np.ndarray:
    return pricing.implied_vol(prices, c["S"].to_numpy(float), c["strike"].to_numpy(float), c["tau"].to_numpy(float),
                               c["r"].to_numpy(float), c["call"].to_numpy(bool), c["q"].to_numpy(float))


def violations(prices: np.ndarray, c: pd.DataFrame, tol: float = 1e-6) -> dict[str, np.ndarray]:
    """Per contract, whether ``prices`` break a no-arbitrage condition: below the lower bound (the discounted
    forward intrinsic value, at least intrinsic for European options), above the upper bound (the underlying for
    a call, the discounted strike for a put), or non-monotone in strike within one quote date, expiry and type
    (a call's price must not rise with the strike, a put's must not fall; the higher-strike contract of a pair
    that breaks it is flagged). ``tol`` is relative to the strike."""
    S, K = c["S"].to_numpy(float), c["strike"].to_numpy(float)
    call = c["call"].to_numpy(bool)
    lower, upper = pricing.bounds(S, K, c["tau"].to_numpy(float), c["r"].to_numpy(float), call, c["q"].to_numpy(float))
    eps = tol * K
    below = prices < lower - eps
    above = prices > upper + eps
    order = np.lexsort((K, call, c["expiry"].to_numpy(), c["quote_date"].to_numpy()))
    p, k, same = prices[order], K[order], np.zeros(len(order), bool)
    key = pd.DataFrame({"d": c["quote_date"].to_numpy()[order], "e": c["expiry"].to_numpy()[order],
                        "c": call[order]})
    if len(order) > 1:
        same[1:] = (key.iloc[1:].to_numpy() == key.iloc[:-1].to_numpy()).all(axis=1) & (k[1:] > k[:-1])
    dp = np.r_[0.0, np.diff(p)]
    wrong = same & np.where(call[order], dp > eps[order], dp < -eps[order])
    mono = np.zeros(len(order), bool)
    mono[order] = wrong
    return {"below": below, "above": above, "monotone": mono}


def bucket_order(edges: tuple, fmt: str) -> list[str]:
    """Bucket labels in order: below the first edge, between edges, at or above the last."""
    edges = list(edges)
    return [f"<{fmt.format(edges[0])}"] + [f"{fmt.format(a)}-{fmt.format(b)}" for a, b in zip(edges, edges[1:])] \
        + [f">={fmt.format(edges[-1])}"]


def _bucket_labels(values: np.ndarray, edges: tuple, fmt: str) -> np.ndarray:
    return np.array(bucket_order(edges, fmt), dtype=object)[np.searchsorted(list(edges), values, side="right")]


MONEYNESS_FMT, MATURITY_FMT = "{:g}", "{:d}d"


def bucket_labels(c: pd.DataFrame, moneyness_edges: tuple, maturity_edges: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Each contract's moneyness (K/S) and maturity (days to expiry) bucket, as ``evaluate`` labels them."""
    mny = _bucket_labels(c["strike"].to_numpy(float) / c["S"].to_numpy(float), moneyness_edges, MONEYNESS_FMT)
    days = (pd.to_datetime(c["expiry"]) - pd.to_datetime(c["quote_date"])).dt.days.to_numpy() if "expiry" in c \
        else np.round(c["tau"].to_numpy(float) * 365)
    return mny, _bucket_labels(days, tuple(int(e) for e in maturity_edges), MATURITY_FMT)


def evaluate(contracts: pd.DataFrame, predictions: dict[str, np.ndarray], *, moneyness_edges: tuple = (0.9, 0.97, 1.03, 1.1),
             maturity_edges: tuple = (14, 30, 60, 120)) -> OptionEvaluation:
    """Score each model's prices against the market price of the same contracts.

    ``contracts`` needs S, strike, tau, r, q, call, quote_date, expiry, price (the market) and optionally iv (the
    market's implied vol; computed when absent). Price errors are in the underlying's currency; IV errors in vol
    points (0.01 = 1 point) over the contracts where both the market and the model have an implied vol."""
    c = contracts
    market = c["price"].to_numpy(float)
    market_iv = c["iv"].to_numpy(float) if "iv" in c else implied_vols(market, c)
    mny, mat = bucket_labels(c, moneyness_edges, maturity_edges)
    rows, bucket_rows, ivs = [], [], {}
    for name, pred in predictions.items():
        pred = np.asarray(pred, float)
        err = pred - market
        iv = implied_vols(pred, c)
        ivs[name] = iv
        both = np.isfinite(iv) & np.isfinite(market_iv)
        ive = (iv - market_iv)[both] * 100
        v = violations(pred, c)
        finite = np.isfinite(err)  # a baseline without an input for a contract (no previous-day IV) skips it
        any_v = v["below"] | v["above"] | v["monotone"]
        e, mk = err[finite], market[finite]
        rows.append({
            "model": name, "Contracts": int(len(c)), "Priced [%]": 100 * float(np.mean(finite)) if len(c) else np.nan,
            "Price RMSE": float(np.sqrt(np.mean(e**2))) if finite.any() else np.nan,
            "Price MAE": float(np.mean(np.abs(e))) if finite.any() else np.nan,
            "Price RMSE / market RMS [%]": 100 * float(np.sqrt(np.mean(e**2)) / np.sqrt(np.mean(mk**2)))
            if finite.any() else np.nan,
            "IV RMSE [vol pts]": float(np.sqrt(np.mean(ive**2))) if len(ive) else np.nan,
            "IV MAE [vol pts]": float(np.mean(np.abs(ive))) if len(ive) else np.nan,
            "IV defined [%]": 100 * float(np.mean(np.isfinite(iv))),
            "Below lower bound [%]": 100 * float(np.mean(v["below"])),
            "Above upper bound [%]": 100 * float(np.mean(v["above"])),
            "Non-monotone in strike [%]": 100 * float(np.mean(v["monotone"])),
            "Any violation [%]": 100 * float(np.mean(any_v)),
        })
        frame = pd.DataFrame({"m": mny, "t": mat, "se": err**2, "ae": np.abs(err),
                              "ive2": np.where(both, ((iv - market_iv) * 100) ** 2, np.nan)})
        for (m, t), g in frame.groupby(["m", "t"], sort=False):
            bucket_rows.append({"model": name, "moneyness": m, "maturity": t, "contracts": len(g),
                                "price_rmse": float(np.sqrt(g["se"].mean())), "price_mae": float(g["ae"].mean()),
                                "iv_rmse": float(np.sqrt(g["ive2"].mean())) if g["ive2"].notna().any() else np.nan})
    stats = pd.DataFrame(rows).set_index("model")[STATS]
    buckets = pd.DataFrame(bucket_rows, columns=["model", "moneyness", "maturity", "contracts", "price_rmse",
                                                 "price_mae", "iv_rmse"])
    return OptionEvaluation(stats, buckets, pd.DataFrame(ivs, index=c.index))
