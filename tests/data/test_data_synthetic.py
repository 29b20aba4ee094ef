"""Synthetic source: reproducible, realistic bars on the right calendar, valid under the contract."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from fincast.config import from_dict
from fincast.data import COLUMNS, load_prices, synthetic
from fincast.data.validate import validate

START, END = dt.date(2005, 1, 1), dt.date(2024, 12, 31)


@pytest.fixture(scope="module")
def long_equity() -> pd.DataFrame:
    return synthetic.generate("SPY", START, END, seed=0)


@pytest.fixture(scope="module")
def long_crypto() -> pd.DataFrame:
    return synthetic.generate("BTC-USD", dt.date(2015, 1, 1), END, seed=0)


def log_returns(frame: pd.DataFrame) -> np.ndarray:
    return np.diff(np.log(frame["close"].to_numpy()))


def autocorr(x: np.ndarray, lag: int = 1) -> float:
    return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])


def excess_kurtosis(x: np.ndarray) -> float:
    z = (x - x.mean()) / x.std()
    return float((z**4).mean() - 3.0)


def test_same_seed_gives_identical_frames():
    a = synthetic.generate("SPY", dt.date(2020, 1, 1), dt.date(2021, 12, 31), seed=5)
    b = synthetic.generate("SPY", dt.date(2020, 1, 1), dt.date(2021, 12, 31), seed=5)
    pd.testing.assert_frame_equal(a, b)


def test_different_seed_or_ticker_gives_different_frames():
    a = synthetic.generate("SPY", dt.date(2020, 1, 1), dt.date(2021, 12, 31), seed=5)
    b = synthetic.generate("SPY", dt.date(2020, 1, 1), dt.date(2021, 12, 31), seed=6)
    c = synthetic.generate("QQQ", dt.date(2020, 1, 1), dt.date(2021, 12, 31), seed=5)
    assert a.index.equals(b.index)
    assert not np.allclose(a["close"], b["close"])
    assert not np.allclose(a["close"], c["close"])


def test_load_prices_synthetic_is_reproducible_and_seeded():
    cfg = from_dict({"data": {"source": "synthetic", "tickers": ["SPY", "ETH-USD"], "start": "2022-01-01",
                              "end": "2023-12-31", "seed": 1}}).data
    p1, p2 = load_prices(cfg), load_prices(cfg)
    assert p1.fingerprint == p2.fingerprint
    for t in cfg.tickers:
        pd.testing.assert_frame_equal(p1.frames[t], p2.frames[t])
    other = load_prices(from_dict({"data": {"source": "synthetic", "tickers": ["SPY", "ETH-USD"],
                                            "start": "2022-01-01", "end": "2023-12-31", "seed": 2}}).data)
    assert other.fingerprint != p1.fingerprint
    assert p1.network_calls == 0 and p1.source == "synthetic"


def test_open_ended_series_does_not_depend_on_today():
    a = synthetic.generate("SPY", dt.date(2024, 6, 1), None, seed=0)
    assert a.index[-1] <= pd.Timestamp(synthetic.DEFAULT_END)
    assert a.index[-1] >= pd.Timestamp(synthetic.DEFAULT_END) - pd.Timedelta(days=5)
    pd.testing.assert_frame_equal(a, synthetic.generate("SPY", dt.date(2024, 6, 1), synthetic.DEFAULT_END, seed=0))


def test_crypto_trades_every_day(long_crypto):
    idx = long_crypto.index
    assert idx[0] == pd.Timestamp("2015-01-01") and idx[-1] == pd.Timestamp(END)
    assert len(idx) == (END - dt.date(2015, 1, 1)).days + 1
    assert (np.diff(idx.to_numpy()) == np.timedelta64(1, "D")).all()
    assert set(idx.day_of_week) == set(range(7))


def test_equities_have_no_weekends_or_holidays(long_equity):
    idx = long_equity.index
    assert not (idx.day_of_week >= 5).any()
    assert idx.is_monotonic_increasing and idx.is_unique
    for holiday in ("2019-12-25", "2020-01-01", "2021-07-05", "2024-07-04", "2024-11-28"):
        assert pd.Timestamp(holiday) not in idx
    per_year = pd.Series(1, index=idx).groupby(idx.year).sum()
    assert per_year.between(245, 256).all()  # about 252 trading days a year


def test_calendar_setting_overrides_ticker_name():
    start, end = dt.date(2024, 1, 1), dt.date(2024, 3, 31)
    assert (synthetic.generate("SPY", start, end, calendar="crypto").index.day_of_week >= 5).any()
    assert not (synthetic.generate("BTC-USD", start, end, calendar="equity").index.day_of_week >= 5).any()
    assert synthetic.is_crypto("eth-usd") and not synthetic.is_crypto("SPY") and not synthetic.is_crypto("BRK-B")


@pytest.mark.parametrize("which", ["long_equity", "long_crypto"])
def test_volatility_clustering_and_fat_tails(which, request):
    r = log_returns(request.getfixturevalue(which))
    assert len(r) > 3000
    ac_abs, ac_raw = autocorr(np.abs(r)), autocorr(r)
    assert ac_abs > 0.08  # |r| is persistent ...
    assert ac_abs > abs(ac_raw) + 0.05  # ... while r itself is close to unpredictable
    assert abs(ac_raw) < 0.1
    assert excess_kurtosis(r) > 1.0


def test_volatility_levels_differ_by_asset_class(long_equity, long_crypto):
    eq = log_returns(long_equity).std() * np.sqrt(252)
    cr = log_returns(long_crypto).std() * np.sqrt(365)
    assert 0.08 < eq < 0.4
    assert cr > 2 * eq


@pytest.mark.parametrize("which", ["long_equity", "long_crypto"])
def test_ohlc_consistent(which, request):
    f = request.getfixturevalue(which)
    assert list(f.columns) == list(COLUMNS)
    assert (f["low"] <= f["open"]).all() and (f["open"] <= f["high"]).all()
    assert (f["low"] <= f["close"]).all() and (f["close"] <= f["high"]).all()
    assert (f[["open", "high", "low", "close", "adj_close"]] > 0).all().all()
    assert (f["volume"] >= 0).all()
    assert f.notna().all().all() and np.isfinite(f.to_numpy()).all()


@pytest.mark.parametrize("which", ["long_equity", "long_crypto"])
def test_passes_validate_without_repairs(which, request):
    f = request.getfixturevalue(which)
    checked = validate(f, "X", "synthetic", min_rows=1000)
    assert checked.warnings == []
    pd.testing.assert_frame_equal(checked.frame, f, check_freq=False)
