"""Plausibility of one ticker's checked bars: what valid numbers can still get wrong. Each finding is one
warning line (recorded with the run's data warnings); ``data.strict`` makes them errors (``load_prices``).

* a gap between consecutive bars longer than ``data.max_gap_days`` calendar days (a hole in the history);
* a one-bar log move of close or adj_close beyond ``data.max_move`` robust standard deviations of the series'
  moves (1.4826 x the median absolute deviation; a x1000 price typo is hundreds);
* open or close outside [low, high];
* most bars on a Saturday or Sunday (crypto trades 2 days in 7; an equity file of weekend dates is shifted);
* bars dated after today.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from fincast.data.validate import DataError, fmt_dates

MAD_TO_SD = 1.4826  # the normal distribution's sd / MAD
MAX_LISTED = 3


def refuse_if_strict(found: list[str], strict: bool) -> None:
    """With ``data.strict``, findings (this module's or the option chain's) are one error listing them."""
    if found and strict:
        raise DataError("data.strict = true and the data look wrong:\n  " + "\n  ".join(found)
                        + "\n(set data.strict=false to train anyway with these as warnings)")


def findings(df: pd.DataFrame, label: str, *, max_gap_days: int, max_move: float, today: dt.date,
             moves: bool = True) -> list[str]:
    """Warning lines for ``df`` (a validated frame: float columns, ascending dates). ``moves=False`` skips the
    move check (rate series, which may cross zero)."""
    out = []
    idx = pd.DatetimeIndex(df.index)
    if len(idx) > 1:
        gaps = np.diff(idx.to_numpy()).astype("timedelta64[D]").astype(int)
        long = np.flatnonzero(gaps > max_gap_days)
        if long.size:
            shown = "; ".join(f"{idx[i]:%Y-%m-%d} to {idx[i + 1]:%Y-%m-%d} ({gaps[i]} days)" for i in long[:MAX_LISTED])
            out.append(f"{label}: {long.size} gap(s) longer than data.max_gap_days = {max_gap_days} days between "
                       f"bars: {shown}{' ...' if long.size > MAX_LISTED else ''}")
    if moves:
        out += _moves(df, label, max_move)
    lo, hi = df["low"].to_numpy(), df["high"].to_numpy()
    tol = 1e-6 * np.abs(hi)
    for col in ("open", "close"):
        v = df[col].to_numpy()
        bad = (v < lo - tol) | (v > hi + tol)
        if bad.any():
            out.append(f"{label}: {col} outside [low, high] on {int(bad.sum())} bar(s): {fmt_dates(idx[bad], MAX_LISTED)}")
    weekend = idx.day_of_week >= 5
    if len(idx) >= 5 and weekend.mean() > 0.5:
        out.append(f"{label}: {100 * weekend.mean():.0f}% of the bars fall on a Saturday or Sunday (crypto trades "
                   "2 days in 7): are the dates shifted, e.g. by a time zone?")
    future = idx > pd.Timestamp(today)
    if future.any():
        out.append(f"{label}: {int(future.sum())} bar(s) dated after today ({today:%Y-%m-%d}): {fmt_dates(idx[future], MAX_LISTED)}")
    return out


def _moves(df: pd.DataFrame, label: str, max_move: float) -> list[str]:
    out = []
    for col in ("close", "adj_close"):
        v = df[col].to_numpy()
        if len(v) < 3 or (v <= 0).any() or (col == "adj_close" and np.array_equal(v, df["close"].to_numpy())):
            continue
        r = np.diff(np.log(v))
        med = np.median(r)
        scale = MAD_TO_SD * np.median(np.abs(r - med))
        if scale <= 0:
            continue  # flat most of the time: no scale to judge a move by
        z = np.abs(r - med) / scale
        big = np.flatnonzero(z > max_move)
        if big.size:
            shown = "; ".join(f"{df.index[i + 1]:%Y-%m-%d} x{v[i + 1] / v[i]:.3g} ({z[i]:.0f} sd)" for i in big[:MAX_LISTED])
            out.append(f"{label}: {big.size} one-bar move(s) of {col} beyond data.max_move = {max_move:g} robust sd: "
                       f"{shown}{' ...' if big.size > MAX_LISTED else ''}")
    return out
