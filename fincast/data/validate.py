"""The price-frame contract and its checks.

Every source returns, per ticker, a DataFrame with a tz-naive DatetimeIndex named ``date`` (one row per
bar, the ticker's own calendar) and float64 columns ``open, high, low, close, adj_close, volume``.
``validate`` enforces it on every load. Each problem is an error naming the ticker, the date and the
column, except these documented repairs (each reported as a warning with a count):

* unsorted dates are sorted;
* a run of at most ``max_fill_gap`` consecutive bars with missing values (Yahoo's crypto holes, e.g.
  ETH-USD 2020-10-12/13) is forward-filled from the last good bar, volume included (a volume of 0
  would be a -25 sigma outlier of the volume feature);
* a missing ``adj_close`` column is taken from ``close`` (yfinance with auto_adjust=True);
* a close-only series (``Date,Close``, e.g. the ^IRX rate) gets open = high = low = close and volume 0; a file
  with some but not all of open/high/low/volume is still an error.

Calendars are never aligned across tickers: each ticker keeps its own bars, so mixing crypto
(7-day) and equities (trading days) invents no rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fincast.config import FincastError

COLUMNS = ("open", "high", "low", "close", "adj_close", "volume")
PRICE_COLUMNS = ("open", "high", "low", "close", "adj_close")

# Yahoo / vendor spellings -> contract names, keyed by the lower-cased name without spaces, '_', '-' and '.'
ALIASES = {
    "date": "date", "datetime": "date", "timestamp": "date", "open": "open", "high": "high", "low": "low",
    "close": "close", "adjclose": "adj_close", "adjustedclose": "adj_close", "adjclosing": "adj_close",
    "adjustedclosingprice": "adj_close", "adjcloseprice": "adj_close", "closeadj": "adj_close",
    "closeadjusted": "adj_close", "volume": "volume", "vol": "volume",
}


def _key(name: object) -> str:
    return re.sub(r"[\s_.\-]", "", str(name).lower())


class DataError(FincastError):
    pass


@dataclass
class Checked:
    frame: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


def normalize_columns(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Rename Yahoo-style columns to the contract names; error on missing ones."""
    rename: dict = {}
    for col in df.columns:
        target = ALIASES.get(_key(col))
        if target in rename.values():
            other = next(c for c, t in rename.items() if t == target)
            raise DataError(f"{where}: columns {other!r} and {col!r} are both read as {target}; keep one")
        if target:
            rename[col] = target
    unplaced = [c for c in df.columns if c not in rename and "adj" in _key(c) and "close" in _key(c)]
    if unplaced and "adj_close" not in rename.values():  # never fall back to Close when the file has an adjusted one
        raise DataError(f"{where}: column {unplaced[0]!r} looks like an adjusted close but is not one of the known "
                        f"names (Adj Close, Adjusted Close, Adj_Close, adjclose, ...); found columns: "
                        f"{', '.join(map(str, df.columns))}. Rename it to Adj Close")
    df = df.rename(columns=rename)
    if "adj_close" not in df.columns and "close" in df.columns:
        df = df.assign(adj_close=df["close"])
    if "close" in df.columns and not {"open", "high", "low", "volume"} & set(df.columns):
        # close-only series (rates and indices such as ^IRX: Date,Close): flat bars without volume
        df = df.assign(open=df["close"], high=df["close"], low=df["close"], volume=0.0)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; expected Date,Open,High,Low,Close,Adj Close,Volume "
            f"(found: {', '.join(map(str, df.columns))})")
    return df[list(COLUMNS)]


def fmt_dates(idx: pd.Index, limit: int = 5) -> str:
    dates = [d.strftime("%Y-%m-%d") for d in idx[:limit]]
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return ", ".join(dates) + more


def validate(df: pd.DataFrame, ticker: str, where: str, *, max_fill_gap: int = 3, min_rows: int = 1,
             row_of=None, positive: bool = True) -> Checked:
    """Check (and where documented, repair) one ticker's frame. ``where`` names the source in messages;
    ``row_of(date)`` may map a date to a file line number for messages."""
    warnings: list[str] = []
    label = f"{ticker} ({where})" if where else ticker

    def at(date: pd.Timestamp) -> str:
        s = f"date {date:%Y-%m-%d}"
        if row_of is not None:
            line = row_of(date)
            if line is not None:
                s += f" (line {line})"
        return s

    df = _dated(df, label, warnings)
    df = _numeric(df, label, at)
    df = _fill_missing(df, label, at, max_fill_gap, warnings)
    _check_values(df, label, at, positive)
    if len(df) < min_rows:
        span = f" ({df.index[0]:%Y-%m-%d} to {df.index[-1]:%Y-%m-%d})" if len(df) else ""
        raise DataError(f"{label}: history too short: {len(df)} bars{span}, the pipeline needs at least {min_rows} "
                        "(lookback + feature warm-up + horizon + enough samples for train/val/test); "
                        "use an earlier data.start or a shorter features.lookback")
    return Checked(df, warnings)


def _dated(df: pd.DataFrame, label: str, warnings: list[str]) -> pd.DataFrame:
    """Normalised, unique, ascending dates (a copy)."""
    if not isinstance(df.index, pd.DatetimeIndex):
        raise DataError(f"{label}: index must be dates")
    if df.index.tz is not None:
        df = df.tz_localize(None)
    df = df.copy()
    df.index = df.index.normalize()
    df.index.name = "date"
    if df.index.hasnans:
        raise DataError(f"{label}: {int(df.index.isna().sum())} row(s) with a missing or unparseable date")

    dup = df.index[df.index.duplicated()]
    if len(dup):
        raise DataError(f"{label}: duplicate date(s) {fmt_dates(dup.unique())}; each date must appear once")
    if not df.index.is_monotonic_increasing:
        warnings.append(f"{label}: dates were not in ascending order; sorted")
        df = df.sort_index()

    return df


def _numeric(df: pd.DataFrame, label: str, at) -> pd.DataFrame:
    """Every column as float64; a value that is neither a number nor empty is an error naming it."""
    # non-numeric values (anything that is not a number and not empty)
    for col in COLUMNS:
        s = df[col]
        if not pd.api.types.is_numeric_dtype(s):
            num = pd.to_numeric(s, errors="coerce")
            blank = s.isna() | s.astype("string").str.strip().isin(["", "null", "nan", "NaN", "None"])
            bad = num.isna() & ~blank
            if bad.any():
                d = df.index[bad.to_numpy()][0]
                raise DataError(f"{label}: non-numeric value {s[bad].iloc[0]!r} in column {col} at {at(d)}; "
                                f"expected a number ({int(bad.sum())} such value(s))")
            df[col] = num
        df[col] = df[col].astype("float64")

    return df


def _fill_missing(df: pd.DataFrame, label: str, at, max_fill_gap: int, warnings: list[str]) -> pd.DataFrame:
    """No infinite values; missing values forward-filled over runs of at most ``max_fill_gap`` bars."""
    values = df[list(COLUMNS)].to_numpy()
    inf = np.isinf(values)
    if inf.any():
        r, c = np.argwhere(inf)[0]
        raise DataError(f"{label}: infinite value in column {COLUMNS[c]} at {at(df.index[r])}")

    # missing values: forward-fill short runs (documented repair), error on long ones
    missing_rows = np.isnan(values).any(axis=1)
    if missing_rows.any():
        if missing_rows[0]:
            col = COLUMNS[int(np.argmax(np.isnan(values[0])))]
            raise DataError(f"{label}: missing value in column {col} at {at(df.index[0])} (the first row cannot be "
                            "forward-filled); set data.start later")
        runs = _runs(missing_rows)
        longest = max(n for _, n in runs)
        if longest > max_fill_gap:
            start, n = next((s, n) for s, n in runs if n == longest)
            col = COLUMNS[int(np.argmax(np.isnan(values[start])))]
            raise DataError(
                f"{label}: {n} consecutive bars with missing values from {at(df.index[start])} "
                f"(column {col}); at most data.max_fill_gap = {max_fill_gap} are forward-filled")
        filled = df.index[missing_rows]
        df[list(COLUMNS)] = df[list(COLUMNS)].ffill()
        warnings.append(f"{label}: forward-filled {len(filled)} bar(s) with missing values: {fmt_dates(filled)}")

    return df


def _check_values(df: pd.DataFrame, label: str, at, positive: bool) -> None:
    """Positive prices (unless a rate series), non-negative volume, high >= low."""
    prices = df[list(PRICE_COLUMNS)].to_numpy()
    nonpos = prices <= 0
    if nonpos.any() and positive:  # rate series (positive=False) may go negative: T-bills did in March 2020
        r, c = np.argwhere(nonpos)[0]
        raise DataError(f"{label}: non-positive price {prices[r, c]:g} in column {PRICE_COLUMNS[c]} at "
                        f"{at(df.index[r])} ({int(nonpos.any(axis=1).sum())} row(s)); prices must be > 0")
    if (df["volume"].to_numpy() < 0).any():
        d = df.index[(df["volume"] < 0).to_numpy()][0]
        raise DataError(f"{label}: negative volume at {at(d)}")
    bad_hl = (df["high"] < df["low"]).to_numpy()
    if bad_hl.any():
        d = df.index[bad_hl][0]
        raise DataError(f"{label}: high < low at {at(d)} (high {df.at[d, 'high']:g}, low {df.at[d, 'low']:g}); "
                        f"{int(bad_hl.sum())} such row(s)")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    out = []
    i, n = 0, len(mask)
    while i < n:
        if mask[i]:
            j = i
            while j < n and mask[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out
