"""Synthetic source: seeded, realistic daily OHLCV for tests and offline demos.

Returns follow a GARCH(1,1) with Student-t (5 dof) innovations, so volatility clusters and tails are
fat, plus Poisson jumps. Equities get a US trading-day calendar (weekdays less US federal holidays,
a close stand-in for the NYSE calendar), about 18% annual volatility; crypto (``*-USD`` tickers or
``data.calendar=crypto``) trades every day at about 60% annual volatility. The same (ticker, seed,
start, end) always gives the same frame. With ``data.end`` null the series ends on 2024-12-31, so
results do not change with the day they are run.
"""

from __future__ import annotations

import datetime as dt
import zlib

import numpy as np
import pandas as pd
from pandas.tseries.holiday import USFederalHolidayCalendar
from pandas.tseries.offsets import CustomBusinessDay

DEFAULT_START = dt.date(2005, 1, 1)
DEFAULT_END = dt.date(2024, 12, 31)

_PARAMS = {
    #          daily vol, drift/day, jump rate/day, jump mean, jump sd, base price, base volume
    "equity": (0.011, 0.0003, 0.008, -0.02, 0.035, 100.0, 5e7),
    "crypto": (0.035, 0.0010, 0.015, -0.01, 0.08, 400.0, 2e9),
}


def is_crypto(ticker: str) -> bool:
    """Yahoo names crypto pairs like BTC-USD, ETH-EUR."""
    parts = ticker.upper().split("-")
    return len(parts) == 2 and parts[1] in {"USD", "USDT", "EUR", "GBP", "JPY", "BTC", "ETH"}


def calendar_for(ticker: str, calendar: str) -> str:
    if calendar != "auto":
        return calendar
    return "crypto" if is_crypto(ticker) else "equity"


def dates(start: dt.date, end: dt.date, calendar: str) -> pd.DatetimeIndex:
    if calendar == "crypto":
        idx = pd.date_range(start, end, freq="D")
    else:
        idx = pd.date_range(start, end, freq=CustomBusinessDay(calendar=USFederalHolidayCalendar()))
    return pd.DatetimeIndex(idx, name="date")


def generate(ticker: str, start: dt.date | None = None, end: dt.date | None = None, *, seed: int = 0,
             calendar: str = "auto") -> pd.DataFrame:
    kind = calendar_for(ticker, calendar)
    idx = dates(start or DEFAULT_START, end or DEFAULT_END, kind)
    n = len(idx)
    vol, drift, jump_rate, jump_mu, jump_sd, p0, v0 = _PARAMS[kind]
    rng = np.random.default_rng([seed, zlib.crc32(ticker.encode())])

    alpha, beta = 0.08, 0.90
    omega = vol**2 * (1 - alpha - beta)
    dof = 5.0
    z = rng.standard_t(dof, size=n) / np.sqrt(dof / (dof - 2))  # unit variance
    jumps = (rng.random(n) < jump_rate) * rng.normal(jump_mu, jump_sd, size=n)
    ret = np.empty(n)
    sig = np.empty(n)
    var = vol**2
    for t in range(n):
        sig[t] = np.sqrt(var)
        eps = sig[t] * z[t]
        ret[t] = drift - 0.5 * var + eps + jumps[t]
        var = omega + alpha * eps**2 + beta * var

    close = p0 * np.exp(np.cumsum(ret))
    prev = np.concatenate([[p0], close[:-1]])
    gap = rng.normal(0.0, 0.25, size=n) * sig * (0.3 if kind == "crypto" else 1.0)
    open_ = prev * np.exp(gap)
    wick = np.abs(rng.normal(0.0, 0.5, size=(2, n))) * sig
    high = np.maximum(open_, close) * np.exp(wick[0])
    low = np.minimum(open_, close) * np.exp(-wick[1])
    volume = np.round(v0 * np.exp(0.3 * rng.normal(size=n) + 3.0 * np.abs(ret) + 0.5 * (sig / vol - 1)))
    frame = pd.DataFrame(
        {"open": open_, "high": high, "low": low, "close": close, "adj_close": close, "volume": volume},
        index=idx,
    )
    return frame
