"""fincast.backtest.uncertainty on processes whose answers are known: the stationary bootstrap's structure and
its intervals' coverage, the reality check's family-wise rate under the null and its power, and hand examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fincast.backtest.evaluate import forecast_stats, strategy_returns
from fincast.backtest.uncertainty import (
    best_days_share,
    seed_spread,
    stationary_indices,
    trading_uncertainty,
)


def test_stationary_indices_are_wrapped_blocks_of_geometric_length():
    rng = np.random.default_rng(0)
    n, block = 500, 10.0
    idx = stationary_indices(n, 400, block, rng)
    assert idx.shape == (400, n) and idx.min() >= 0 and idx.max() < n
    breaks = idx[:, 1:] != (idx[:, :-1] + 1) % n  # a new block starts
    # a new block starts with probability 1/block (a fresh start can also land on the next index: 1/n)
    assert breaks.mean() == pytest.approx(1 / block * (1 - 1 / n), abs=0.005)
    counts = np.bincount(idx.ravel(), minlength=n) / idx.size  # every day equally likely
    assert counts.min() > 0.5 / n and counts.max() < 1.5 / n


def _ar1(rng, n, mu, sd, phi):
    """AR(1) daily returns with mean mu and marginal standard deviation sd."""
    e = rng.normal(0, sd * math.sqrt(1 - phi**2), n + 200)
    x = np.zeros(n + 200)
    for t in range(1, n + 200):
        x[t] = phi * x[t - 1] + e[t]
    return mu + x[200:]


def test_sharpe_interval_covers_the_true_sharpe_of_a_dependent_process():
    """Annualised Sharpe 1.0 (mu/sd x sqrt(252)) of AR(1) returns (phi 0.3): the 95% interval covers it in about
    95% of 200 simulated histories of 750 days."""
    rng = np.random.default_rng(11)
    sd = 0.01
    mu = sd / math.sqrt(252)
    hits = 0
    for i in range(200):
        r = _ar1(rng, 750, mu, sd, 0.3)
        out = trading_uncertainty({"s": r, "bh": rng.normal(0, sd, 750)}, "bh", 252, n_boot=300, block=20, seed=i)
        hits += out.loc["s", "Sharpe CI low"] <= 1.0 <= out.loc["s", "Sharpe CI high"]
    assert 0.88 <= hits / 200 <= 0.99


def _null_market(rng, n=750, k=6):
    """k strategies whose daily returns have the same distribution as buy and hold's (no edge)."""
    bh = rng.normal(0.0003, 0.01, n)
    return {"bh": bh, **{f"s{j}": rng.normal(0.0003, 0.01, n) for j in range(k)}}


def test_reality_check_holds_the_family_wise_rate_where_no_strategy_has_an_edge():
    rng = np.random.default_rng(5)
    sims, false, raw = 150, 0, 0
    for i in range(sims):
        out = trading_uncertainty(_null_market(rng), "bh", 252, n_boot=300, block=5, seed=i)
        false += (out["Edge p (reality check)"] < 0.05).any()
        raw += (out["Edge p (raw)"] < 0.05).any()
    assert false / sims <= 0.09  # 0.05 plus binomial noise (sd 1.8 points)
    assert raw / sims >= 0.15  # 6 strategies tested one by one: ~26% of histories show a false edge


def test_reality_check_finds_a_real_edge_and_counts_the_strategies():
    rng = np.random.default_rng(9)
    market = _null_market(rng, n=1500)
    market["s0"] = rng.normal(0.0015, 0.01, 1500)  # annualised Sharpe ~2.4 against ~0.5
    out = trading_uncertainty(market, "bh", 252, n_boot=500, block=5, seed=1)
    assert out.loc["s0", "Edge p (reality check)"] < 0.05 and out.loc["s0", "Sharpe vs B&H CI low"] > 0
    assert out.attrs["strategies_tested"] == 6
    assert math.isnan(out.loc["bh", "Edge p (reality check)"])
    # the adjusted p is never below the raw one
    assert (out["Edge p (reality check)"].dropna() >= out["Edge p (raw)"].dropna() - 1e-12).all()


def test_a_flat_strategy_is_not_tested():
    rng = np.random.default_rng(2)
    out = trading_uncertainty({"bh": rng.normal(0, 0.01, 300), "flat": np.zeros(300)}, "bh", 252, n_boot=200)
    assert math.isnan(out.loc["flat", "Edge p (reality check)"]) and out.attrs["strategies_tested"] == 0


def test_best_days_share_by_hand():
    bench = np.zeros(12)
    r = np.array([0.10, 0.05, 0, 0, 0, 0, 0, 0, 0, 0, 0, -0.02])
    d = np.log1p(r)
    top10 = np.sort(d)[-10:].sum()  # every day but the loss
    assert best_days_share(r, bench) == pytest.approx(100 * top10 / d.sum())
    assert best_days_share(r, bench) > 100  # the outperformance came from fewer days than it lost on
    assert math.isnan(best_days_share(-r, bench))  # no outperformance: undefined


def test_seed_spread_medians_and_ranges():
    stats = pd.DataFrame({
        "ticker": ["X"] * 4, "model": ["lstm-a/seed0", "lstm-a/seed1", "lstm-a/seed2", "ridge"],
        "Sharpe Ratio": [0.3, -0.2, 0.1, 0.5], "Sharpe CI low": [-0.5, -1.0, -0.7, 0.0],
        "Edge p (reality check)": [0.4, 0.9, 0.6, 0.2]})
    out = seed_spread(stats, lambda m: m.split("/seed")[0], ["Sharpe Ratio"]).set_index("model")
    assert list(out.index) == ["lstm-a"]
    row = out.loc["lstm-a"]
    assert row["Sharpe Ratio"] == pytest.approx(0.1) and row["Seeds"] == 3
    assert (row["Sharpe Ratio min"], row["Sharpe Ratio max"]) == (-0.2, 0.3)
    assert row["Sharpe CI low"] == -0.7  # the median seed's interval
    assert row["Edge p (reality check)"] == 0.4  # any seed's edge: the smallest adjusted p


def test_borrow_cost_is_paid_on_shorts_only():
    held = np.array([1.0, -1.0, -0.5, 0.0])
    sr = strategy_returns(np.zeros(4), held, cost_bps=0.0, borrow_bps=252.0, periods=252)  # 1 bp a bar per unit
    np.testing.assert_allclose(sr["borrow"], [0, 1e-4, 0.5e-4, 0])
    np.testing.assert_allclose(sr["net"], [0, -1e-4, -0.5e-4, 0])


def test_always_long_accuracy_is_the_share_of_rises():
    y = np.array([0.01, -0.02, 0.03, 0.0])
    fs = forecast_stats(y, np.full(4, -0.01), np.zeros(4))
    assert fs["Always-Long Accuracy [%]"] == pytest.approx(100 * (2 + 0.5) / 4)
    assert fs["Directional Accuracy [%]"] == pytest.approx(100 * 1 / 4)
